"""Building, caching and falling back from the fused CPU kernels."""

from unittest import mock

import pytest
import torch

from hf_signopt import Lion, Simba
from hf_signopt.optim import _cpu_kernels, _functional


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """Forget the loaded library and build into a cache directory that does not exist yet."""
    monkeypatch.setattr(_cpu_kernels, "_library", None)
    monkeypatch.setattr(_cpu_kernels, "_failure", None)
    monkeypatch.setenv("HF_SIGNOPT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where an unsafe cache would fall back to
    return tmp_path / "cache"


def test_no_compiler_falls_back_to_foreach(fresh_kernels, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh_kernels / "no-such-compiler"))
    with mock.patch.object(_cpu_kernels.logger, "warning") as warning:
        assert _cpu_kernels.load(required=False) is None
        assert _cpu_kernels.load(required=False) is None
    assert warning.call_count == 1
    assert "no C++ compiler found" in warning.call_args[0][0]
    assert _functional.select_impl([torch.zeros(4)], None, None) == "foreach"

    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    p.grad = torch.tensor([2.0, -3.0])
    Lion([p], lr=0.5, weight_decay=0.0).step()
    assert p.tolist() == [0.5, -0.5]

    q = torch.nn.Parameter(torch.zeros(2))
    q.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="fused CPU kernels are unavailable: no C\\+\\+ compiler found"):
        Simba([q], fused=True).step()


@pytest.mark.skipif(_cpu_kernels.load(required=False) is None, reason="no C++ compiler for the fused CPU kernel")
def test_kernels_are_built_once_into_the_cache(fresh_kernels, monkeypatch):
    with mock.patch.object(_cpu_kernels.logger, "warning") as warning:
        library = _cpu_kernels.load(required=True)
    warning.assert_not_called()  # tmp_path is private, under the sticky /tmp: accepted
    built = list(fresh_kernels.glob("hf_signopt_kernels_*.so"))
    assert len(built) == 1 and list(fresh_kernels.iterdir()) == built  # no temporary left behind
    assert fresh_kernels.stat().st_mode & 0o777 == 0o700  # created private
    assert built[0].stat().st_mode & 0o777 == 0o700  # whatever the umask
    stamp = built[0].stat().st_mtime_ns

    monkeypatch.setattr(_cpu_kernels, "_library", None)
    with mock.patch.object(_cpu_kernels.subprocess, "run", wraps=_cpu_kernels.subprocess.run) as run:
        assert _cpu_kernels.load(required=True) is not None
    assert all("--version" in call.args[0] for call in run.call_args_list)  # no compile, only the version probe
    assert built[0].stat().st_mtime_ns == stamp
    assert hasattr(library, "hfso_lion_float32")


@pytest.mark.parametrize("path", [
    pytest.param({"fused": True}, id="fused", marks=pytest.mark.skipif(
        _cpu_kernels.load(required=False) is None, reason="no C++ compiler for the fused CPU kernel")),
    pytest.param({"foreach": True}, id="foreach"),
])
def test_step_marks_parameters_modified_for_autograd(path):
    """Updating a parameter that a pending graph saved must make backward() fail, not silently misbehave."""
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    loss = (p * p).sum()  # saves p for backward
    p.grad = torch.ones(2)
    Simba([p], lr=0.1, **path).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_non_contiguous_gradient_takes_the_torch_path():
    """The fused kernel reads raw memory in order, so a transposed gradient must not reach it."""
    p = torch.nn.Parameter(torch.zeros(3, 4))
    grad = torch.arange(12.0).reshape(4, 3).t() - 5.5  # non-contiguous, no zeros
    p.grad = grad
    Lion([p], lr=1.0).step()  # default path
    assert torch.equal(p.detach(), -grad.sign())
    q = torch.nn.Parameter(torch.zeros(3, 4))
    q.grad = grad
    if _cpu_kernels.load(required=False) is not None:
        with pytest.raises(RuntimeError, match="fused=True needs plain contiguous parameters.*non-contiguous"):
            Lion([q], lr=1.0, fused=True).step()


def test_tensor_subclass_takes_the_torch_path():
    class Tagged(torch.Tensor):
        pass

    tagged = torch.zeros(4).as_subclass(Tagged)
    assert _functional.select_impl([tagged], None, None) == "foreach"
    fused = "fused" if _cpu_kernels.load(required=False) is not None else "foreach"
    assert _functional.select_impl([torch.nn.Parameter(torch.zeros(4))], None, None) == fused


@pytest.mark.skipif(_cpu_kernels.load(required=False) is None, reason="no C++ compiler for the fused CPU kernel")
def test_compiler_without_openmp_gives_single_threaded_kernels(fresh_kernels, monkeypatch):
    real_compile = _cpu_kernels._compile

    def compile_without_openmp(compiler, flags, target):
        if "-fopenmp" in flags:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        real_compile(compiler, flags, target)

    monkeypatch.setattr(_cpu_kernels, "_compile", compile_without_openmp)
    with mock.patch.object(_cpu_kernels.logger, "warning") as warning:
        assert _cpu_kernels.load(required=True) is not None
    assert "no OpenMP" in warning.call_args[0][0]
    results = []
    for path in ({"fused": True}, {"foreach": True}):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(50_000, generator=gen))
        opt = Lion([p], lr=0.01, weight_decay=0.1, **path)
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append(p.detach())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_state_left_in_another_dtype_takes_the_torch_path():
    """After model.to(bfloat16), float32 state must not be read as bfloat16 by the kernel."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = Lion([p], lr=0.5)
    p.grad = torch.ones(4)
    opt.step()
    p.data = p.data.to(torch.bfloat16)
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    assert _functional.select_impl([p, p.grad, opt.state[p]["exp_avg"]], None, None) == "foreach"
    fused = "fused" if _cpu_kernels.load(required=False) is not None else "foreach"
    assert _functional.select_impl([p, p.grad, opt.state[p]["exp_avg"].bfloat16()], None, None) == fused


@pytest.mark.skipif(_cpu_kernels.load(required=False) is None, reason="no C++ compiler for the fused CPU kernel")
@pytest.mark.parametrize("window_size, momentum", [(127, "counts"), (100, "ema"), (300, "counts"), (1000, "ema")])
def test_fused_simba_vector_loop_matches_the_torch_path(window_size, momentum):
    """Tensors long enough for the AVX2 loop (32 elements a pass) and its tail, counters started at their limits,
    NaN/inf gradients: the counters agree exactly, parameters and EMA to the float32 rounding of the decay order."""
    from hf_signopt import Simba

    sizes = (4099, 64, 77)
    runs = []
    for path in (dict(fused=True), dict(foreach=False)):
        params = [torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n))) for n in sizes]
        opt = Simba(params, lr=0.01, window_size=window_size, threshold=0.3, weight_decay=0.1, momentum=momentum,
                    **path)
        for step in range(4):
            for p in params:
                g = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + p.numel()))
                g[torch.rand(p.shape, generator=torch.Generator().manual_seed(step)) < 0.05] = float("nan")
                g[:: 37] = float("inf")
                g[5:: 41] = -float("inf")
                g[7:: 13] = 0.0
                p.grad = g
            opt.step()
            if step == 0:  # counters at and near the window's limits
                for p in params:
                    counts = opt.state[p]["sign_counts"]
                    limits = torch.tensor([window_size, -window_size, window_size - 1, -window_size + 1, 0])
                    counts.copy_(limits.repeat(counts.numel() // 5 + 1)[: counts.numel()].to(counts.dtype))
        runs.append((params, opt))
    (fused, fused_opt), (reference, reference_opt) = runs
    for p, q in zip(fused, reference):
        assert torch.equal(fused_opt.state[p]["sign_counts"], reference_opt.state[q]["sign_counts"])
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        if momentum == "ema":
            torch.testing.assert_close(fused_opt.state[p]["exp_avg"], reference_opt.state[q]["exp_avg"], rtol=0,
                                       atol=1e-6)
    assert fused_opt.nonfinite_grad_count() == reference_opt.nonfinite_grad_count() > 0
