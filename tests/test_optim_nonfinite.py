"""Non-finite gradient elements leave their parameter and state unchanged, and are reported lazily."""

import copy
from unittest import mock

import pytest
import torch
from optim_cases import OPTIMIZERS, PATHS

from hf_signopt import Lion
from hf_signopt.optim import _base, _functional

BAD = [(0, 3, float("nan")), (0, 7, float("inf")), (1, 2, float("-inf"))]  # (tensor, index, value)


def trained_optimizer(cls, hparams, path, dtype):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in (10, 6)]
    opt = cls(params, lr=0.05, weight_decay=0.3, nonfinite_check_interval=0, **hparams, **path)
    for _ in range(12):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) + 0.5).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nonfinite_elements_are_skipped(name, dtype, path):
    cls, hparams = OPTIMIZERS[name]
    params, opt = trained_optimizer(cls, hparams, path, dtype)
    clean_opt = copy.deepcopy(opt)  # same state, every gradient finite
    clean_params = [g["params"] for g in clean_opt.param_groups][0]
    before = [p.detach().clone() for p in params]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]

    gen = torch.Generator().manual_seed(5)
    for p, q in zip(params, clean_params):
        g = (torch.randn(p.shape, generator=gen) + 0.5).to(dtype)
        p.grad, q.grad = g.clone(), g.clone()
    for t, i, value in BAD:
        params[t].grad[i] = value
    opt.step()
    clean_opt.step()

    for t, (p, q) in enumerate(zip(params, clean_params)):
        bad = torch.zeros(p.shape, dtype=torch.bool)
        for bt, i, _ in BAD:
            if bt == t:
                bad[i] = True
        assert torch.equal(p[bad], before[t][bad])
        assert torch.equal(p[~bad], q[~bad])
        assert not torch.equal(p[~bad], before[t][~bad])
        for key, value in opt.state[p].items():
            assert torch.equal(value[bad], state_before[t][key][bad]), key
            assert torch.equal(value[~bad], clean_opt.state[q][key][~bad]), key
    assert opt.nonfinite_grad_count() == len(BAD)
    assert clean_opt.nonfinite_grad_count() == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_reads_nothing_back_from_the_device(name, path):
    """With the check interval off, a step never converts a tensor to a Python value."""
    cls, hparams = OPTIMIZERS[name]
    params, opt = trained_optimizer(cls, hparams, path, torch.float32)
    params[0].grad[0] = float("nan")

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device sync in step()")

    with mock.patch.object(torch.Tensor, "item", forbidden), \
            mock.patch.object(torch.Tensor, "tolist", forbidden), \
            mock.patch.object(torch.Tensor, "__bool__", forbidden), \
            mock.patch.object(torch.Tensor, "__int__", forbidden), \
            mock.patch.object(torch.Tensor, "__float__", forbidden):
        for _ in range(3):
            opt.step()
    assert opt.nonfinite_grad_count() == 3


@pytest.mark.parametrize("path", PATHS)
def test_warning_every_interval_when_the_count_grew(path):
    p = torch.nn.Parameter(torch.zeros(4))
    opt = Lion([p], lr=0.1, nonfinite_check_interval=3, **path)
    grads = [[1.0, 2.0, 3.0, 4.0], [float("nan"), 1.0, float("inf"), 1.0], [1.0] * 4,   # steps 1-3: 2 bad
             [1.0] * 4, [1.0] * 4, [1.0] * 4,                                            # steps 4-6: none
             [1.0] * 4, [1.0] * 4, [float("-inf"), 1.0, 1.0, 1.0]]                       # steps 7-9: 1 bad
    with mock.patch.object(_base.logger, "warning") as warning:
        for step, g in enumerate(grads, start=1):
            p.grad = torch.tensor(g)
            opt.step()
            if step == 3:
                assert warning.call_count == 1
                assert "skipped 2 non-finite gradient element(s)" in warning.call_args[0][0]
            if step == 6:
                assert warning.call_count == 1
    assert warning.call_count == 2
    assert "skipped 1 non-finite gradient element(s)" in warning.call_args[0][0]
    assert "(3 in total)" in warning.call_args[0][0]


@pytest.mark.parametrize("path", PATHS[1:])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nonfinite_elements_are_skipped_in_small_chunks(name, path, monkeypatch):
    """Torch path cut into 4-element chunks: bad elements in several chunks, each skipped and counted."""
    monkeypatch.setattr(_functional, "CPU_CHUNK_NUMEL", 4)
    test_nonfinite_elements_are_skipped(name, torch.float32, path)
