"""Each sign optimizer against an independent plain-Python implementation of its formulas.

The reference loops below are written from the formulas in issue 2 (decoupled weight decay first,
sign(0) = 0), element by element in double precision, and run for many steps over several parameter
groups with weight decay on. The same tests run for every implementation path.
"""

import math
import struct

import pytest
import torch

from hf_signopt import Lion, SignMomentum, Signum, Simba
from hf_signopt.optim import _cpu_kernels, _functional

STEPS = 30
SHAPES = [[(7,), (5, 6)], [(3, 4, 5)], [(11,), (2, 9)]]  # three groups, elements in each


def fused_available() -> bool:
    return _cpu_kernels.load(required=False) is not None


PATHS = {
    "fused": pytest.param(dict(fused=True), id="fused", marks=pytest.mark.skipif(
        not fused_available(), reason="no C++ compiler for the fused CPU kernel")),
    "foreach": pytest.param(dict(foreach=True), id="foreach"),
    "single_tensor": pytest.param(dict(foreach=False), id="single_tensor"),
}


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def no_rounding(x: float) -> float:
    return x


def bfloat16_rounding(x: float) -> float:
    """Round to float32, then to bfloat16 with round-to-nearest-even (as stored by torch)."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def make_gradients(shapes, steps, seed):
    """Per step, per tensor: a persistent drift on about half the elements, and ~10% exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    drift = [torch.randn(s, generator=gen, dtype=torch.float64).sign() * (torch.rand(s, generator=gen) < 0.5) * 0.7
             for s in shapes]
    out = []
    for _ in range(steps):
        step = []
        for d, s in zip(drift, shapes):
            g = torch.randn(s, generator=gen, dtype=torch.float64) + d
            g[torch.rand(s, generator=gen) < 0.1] = 0.0
            step.append(g)
        out.append(step)
    return out


def run_optimizer(cls, group_hparams, path_kwargs, dtype=torch.float32, seed=0, **defaults):
    """Run `STEPS` steps; return final parameters, the optimizer, and the initial values / grads."""
    gen = torch.Generator().manual_seed(seed + 1)
    shapes = [s for group in SHAPES for s in group]
    initial = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params = [torch.nn.Parameter(t.to(dtype)) for t in initial]
    groups, i = [], 0
    for group_shapes, hp in zip(SHAPES, group_hparams):
        groups.append({"params": params[i:i + len(group_shapes)], **hp})
        i += len(group_shapes)
    opt = cls(groups, **defaults, **path_kwargs)
    grads = make_gradients(shapes, STEPS, seed)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(dtype)
        opt.step()
    as_stored = lambda t: t.to(dtype).double()  # noqa: E731
    return params, opt, [as_stored(t) for t in initial], [[as_stored(g) for g in step] for step in grads]


def reference_run(update_element, group_hparams, initial, grads, state_names, rnd=no_rounding):
    """Apply `update_element(hp, p, g, state, rnd) -> p` element-wise in Python floats.

    `rnd` models the storage dtype: it is applied to each stored parameter and float state value.
    """
    shapes = [s for group in SHAPES for s in group]
    group_of = [hp for group_shapes, hp in zip(SHAPES, group_hparams) for _ in group_shapes]
    params = [t.flatten().tolist() for t in initial]
    states = [[{name: 0 for name in state_names} for _ in p] for p in params]
    for step_grads in grads:
        for t, g in enumerate(step_grads):
            flat = g.flatten().tolist()
            for i in range(len(params[t])):
                params[t][i] = update_element(group_of[t], params[t][i], flat[i], states[t][i], rnd)
    as_tensor = lambda values, s: torch.tensor(values, dtype=torch.float64).reshape(s)  # noqa: E731
    ref_params = [as_tensor(p, s) for p, s in zip(params, shapes)]
    ref_states = {n: [as_tensor([e[n] for e in st], s) for st, s in zip(states, shapes)] for n in state_names}
    return ref_params, ref_states


def lion_element(hp, p, g, st, rnd):
    lr, (b1, b2), wd = hp["lr"], hp["betas"], hp["weight_decay"]
    c = b1 * st["m"] + (1 - b1) * g
    p = rnd(p * (1 - lr * wd) - lr * sign(c))
    st["m"] = rnd(b2 * st["m"] + (1 - b2) * g)
    return p


def signum_element(hp, p, g, st, rnd):
    lr, mu, wd = hp["lr"], hp["momentum"], hp["weight_decay"]
    if mu == 0:
        return rnd(p * (1 - lr * wd) - lr * sign(g))
    st["m"] = rnd(mu * st["m"] + (1 - mu) * g)
    return rnd(p * (1 - lr * wd) - lr * sign(st["m"]))


def sign_momentum_element(hp, p, g, st, rnd):
    lr, mu, wd = hp["lr"], hp["momentum"], hp["weight_decay"]
    st["m"] = rnd(mu * st["m"] + (1 - mu) * sign(g))
    return rnd(p * (1 - lr * wd) - lr * st["m"])


def simba_element(hp, p, g, st, rnd):
    lr, w, wd = hp["lr"], hp["window_size"], hp["weight_decay"]
    k = int(w * hp["threshold"])
    history = st["m"] if hp["momentum"] == "ema" else st["s"]
    u = sign(history) if abs(st["s"]) > k else sign(g)
    p = rnd(p * (1 - lr * wd) - lr * u)
    if hp["momentum"] == "ema":
        st["m"] = rnd(hp["beta"] * st["m"] + (1 - hp["beta"]) * g)
    st["s"] = max(-w, min(w, st["s"] + sign(g)))
    return p


LION_GROUPS = [
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    dict(lr=3e-3, betas=(0.5, 0.9), weight_decay=0.0),
    dict(lr=2e-2, betas=(0.0, 0.999), weight_decay=0.5),
]
SIGNUM_GROUPS = [
    dict(lr=1e-2, momentum=0.9, weight_decay=0.1),
    dict(lr=3e-3, momentum=0.0, weight_decay=0.2),
    dict(lr=2e-2, momentum=0.5, weight_decay=0.0),
]
SIGN_MOMENTUM_GROUPS = [
    dict(lr=1e-2, momentum=0.9, weight_decay=0.1),
    dict(lr=3e-3, momentum=0.0, weight_decay=0.2),
    dict(lr=2e-2, momentum=0.5, weight_decay=0.0),
]
SIMBA_GROUPS = [
    dict(lr=1e-2, window_size=8, threshold=0.5, weight_decay=0.1, momentum="counts", beta=0.9),
    dict(lr=3e-3, window_size=300, threshold=0.02, weight_decay=0.2, momentum="ema", beta=0.8),
    dict(lr=2e-2, window_size=127, threshold=0.1, weight_decay=0.0, momentum="counts", beta=0.99),
]

CASES = {
    "lion": (Lion, LION_GROUPS, lion_element, {"m": "exp_avg"}),
    "signum": (Signum, SIGNUM_GROUPS, signum_element, {"m": "momentum_buffer"}),
    "sign_momentum": (SignMomentum, SIGN_MOMENTUM_GROUPS, sign_momentum_element, {"m": "momentum_buffer"}),
    "simba": (Simba, SIMBA_GROUPS, simba_element, {"s": "sign_counts", "m": "exp_avg"}),
}


@pytest.mark.parametrize("path", PATHS.values())
@pytest.mark.parametrize("name", CASES)
def test_matches_reference_loop(name, path):
    cls, groups, element, state_map = CASES[name]
    params, opt, initial, grads = run_optimizer(cls, groups, path)
    ref_params, ref_states = reference_run(element, groups, initial, grads, list(state_map))
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-5)
    for ref_name, key in state_map.items():
        for p, ref in zip(params, ref_states[ref_name]):
            if key in opt.state[p]:
                torch.testing.assert_close(opt.state[p][key].double(), ref, rtol=1e-5, atol=1e-6)
    assert opt.nonfinite_grad_count() == 0


def test_reference_exercises_both_simba_branches():
    """The Simba data must reach both the history branch and the current-gradient branch."""
    _, opt, _, _ = run_optimizer(Simba, SIMBA_GROUPS, dict(foreach=True))
    for group in opt.param_groups:
        k = int(group["window_size"] * group["threshold"])
        counts = torch.cat([opt.state[p]["sign_counts"].flatten().to(torch.int32) for p in group["params"]])
        assert (counts.abs() > k).any() and (counts.abs() <= k).any()


@pytest.mark.parametrize("path", PATHS.values())
@pytest.mark.parametrize("name", CASES)
def test_bfloat16_parameters_track_reference(name, path):
    """bfloat16 parameters and state: within two bf16 ulps of a reference that stores in bf16."""
    cls, groups, element, state_map = CASES[name]
    params, opt, initial, grads = run_optimizer(cls, groups, path, dtype=torch.bfloat16)
    ref_params, ref_states = reference_run(element, groups, initial, grads, list(state_map), bfloat16_rounding)
    for p, ref in zip(params, ref_params):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.detach().double(), ref, rtol=2**-6, atol=2**-8)
    for ref_name, key in state_map.items():
        for p, ref in zip(params, ref_states[ref_name]):
            if key in opt.state[p]:
                value = opt.state[p][key]
                assert value.dtype == (torch.bfloat16 if key != "sign_counts" else simba_counts_dtype(opt, p))
                torch.testing.assert_close(value.double(), ref, rtol=2**-6, atol=2**-8)


def simba_counts_dtype(opt, p):
    window = next(g["window_size"] for g in opt.param_groups if any(p is q for q in g["params"]))
    return torch.int8 if window <= 127 else torch.int16


@pytest.mark.skipif(not fused_available(), reason="no C++ compiler for the fused CPU kernel")
@pytest.mark.parametrize("name", CASES)
def test_fused_multithreaded_matches_foreach_on_large_tensors(name):
    """Tensors above the kernel's parallel threshold, split over 2 OpenMP threads, with NaNs in both shares."""
    cls, groups, _, _ = CASES[name]
    hp = {k: v for k, v in groups[0].items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for path in (dict(fused=True), dict(foreach=True)):
            gen = torch.Generator().manual_seed(3)
            params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (70_001, 513)]
            opt = cls(params, **hp, **path)
            for _ in range(5):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen) + 0.5
                params[0].grad[[7, 50_000]] = float("nan")  # one in each thread's share
                opt.step()
            assert opt.nonfinite_grad_count() == 10
            results.append((params, opt))
        (fused_params, fused_opt), (ref_params, ref_opt) = results
        for p, q in zip(fused_params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
            for key in fused_opt.state[p]:
                torch.testing.assert_close(fused_opt.state[p][key], ref_opt.state[q][key], rtol=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_default_path_selection():
    cpu32 = [torch.zeros(4)]
    expected = "fused" if fused_available() else "foreach"
    assert _functional.select_impl(cpu32, None, None) == expected
    assert _functional.select_impl([torch.zeros(4, dtype=torch.float64)], None, None) == "foreach"
    assert _functional.select_impl([torch.zeros(4, dtype=torch.float16)], None, None) == "foreach"
    assert _functional.select_impl([torch.zeros(4, 4).t()], None, None) == "foreach"
    assert _functional.select_impl(cpu32, True, None) == "foreach"
    assert _functional.select_impl(cpu32, False, None) == "single_tensor"
    assert _functional.select_impl(cpu32, None, False) == "foreach"
    with pytest.raises(RuntimeError, match="fused=True needs plain contiguous parameters.*float64"):
        _functional.select_impl([torch.zeros(4, dtype=torch.float64)], None, True)


@pytest.mark.parametrize("path", PATHS.values())
def test_float64_and_float16_parameters_use_torch_path(path):
    """Dtypes outside the fused kernel still follow the formulas (fused=True refuses them)."""
    for dtype in (torch.float64, torch.float16):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=dtype))
        if path.get("fused"):
            with pytest.raises(ValueError, match=str(dtype)):
                Lion([p], **path)
            continue
        opt = Lion([p], lr=0.5, weight_decay=0.0, **path)
        p.grad = torch.tensor([0.5, 0.0, -1.0], dtype=dtype)
        opt.step()
        # c = 0.1*g -> sign(c) = sign(g); p - 0.5*sign(g)
        assert p.tolist() == [0.5, -2.0, 3.5]
        assert math.isclose(opt.state[p]["exp_avg"][0].item(), 0.005, rel_tol=1e-3)


@pytest.mark.parametrize("chunk_numel", [7, 40], ids=["split", "packed"])
@pytest.mark.parametrize("path", [PATHS["foreach"], PATHS["single_tensor"]])
@pytest.mark.parametrize("name", CASES)
def test_torch_path_in_small_chunks_matches_reference_loop(name, path, chunk_numel, monkeypatch):
    """Chunks smaller than the tensors (split into flat views) or holding several tensors (packed)."""
    monkeypatch.setattr(_functional, "CPU_CHUNK_NUMEL", chunk_numel)
    cls, groups, element, state_map = CASES[name]
    params, opt, initial, grads = run_optimizer(cls, groups, path)
    ref_params, ref_states = reference_run(element, groups, initial, grads, list(state_map))
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-5)
    for ref_name, key in state_map.items():
        for p, ref in zip(params, ref_states[ref_name]):
            if key in opt.state[p]:
                torch.testing.assert_close(opt.state[p][key].double(), ref, rtol=1e-5, atol=1e-6)


def test_chunks_split_large_tensors_and_pack_small_ones():
    big, small, strided = torch.zeros(10), torch.zeros(2, 2), torch.zeros(4, 3).t()
    chunks = list(_functional._chunks(([big, small, strided], [big + 1, small + 1, strided + 1]), 4))
    sizes = [[t.numel() for t in chunk[0]] for chunk in chunks]
    assert sizes == [[4], [4], [2], [4], [12]]  # a strided tensor is never split
    assert chunks[0][0][0].data_ptr() == big.data_ptr() and chunks[1][0][0].data_ptr() == big[4:].data_ptr()
    assert all(chunk[1][0].shape == chunk[0][0].shape for chunk in chunks)
    sizes = [[t.numel() for t in chunk[0]] for chunk in _functional._chunks(([small, small, big],), 9)]
    assert sizes == [[4, 4], [9], [1]]


@pytest.mark.parametrize("path", [PATHS["foreach"], PATHS["single_tensor"]])
@pytest.mark.parametrize("name", CASES)
def test_empty_parameters_are_left_alone(name, path):
    cls, groups, _, _ = CASES[name]
    empty, p = torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.ones(3))
    hp = {k: v for k, v in groups[0].items()}
    for params in ([empty], [empty, p]):
        opt = cls(params, **hp, **path)
        for q in params:
            q.grad = torch.ones_like(q)
        opt.step()
        assert empty.numel() == 0 and opt.nonfinite_grad_count() == 0
    assert (p < 1).all()
