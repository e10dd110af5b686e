"""Mixed precision smoke tests: GradScaler with float16 autocast, bfloat16 autocast, bfloat16 weights."""

import pytest
import torch

from hf_signopt import Lion, SignMomentum, Signum, Simba

OPTIMIZERS = {
    "lion": lambda params: Lion(params, lr=3e-3, weight_decay=0.01),
    "signum": lambda params: Signum(params, lr=3e-3, weight_decay=0.01),
    "sign_momentum": lambda params: SignMomentum(params, lr=1e-2, weight_decay=0.01),
    "simba": lambda params: Simba(params, lr=3e-3, window_size=16, threshold=0.25, weight_decay=0.01),
}


def regression_batches(n, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    target = torch.nn.Linear(8, 1)
    torch.nn.init.normal_(target.weight, generator=gen)
    for _ in range(n):
        x = torch.randn(64, 8, generator=gen)
        yield x.to(dtype), target(x).detach().to(dtype)


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).to(dtype)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scaler_float16_autocast(name):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows at first: steps get skipped
    losses = []
    skipped = 0
    for x, y in regression_batches(150):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad()
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < scale:  # inf found: the optimizer must not have run
            skipped += 1
            assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        losses.append(loss.item())
    assert skipped > 0
    assert opt.nonfinite_grad_count() == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bfloat16_autocast(name):
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters())
    losses = []
    for x, y in regression_batches(150):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bfloat16_weights(name):
    model = make_model(torch.bfloat16)
    opt = OPTIMIZERS[name](model.parameters())
    losses = []
    for x, y in regression_batches(150, torch.bfloat16):
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        assert all(v.dtype in (torch.bfloat16, torch.int8) for v in opt.state[p].values())
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
