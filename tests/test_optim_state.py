"""state_dict round trip: dtypes kept, loadable with weights_only=True, resumed run == uninterrupted run."""

import pytest
import torch

from hf_signopt import Lion, SignMomentum, Signum, Simba
from hf_signopt.optim import _cpu_kernels

CONFIGS = {
    "lion": (Lion, dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1), {"exp_avg": None}),
    "signum": (Signum, dict(lr=1e-2, momentum=0.8, weight_decay=0.1), {"momentum_buffer": None}),
    "signsgd": (Signum, dict(lr=1e-2, momentum=0.0, weight_decay=0.1), {}),
    "sign_momentum": (SignMomentum, dict(lr=1e-2, momentum=0.8, weight_decay=0.1), {"momentum_buffer": None}),
    "simba_int8": (Simba, dict(lr=1e-2, window_size=100, threshold=0.05, weight_decay=0.1),
                   {"sign_counts": torch.int8}),
    "simba_int16": (Simba, dict(lr=1e-2, window_size=1000, threshold=0.002, weight_decay=0.1),
                    {"sign_counts": torch.int16}),
    "simba_ema": (Simba, dict(lr=1e-2, window_size=20, threshold=0.1, weight_decay=0.1, momentum="ema"),
                  {"sign_counts": torch.int8, "exp_avg": None}),
}
PATHS = [
    pytest.param(dict(fused=True), id="fused", marks=pytest.mark.skipif(
        _cpu_kernels.load(required=False) is None, reason="no C++ compiler for the fused CPU kernel")),
    pytest.param(dict(foreach=True), id="foreach"),
]


def make_model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)


def make_optimizer(cls, hparams, path, model):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return cls([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], **hparams, **path)


def train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen).to(next(model.parameters()).dtype)
        loss = (model(x) - x[:, :2].sin()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_round_trip(name, dtype, path, tmp_path):
    cls, hparams, state_dtypes = CONFIGS[name]
    model = make_model(dtype)
    opt = make_optimizer(cls, hparams, path, model)
    train(model, opt, 5, seed=1)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_model = make_model(dtype)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = make_optimizer(cls, hparams, path, resumed_model)
    resumed.load_state_dict(checkpoint["optim"])

    for p in resumed_model.parameters():
        assert set(resumed.state[p]) == set(state_dtypes)
        for key, expected in state_dtypes.items():
            assert resumed.state[p][key].dtype == (expected or dtype)
    assert resumed.param_groups[1]["weight_decay"] == 0.0

    train(model, opt, 5, seed=2)
    train(resumed_model, resumed, 5, seed=2)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        for key in state_dtypes:
            assert torch.equal(opt.state[p][key], resumed.state[q][key])
            assert resumed.state[q][key].dtype == opt.state[p][key].dtype


@pytest.mark.parametrize("path", PATHS)
def test_simba_window_change_keeps_counts_in_range_and_dtype(path):
    p = torch.nn.Parameter(torch.zeros(4))
    opt = Simba([p], lr=0.0, window_size=100, threshold=0.5, **path)
    p.grad = torch.tensor([1.0, -1.0, 1.0, 0.0])
    for _ in range(90):
        opt.step()
    assert opt.state[p]["sign_counts"].tolist() == [90, -90, 90, 0]
    opt.param_groups[0]["window_size"] = 1000  # int8 -> int16, values kept
    opt.step()
    assert opt.state[p]["sign_counts"].dtype == torch.int16
    assert opt.state[p]["sign_counts"].tolist() == [91, -91, 91, 0]
    opt.param_groups[0]["window_size"] = 50  # int16 -> int8, clamped to the new window
    opt.step()
    assert opt.state[p]["sign_counts"].dtype == torch.int8
    assert opt.state[p]["sign_counts"].tolist() == [50, -50, 50, 0]
