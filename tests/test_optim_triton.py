"""The fused Triton step kernels, run by Triton's interpreter on CPU, bit for bit against the torch path.

Every kernel is compared with the per-tensor torch path (`_functional._torch_step` on one tensor at a
time) over several steps, on tensors of 0 to a few thousand elements with NaN and +-inf gradient
elements, in float32, bfloat16 and float16, with weight decay on and off and a float or 0-dim tensor
learning rate. Parameters, state and the non-finite count must agree exactly (compared as integer
bits). Gradients hold no -0.0: with weight 1 and ``end`` -0.0, ATen's own CPU lerp gives a zero
result different signs in its vector loop and its scalar tail, so no kernel can match it bitwise
there (`test_negative_zero_gradients_differ_only_in_the_sign_of_zeros`).

``TRITON_INTERPRET=1`` and ``HF_SIGNOPT_TRITON_ON_CPU=1`` are set only while this module's tests
run; the kernels are decorated per value of ``TRITON_INTERPRET``, so other tests are not affected.
"""

import pytest

pytest.importorskip("triton")

import torch

from hf_signopt.optim import _functional, _triton_kernels

STEPS = 3
SIZES = [1, 2, 3, 31, 0, 512, 513, 2049]  # 15 blocks of 512, one of them with none
BLOCK = 512


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    """Run the Triton kernels in the interpreter on CPU tensors, with small blocks, for this module only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        patch.setenv("HF_SIGNOPT_TRITON_ON_CPU", "1")
        patch.setattr(_triton_kernels, "BLOCK_SIZE", BLOCK)
        patch.setattr(_triton_kernels, "_tables", type(_triton_kernels._tables)())
        yield


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as integers (NaN payloads and signed zeros included)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bitwise(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape
        differ = (bits(a) != bits(e)).nonzero().flatten()
        assert differ.numel() == 0, f"tensor {i}: {differ.numel()} elements differ, first at {differ[:5].tolist()}"


def no_negative_zero(t: torch.Tensor) -> torch.Tensor:
    return t.masked_fill_(t == 0, 0.0)


def gradient(numel: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A random gradient with about 5% zeros and 2% each of NaN, +inf and -inf."""
    g = torch.randn(numel, generator=generator)
    kind = torch.rand(numel, generator=generator)
    g[kind < 0.05] = 0.0
    g[(kind >= 0.05) & (kind < 0.07)] = float("nan")
    g[(kind >= 0.07) & (kind < 0.09)] = float("inf")
    g[(kind >= 0.09) & (kind < 0.11)] = -float("inf")
    return no_negative_zero(g.to(dtype))


def values(numel: int, dtype: torch.dtype, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return no_negative_zero((torch.randn(numel, generator=generator) * scale).to(dtype))


# name: (torch kernel, Triton kernel, state lists (kind, dtype or None), hyperparameters except lr and wd)
CASES = {
    "lion": (_functional._lion, _triton_kernels.lion, ["float"], {"beta1": 0.3, "beta2": 0.99}),  # lerp w = 0.7, 0.01
    "signum": (_functional._signum, _triton_kernels.signum, ["float"], {"momentum": 0.9}),
    "signsgd": (_functional._signsgd, _triton_kernels.signsgd, [], {}),
    "sign_momentum": (_functional._sign_momentum, _triton_kernels.sign_momentum, ["float"], {"momentum": 0.2}),
    "simba_counts_int8": (_functional._simba, _triton_kernels.simba, [torch.int8],
                          {"window_size": 3, "threshold": 0.34, "beta": 0.99}),  # k = 1
    "simba_counts_int16": (_functional._simba, _triton_kernels.simba, [torch.int16],
                           {"window_size": 200, "threshold": 0.5, "beta": 0.99}),  # k = 100
    "simba_ema_int8": (_functional._simba, _triton_kernels.simba, [torch.int8, "float"],
                       {"window_size": 127, "threshold": 0.5, "beta": 0.9}),  # k = 63
    "simba_ema_int16": (_functional._simba, _triton_kernels.simba, [torch.int16, "float"],
                        {"window_size": 300, "threshold": 0.0, "beta": 0.99}),  # k = 0
}
# Per step: (lr, weight decay); a Tensor lr is a 0-dim float32 tensor.
SCHEDULE = [(0.01, 0.1), (torch.tensor(0.02), 0.1), (0.003, 0.0)]


def make_state(kinds: list, sizes: list[int], dtype: torch.dtype, generator: torch.Generator,
               window_size: int) -> list[list[torch.Tensor]]:
    """Random state lists: floats in the parameter dtype, sign counters anywhere in [-w, w]."""
    state = []
    for kind in kinds:
        if kind == "float":
            state.append([values(n, dtype, generator, 0.1) for n in sizes])
        else:
            state.append([torch.randint(-window_size, window_size + 1, (n,), generator=generator, dtype=kind)
                          for n in sizes])
    return state


def clone(lists: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[t.clone() for t in tensors] for tensors in lists]


def reference_step(torch_fn, lists, count: torch.Tensor, **hyper) -> None:
    """The per-tensor torch path: `_torch_step` on one tensor (and its state) at a time."""
    for tensors in zip(*lists, strict=True):
        _functional._torch_step(torch_fn, tuple([t] for t in tensors), count, **hyper)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_torch_path_bitwise(name, dtype):
    torch_fn, triton_fn, kinds, hyper = CASES[name]
    generator = torch.Generator().manual_seed(len(name) * 31 + dtype.itemsize)
    params = [values(n, dtype, generator) for n in SIZES]
    state = make_state(kinds, SIZES, dtype, generator, hyper.get("window_size", 1))
    ours, ours_state = clone([params])[0], clone(state)
    expected_count, count = torch.tensor(7), torch.tensor(7)  # the kernels add to the count
    nonfinite = 7
    for lr, weight_decay in SCHEDULE:
        grads = [gradient(n, dtype, generator) for n in SIZES]
        nonfinite += sum(int((~g.isfinite()).sum()) for g in grads)
        versions = [t._version for t in ours]
        reference_step(torch_fn, (params, grads, *state), expected_count, lr=lr, weight_decay=weight_decay, **hyper)
        triton_fn(ours, grads, *ours_state, lr=lr, weight_decay=weight_decay, nonfinite_count=count, **hyper)
        assert_bitwise(ours, params)
        for mine, theirs in zip(ours_state, state, strict=True):
            assert_bitwise(mine, theirs)
        assert count.item() == expected_count.item() == nonfinite
        assert all(t._version > v for t, v in zip(ours, versions, strict=True))  # autograd sees the writes


def test_dozens_of_tensors_take_one_launch(monkeypatch):
    monkeypatch.setattr(_triton_kernels, "BLOCK_SIZE", 64)
    generator = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 300, (40,), generator=generator).tolist() + [1, 64, 65]
    params = [values(n, torch.bfloat16, generator) for n in sizes]
    exp_avgs = [values(n, torch.bfloat16, generator, 0.1) for n in sizes]
    grads = [gradient(n, torch.bfloat16, generator) for n in sizes]
    ours, ours_avgs = clone([params, exp_avgs])
    hyper = {"lr": torch.tensor(0.01), "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.05}
    expected_count, count = torch.tensor(0), torch.tensor(0)
    reference_step(_functional._lion, (params, grads, exp_avgs), expected_count, **hyper)

    kernel = _triton_kernels._jitted("1")["_lion_kernel"]
    grids = []
    run = kernel.run
    monkeypatch.setattr(kernel, "run",
                        lambda *args, grid, **kwargs: grids.append(grid) or run(*args, grid=grid, **kwargs))
    _triton_kernels.lion(ours, grads, ours_avgs, nonfinite_count=count, **hyper)
    assert grids == [(sum(-(-n // 64) for n in sizes),)]  # one launch, one program per block of every tensor
    assert_bitwise(ours, params)
    assert_bitwise(ours_avgs, exp_avgs)
    assert count.item() == expected_count.item() == sum(int((~g.isfinite()).sum()) for g in grads)


def test_launch_table_layout_and_cache(monkeypatch):
    monkeypatch.setattr(_triton_kernels, "BLOCK_SIZE", 4)
    monkeypatch.setattr(_triton_kernels, "_tables", type(_triton_kernels._tables)())
    params, grads = [torch.zeros(9), torch.zeros(0), torch.zeros(4)], [torch.zeros(9), torch.zeros(0), torch.zeros(4)]
    table, num_blocks = _triton_kernels._table((params, grads))
    assert num_blocks == 4  # 3 blocks of the first tensor, none of the empty one, 1 of the last
    assert table[:num_blocks].tolist() == [0, 1, 2, (2 << 32) + 0]
    rows = table[num_blocks:].view(3, 3).tolist()
    assert rows == [[p.data_ptr(), g.data_ptr(), p.numel()] for p, g in zip(params, grads, strict=True)]

    assert _triton_kernels._table((params, grads))[0] is table  # an unchanged set reuses its table
    grads[2] = torch.zeros(4)  # a new gradient tensor: a new table
    assert _triton_kernels._table((params, grads))[0] is not table
    assert len(_triton_kernels._tables) == 2

    sets = [([torch.zeros(3)], [torch.zeros(3)]) for _ in range(_triton_kernels.TABLE_CACHE_SIZE)]
    for lists in sets:
        _triton_kernels._table(lists)
    assert len(_triton_kernels._tables) == _triton_kernels.TABLE_CACHE_SIZE  # bounded: the oldest went
    assert _triton_kernels._table(sets[-1])[0] is _triton_kernels._table(sets[-1])[0]
    assert _triton_kernels._table((params, grads))[0] is not table


def test_empty_lists_and_empty_tensors():
    count = torch.tensor(3)
    _triton_kernels.lion([], [], [], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.1, nonfinite_count=count)
    _triton_kernels.simba([], [], [], lr=0.1, window_size=5, threshold=0.2, weight_decay=0.0, beta=0.9,
                          nonfinite_count=count)
    p, g = torch.zeros(0), torch.zeros(0)
    _triton_kernels.signsgd([p], [g], lr=0.1, weight_decay=0.0, nonfinite_count=count)
    assert count.item() == 3


def test_availability_and_cpu_switch(monkeypatch):
    assert _triton_kernels.available()
    assert _triton_kernels.cpu_enabled()
    monkeypatch.delenv("HF_SIGNOPT_TRITON_ON_CPU")
    assert not _triton_kernels.cpu_enabled()


def test_negative_zero_gradients_differ_only_in_the_sign_of_zeros():
    """Signum with momentum 0 stores lerp(m, lerp(m, g, 1), 1): -0.0 gradients reach the state's zeros.

    With torch 2.13 on AVX2 the signs differ exactly in ATen's scalar tails (the last n % 16 elements).
    """
    generator = torch.Generator().manual_seed(5)
    sizes = [5, 37, 100]  # all scalar tail; vector loop and tail; mostly vector loop
    params = [values(n, torch.float32, generator) for n in sizes]
    buffers = [values(n, torch.float32, generator, 0.1) for n in sizes]
    ours, ours_buffers = clone([params, buffers])
    hyper = {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.1}
    expected_count, count = torch.tensor(0), torch.tensor(0)
    for _ in range(2):
        grads = [gradient(n, torch.float32, generator).masked_fill_(torch.rand(n, generator=generator) < 0.3, -0.0)
                 for n in sizes]
        reference_step(_functional._signum, (params, grads, buffers), expected_count, **hyper)
        _triton_kernels.signum(ours, grads, ours_buffers, nonfinite_count=count, **hyper)
    for a, e in zip(ours + ours_buffers, params + buffers, strict=True):
        assert torch.equal(a, e)  # equal values (+0.0 == -0.0)
        assert ((bits(a) == bits(e)) | (a == 0)).all()  # and equal bits but for zeros
    assert count.item() == expected_count.item()


@pytest.mark.parametrize("name", ["lion", "signsgd", "simba_int16_ema"])
def test_optimizers_with_fused_true_run_the_triton_kernels(name):
    """Under the CPU switch, CPU tensors take the Triton path as CUDA ones do: bitwise the per-tensor torch path."""
    from optim_cases import OPTIMIZERS

    cls, hparams = OPTIMIZERS[name]
    assert _functional.select_impl([torch.zeros(4)], None, True) == "triton"
    runs = []
    for path in (dict(fused=True), dict(foreach=False)):
        params = [torch.nn.Parameter(values(n, torch.bfloat16, torch.Generator().manual_seed(n))) for n in (3, 700)]
        opt = cls(params, lr=torch.tensor(0.01), weight_decay=0.1, **hparams, **path)
        for step in range(3):
            for p in params:
                p.grad = gradient(p.numel(), torch.bfloat16, torch.Generator().manual_seed(10 * step + p.numel()))
            opt.step()
        runs.append((params, opt))
    (params, opt), (ref_params, ref_opt) = runs
    assert_bitwise(params, ref_params)
    for p, q in zip(params, ref_params):
        assert_bitwise(list(opt.state[p].values()), list(ref_opt.state[q].values()))
    assert opt.nonfinite_grad_count() == ref_opt.nonfinite_grad_count() > 0
