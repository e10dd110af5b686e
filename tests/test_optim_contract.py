"""What torch.optim optimizers promise, kept by every sign optimizer on every path.

Tensor learning rates, defaults for flags an older state dict lacks, no empty state entries, hooks,
state_dict hooks, deepcopy, printing, schedulers and weights_only checkpoints (the properties
PyTorch's own OptimizerInfo tests check for its optimizers).
"""

import copy

import pytest
import torch
from optim_cases import OPTIMIZERS, PATHS

from hf_signopt import Lion, Signum, Simba


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (37, 300, 5)]


def train(opt, params, steps, seed=1, scheduler=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) + 0.3
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_run(params, opt, other_params, other_opt):
    for p, q in zip(params, other_params):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == other_opt.state[q].keys()
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], other_opt.state[q][key])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tensor_lr_gives_the_float_lr_result(name, path):
    """With a scheduler too: LambdaLR writes a Tensor lr in place (fill_), a float one by assignment."""
    cls, hparams = OPTIMIZERS[name]
    runs = []
    for lr in (0.03, torch.tensor(0.03)):
        params = make_params()
        opt = cls(params, lr=lr, weight_decay=0.1, **hparams, **path)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        train(opt, params, 6, scheduler=scheduler)
        runs.append((params, opt))
    assert isinstance(runs[1][1].param_groups[0]["lr"], torch.Tensor)
    assert_same_run(*runs[0], *runs[1])


@pytest.mark.parametrize("cls", [Lion, Signum, Simba])
@pytest.mark.parametrize("lr", [torch.tensor([0.1]), torch.tensor(1), torch.tensor(-0.1)],
                         ids=["shape_1", "integer", "negative"])
def test_bad_tensor_lr_is_refused(cls, lr):
    match = "0-dim floating-point tensor" if lr.dim() or not lr.is_floating_point() else "lr.*expected"
    with pytest.raises(ValueError, match=match):
        cls(make_params(), lr=lr)


def test_schedulers_set_each_groups_lr():
    """Signum without decay moves every element by exactly the group's lr: the scheduler's lr is the step."""
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    opt = Signum([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.25, momentum=0.0, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(3):
        before = a.detach().clone(), b.detach().clone()
        a.grad, b.grad = torch.ones(4), -torch.ones(4)
        opt.step()
        scheduler.step()
        assert torch.equal(before[0] - a, torch.full((4,), 0.25 * 0.5**step))
        assert torch.equal(b - before[1], torch.full((4,), 0.5 * 0.5**step))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_without_later_flags_loads_and_steps(name):
    """A state dict saved before `foreach`/`fused` (and Simba's `momentum`/`beta`) existed gets their defaults."""
    cls, hparams = OPTIMIZERS[name]
    params = make_params()
    opt = cls(params, lr=0.03, **hparams)
    train(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())  # state_dict() holds the live state tensors
    for group in saved["param_groups"]:
        for key in cls.LATER_GROUP_DEFAULTS:
            if key in ("momentum", "beta") and hparams.get("momentum") == "ema":
                continue  # an "ema" state dict is necessarily from a version that has the key
            group.pop(key)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = cls(resumed_params, lr=0.03, **hparams)
    resumed.load_state_dict(saved)
    assert all(resumed.param_groups[0][key] is not None or value is None
               for key, value in cls.LATER_GROUP_DEFAULTS.items())
    train(opt, params, 3, seed=2)
    train(resumed, resumed_params, 3, seed=2)
    for p, q in zip(params, resumed_params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # fused or foreach, as each picks by default


def test_lion_loads_a_peer_lion_state_dict():
    """lion-pytorch's Lion keeps the same `exp_avg` state; its groups hold only lr, betas and weight_decay."""
    params = make_params()
    peer_state = {
        "state": {i: {"exp_avg": torch.full_like(p, 0.5)} for i, p in enumerate(params)},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "weight_decay": 0.0, "params": [0, 1, 2]}],
    }
    opt = Lion(params, lr=1.0)
    opt.load_state_dict(peer_state)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["foreach"] is None
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, -1.0)  # c = 0.9 * 0.5 + 0.1 * -1 > 0: every element steps down by lr
    opt.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p, b - 0.1, rtol=0, atol=1e-7)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_no_empty_state_entries(name, path):
    """A parameter without a gradient, or an optimizer that keeps no state (signSGD), leaves no entry."""
    cls, hparams = OPTIMIZERS[name]
    params = make_params()
    idle = torch.nn.Parameter(torch.ones(3))
    opt = cls([*params, idle], lr=0.03, **hparams, **path)
    train(opt, params, 2)
    assert idle not in opt.state
    assert all(opt.state[p] for p in opt.state)
    expected = 0 if name == "signsgd" else len(params)
    assert len(opt.state) == expected and len(opt.state_dict()["state"]) == expected


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_hooks_and_state_dict_hooks_run(name):
    cls, hparams = OPTIMIZERS[name]
    params = make_params()
    opt = cls(params, lr=0.03, **hparams)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    train(opt, params, 2)
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    assert calls == ["pre", "post", "pre", "post", "sd_pre", "load_post"]
    assert saved["extra"] == 1


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_deepcopy_continues_like_the_original(name):
    cls, hparams = OPTIMIZERS[name]
    params = make_params()
    opt = cls(params, lr=0.03, nonfinite_check_interval=7, **hparams)
    train(opt, params, 3)
    params[0].grad[0] = float("nan")
    opt.step()
    copied_params, copied = copy.deepcopy((params, opt))  # one memo: the copy steps the copied parameters
    assert copied.nonfinite_check_interval == 7 and copied.nonfinite_grad_count() == 1
    train(opt, params, 3, seed=2)
    train(copied, copied_params, 3, seed=2)
    assert_same_run(params, opt, copied_params, copied)


def test_printing_shows_every_group_and_hyperparameter():
    opt = Simba([{"params": make_params()[:1]}, {"params": make_params()[1:], "lr": 0.5}], lr=0.1, window_size=64)
    text = repr(opt)
    assert text.startswith("Simba (")
    for fragment in ("Parameter Group 0", "Parameter Group 1", "lr: 0.1", "lr: 0.5", "window_size: 64",
                     "fused: None", "foreach: None"):
        assert fragment in text


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weights_only_checkpoint_with_a_tensor_lr_resumes_exactly(name, tmp_path):
    cls, hparams = OPTIMIZERS[name]
    params = make_params()
    opt = cls(params, lr=torch.tensor(0.03), weight_decay=0.1, **hparams)
    train(opt, params, 3)
    torch.save({"params": [p.detach() for p in params], "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_params = [torch.nn.Parameter(p.clone()) for p in checkpoint["params"]]
    resumed = cls(resumed_params, lr=torch.tensor(1.0), weight_decay=0.1, **hparams)
    resumed.load_state_dict(checkpoint["optim"])
    assert resumed.param_groups[0]["lr"].item() == pytest.approx(0.03)
    train(opt, params, 3, seed=2)
    train(resumed, resumed_params, 3, seed=2)
    assert_same_run(params, opt, resumed_params, resumed)
