"""Build, cache and call the fused C++ CPU step kernels (`_cpu_kernels.cpp`).

The kernels are plain C-ABI functions compiled with the system C++ compiler (``$CXX`` or ``c++``)
on first use, with OpenMP and the CPU's vector extensions, and cached as a shared library under
``$HF_SIGNOPT_KERNEL_CACHE`` (default: ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``),
named by a hash of the source, flags and compiler. Compiling takes about a second; no torch headers
and no ninja are involved. The library links ``libgomp.so.1``, which resolves to the OpenMP runtime
torch has already loaded, so the kernels use torch's thread count (`torch.set_num_threads`).

A compiler without OpenMP (e.g. Apple clang) gets single-threaded kernels, with a warning. If no
compiler is found or compiling fails, `load(required=False)` logs one warning and returns None,
and the optimizers use their torch ``foreach`` path instead.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

SOURCE = Path(__file__).with_name("_cpu_kernels.cpp")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
_DTYPE_SUFFIX = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_INT_SUFFIX = {torch.int8: "int8", torch.int16: "int16"}

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


def _compile_flags(openmp: bool) -> list[str]:
    flags = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-trapping-math"] + (["-fopenmp"] if openmp else [])
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def _cache_dir() -> Path:
    root = os.environ.get("HF_SIGNOPT_KERNEL_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: concurrent processes never see a half-written library.
    handle, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} {' '.join(flags)} failed:\n{result.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(compiler: str) -> Path:
    """Return the cached library, compiling it if needed: with OpenMP, else single-threaded."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    variants = []
    for openmp in (True, False):
        flags = _compile_flags(openmp)
        digest = hashlib.sha256("\0".join([SOURCE.read_text(), *flags, version]).encode()).hexdigest()[:16]
        variants.append((flags, _cache_dir() / f"hf_signopt_kernels_{digest}.so"))
    for _, target in variants:
        if target.exists():
            return target
    errors = []
    for flags, target in variants:
        try:
            _compile(compiler, flags, target)
        except RuntimeError as error:
            errors.append(str(error))
            continue
        if "-fopenmp" not in flags:
            logger.warning("hf_signopt: the compiler has no OpenMP; fused CPU kernels run single-threaded")
        return target
    raise RuntimeError("\n".join(errors))


def _declare(library: ctypes.CDLL) -> None:
    ptrs, i64p = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64)
    f32, i64, i32 = ctypes.c_float, ctypes.c_int64, ctypes.c_int32
    for suffix in _DTYPE_SUFFIX.values():
        getattr(library, f"hfso_lion_{suffix}").argtypes = [i64, ptrs, ptrs, ptrs, i64p, f32, f32, f32, f32, i64p]
        getattr(library, f"hfso_signum_{suffix}").argtypes = [i64, ptrs, ptrs, ptrs, i64p, f32, f32, f32, i64p]
        getattr(library, f"hfso_signsgd_{suffix}").argtypes = [i64, ptrs, ptrs, i64p, f32, f32, i64p]
        getattr(library, f"hfso_sign_momentum_{suffix}").argtypes = [i64, ptrs, ptrs, ptrs, i64p, f32, f32, f32, i64p]
        for int_suffix in _INT_SUFFIX.values():
            getattr(library, f"hfso_simba_{suffix}_{int_suffix}").argtypes = [
                i64, ptrs, ptrs, ptrs, ptrs, i64p, f32, f32, i32, i32, f32, i64p
            ]


def load(required: bool) -> ctypes.CDLL | None:
    """Return the compiled kernel library, building it on first use.

    Args:
        required: Raise instead of returning None when the kernels cannot be built.

    Returns:
        The loaded library, or None when unavailable and not `required`.

    Raises:
        RuntimeError: `required` and no compiler was found or compiling failed.
    """
    global _library, _failure
    with _lock:
        if _library is None and _failure is None:
            compiler = shutil.which(os.environ.get("CXX", "c++"))
            try:
                if compiler is None:
                    raise RuntimeError("no C++ compiler found (set $CXX or install g++/clang++)")
                if not SOURCE.exists():
                    raise RuntimeError(f"kernel source {SOURCE} is missing from the installation")
                library = ctypes.CDLL(str(_build(compiler)))
                _declare(library)
                _library = library
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                _failure = str(error)
                logger.warning(f"hf_signopt: fused CPU kernels unavailable, using the foreach path ({_failure})")
    if _library is None and required:
        raise RuntimeError(f"fused=True but the fused CPU kernels are unavailable: {_failure}")
    return _library


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _numels(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])


def _counter(nonfinite_count: torch.Tensor) -> ctypes.POINTER(ctypes.c_int64):
    return ctypes.cast(nonfinite_count.data_ptr(), ctypes.POINTER(ctypes.c_int64))


def _written(*lists: list[torch.Tensor]) -> None:
    """Bump the autograd version counters of tensors the kernel wrote through raw pointers."""
    torch.autograd.graph.increment_version([t for tensors in lists for t in tensors])


def _kernel(name: str, dtype: torch.dtype):
    return getattr(load(required=True), f"hfso_{name}_{_DTYPE_SUFFIX[dtype]}")


def lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, nonfinite_count) -> None:
    """Fused Lion step; see `hf_signopt.optim._functional.lion_step`."""
    _kernel("lion", params[0].dtype)(len(params), _pointers(params), _pointers(grads), _pointers(exp_avgs),
                                     _numels(params), lr, 1.0 - lr * weight_decay, beta1, beta2,
                                     _counter(nonfinite_count))
    _written(params, exp_avgs)


def signum(params, grads, momentum_buffers, *, lr, momentum, weight_decay, nonfinite_count) -> None:
    """Fused Signum step; see `hf_signopt.optim._functional.signum_step`."""
    _kernel("signum", params[0].dtype)(len(params), _pointers(params), _pointers(grads),
                                       _pointers(momentum_buffers), _numels(params), lr,
                                       1.0 - lr * weight_decay, momentum, _counter(nonfinite_count))
    _written(params, momentum_buffers)


def signsgd(params, grads, *, lr, weight_decay, nonfinite_count) -> None:
    """Fused signSGD step (Signum with momentum 0); see `hf_signopt.optim._functional.signum_step`."""
    _kernel("signsgd", params[0].dtype)(len(params), _pointers(params), _pointers(grads), _numels(params), lr,
                                        1.0 - lr * weight_decay, _counter(nonfinite_count))
    _written(params)


def sign_momentum(params, grads, momentum_buffers, *, lr, momentum, weight_decay, nonfinite_count) -> None:
    """Fused SignMomentum step; see `hf_signopt.optim._functional.sign_momentum_step`."""
    _kernel("sign_momentum", params[0].dtype)(len(params), _pointers(params), _pointers(grads),
                                              _pointers(momentum_buffers), _numels(params), lr,
                                              1.0 - lr * weight_decay, momentum, _counter(nonfinite_count))
    _written(params, momentum_buffers)


def simba(params, grads, sign_counts, exp_avgs=(), *, lr, window_size, threshold, weight_decay, beta,
          nonfinite_count) -> None:
    """Fused Simba step; see `hf_signopt.optim._functional.simba_step`."""
    name = f"hfso_simba_{_DTYPE_SUFFIX[params[0].dtype]}_{_INT_SUFFIX[sign_counts[0].dtype]}"
    kernel = getattr(load(required=True), name)
    kernel(len(params), _pointers(params), _pointers(grads), _pointers(sign_counts),
           _pointers(exp_avgs) if exp_avgs else None, _numels(params), lr, 1.0 - lr * weight_decay,
           int(window_size * threshold), window_size, beta, _counter(nonfinite_count))
    _written(params, sign_counts, exp_avgs)
