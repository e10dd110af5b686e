"""Build, cache and call the fused C++ CPU kernels (`_cpu_kernels.cpp`): the sign optimizers' steps, and the MoE
balancer's bias update.

The kernels are plain C-ABI functions compiled with the system C++ compiler (``$CXX`` or ``c++``)
on first use, with OpenMP and the CPU's vector extensions, and cached as a shared library under
``$HF_SIGNOPT_KERNEL_CACHE`` (default: ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``),
named by a hash of the source, flags and compiler. Compiling takes about a second; no torch headers
and no ninja are involved. The library links ``libgomp.so.1``, which resolves to the OpenMP runtime
torch has already loaded, so the kernels use torch's thread count (`torch.set_num_threads`).

A compiler without OpenMP (e.g. Apple clang) gets single-threaded kernels, with a warning. If no
compiler is found or compiling fails, `load(required=False)` logs one warning and returns None,
and the optimizers use their torch ``foreach`` path instead.

Loading a library runs its code and its name is predictable, so a library is loaded only from where
no other user could have put it (the rule of OpenSSH's ``StrictModes``):

* the cache directory, resolved once to its real path (used from then on), is owned by the user and
  not writable by group or others; directories the project creates get mode 0700, and only under a
  directory that passes the next rule;
* every directory above it, up to ``/``, is owned by root or the user and is not writable by group
  or others unless it has the sticky bit (like ``/tmp``), so no one else can rename it away;
* the library is a regular file, not a symlink, owned by the user and not writable by group or
  others. It is opened with ``O_NOFOLLOW`` and checked with ``fstat`` on that descriptor, then loaded
  by path once the path is seen to still name that file (in a private directory only the user or
  root could swap it in between). It is compiled in a private temporary directory, given mode 0700
  and renamed into place.

A group-writable directory is refused even where the group holds only the user. A cache directory
that breaks the rule is not used: the kernels are built in ``~/.cache/hf_signopt/kernels`` (or, if
that breaks it too, a fresh ``tempfile.mkdtemp`` removed at exit), with one warning naming the refused
directory and why. A library that breaks it in a good directory is not loaded but rebuilt over.
"""

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import stat
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
FUSED_BIAS_RULES = {"sign": 0, "linear": 1}  # the update rules the fused bias update computes: their kernel codes
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH  # a POSIX ACL granting write shows in S_IWGRP

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


class UnsafeCacheError(RuntimeError):
    """A cache directory or library that a user other than this one could have written."""


def _compile_flags(openmp: bool) -> list[str]:
    flags = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fno-trapping-math"] + (["-fopenmp"] if openmp else [])
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def _cache_dir() -> Path:
    """Return the configured cache directory (not yet checked)."""
    root = os.environ.get("HF_SIGNOPT_KERNEL_CACHE") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def _why_not_private(info: os.stat_result) -> str | None:
    """Say why a file or directory with this status could have been written by another user, or None.

    "This user" is the effective uid: the one that owns what the process creates (the real uid too,
    except in a set-uid program, which must not trust the files of whoever started it).
    """
    if info.st_uid != os.geteuid():
        return f"it is owned by uid {info.st_uid}, not by you (uid {os.geteuid()})"
    if info.st_mode & _WRITABLE_BY_OTHERS:
        return f"it is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _check_parent(path: Path) -> None:
    """Raise `UnsafeCacheError` if another user could rename entries of the directory `path`."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):  # a symlink swapped in after realpath
        raise UnsafeCacheError(f"its parent {path} changed while being checked")
    if info.st_uid not in (0, os.geteuid()):
        raise UnsafeCacheError(f"its parent {path} is owned by uid {info.st_uid}, not by root or you")
    if info.st_mode & _WRITABLE_BY_OTHERS and not info.st_mode & stat.S_ISVTX:
        raise UnsafeCacheError(f"its parent {path} is writable by group or others without the sticky bit")


def _private_dir(directory: Path) -> Path:
    """Create `directory` (mode 0700) if missing and return its real path if it is private.

    Args:
        directory: The directory to hold compiled libraries.

    Returns:
        Its resolved path, to be used from then on (a symlink on the way is followed only once).

    Raises:
        UnsafeCacheError: The directory cannot be created, or another user could write to it or
            rename it or one of its parents away.
    """
    if not hasattr(os, "geteuid"):
        raise UnsafeCacheError("file ownership cannot be checked on this system")
    try:
        missing = [path for path in (directory, *directory.parents) if not os.path.lexists(path)]
        if missing:  # create directories only where the result could be accepted
            anchor = Path(os.path.realpath(missing[-1].parent))
            for path in (anchor, *anchor.parents):
                _check_parent(path)
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:  # made by a concurrent process meanwhile; checked below
                pass
        real = Path(os.path.realpath(directory))
        info = os.lstat(real)
        problem = "it is not a directory" if not stat.S_ISDIR(info.st_mode) else _why_not_private(info)
        if problem:
            raise UnsafeCacheError(problem)
        for parent in real.parents:
            _check_parent(parent)
    except OSError as error:
        raise UnsafeCacheError(f"it cannot be created or inspected ({error})") from error
    return real


def _kernel_dir() -> Path:
    """Return a private directory for the libraries: the configured cache if safe, else a fallback."""
    configured = _cache_dir()
    try:
        return _private_dir(configured)
    except UnsafeCacheError as error:
        refusal = error
    try:
        directory = _private_dir(Path.home() / ".cache" / "hf_signopt" / "kernels")
    except RuntimeError:  # unsafe too (UnsafeCacheError), or no home directory
        temporary = tempfile.mkdtemp(prefix="hf_signopt_kernels_")
        atexit.register(shutil.rmtree, temporary, ignore_errors=True)
        try:
            directory = _private_dir(Path(temporary))
        except UnsafeCacheError as error:
            raise UnsafeCacheError(f"not using the kernel cache {configured} because {refusal}, "
                                   f"nor {temporary} because {error}") from error
    logger.warning(f"hf_signopt: not using the kernel cache {configured} because {refusal}; building the fused "
                   f"CPU kernels in {directory} instead (set $HF_SIGNOPT_KERNEL_CACHE to a private directory)")
    return directory


def _load_private(path: Path) -> ctypes.CDLL:
    """Load the library at `path` if it is a regular file that only this user could have written.

    The file is opened without following a symlink and checked through that descriptor (`os.fstat`),
    so the check is about the file itself. It is then loaded by path, once the path is seen to still
    name the checked file; the directory is private, so only this user or root could swap it in
    between. (Loading ``/proc/self/fd/N`` instead would make glibc return whatever library it loaded
    earlier under that same name.)

    Args:
        path: A library in a directory accepted by `_private_dir`.

    Returns:
        The loaded library.

    Raises:
        FileNotFoundError: There is no library at `path`.
        UnsafeCacheError: It is a symlink or not a regular file, or another user could have written it.
        OSError: It exists but cannot be loaded.
    """
    for _ in range(3):  # a concurrent build by this user may replace it between the two looks
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            if os.path.islink(path):
                raise UnsafeCacheError("it is a symbolic link") from error
            raise
        try:
            opened = os.fstat(fd)
            problem = "it is not a regular file" if not stat.S_ISREG(opened.st_mode) else _why_not_private(opened)
            if problem:
                raise UnsafeCacheError(problem)
            if os.path.samestat(opened, os.lstat(path)):
                return ctypes.CDLL(str(path))
        finally:
            os.close(fd)
    raise UnsafeCacheError("it kept being replaced while being checked")


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    """Compile the kernels to `target` (mode 0700) in its directory.

    The compiler writes into a fresh private directory (`tempfile.mkdtemp`, mode 0700) next to
    `target`, and the result is renamed: concurrent processes never see a half-written library, and
    no one else can open the output while the linker writes it with a umask-dependent mode.

    Raises:
        RuntimeError: The compiler failed.
    """
    build_dir = tempfile.mkdtemp(prefix=f".{target.stem}-", dir=target.parent)
    try:
        output = os.path.join(build_dir, target.name)
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", output], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} {' '.join(flags)} failed:\n{result.stderr.strip()}")
        os.chmod(output, 0o700)
        os.replace(output, target)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def _build(compiler: str) -> ctypes.CDLL:
    """Load the cached library, compiling it if needed: with OpenMP, else single-threaded."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    directory = _kernel_dir()
    variants = []
    for openmp in (True, False):
        flags = _compile_flags(openmp)
        digest = hashlib.sha256("\0".join([SOURCE.read_text(), *flags, version]).encode()).hexdigest()[:16]
        variants.append((flags, directory / f"hf_signopt_kernels_{digest}.so"))
    for _, target in variants:
        try:
            return _load_private(target)
        except FileNotFoundError:
            continue
        except UnsafeCacheError as error:
            logger.warning(f"hf_signopt: not loading the cached kernel library {target} because {error}; "
                           "building a new one")
    errors = []
    for flags, target in variants:
        try:
            _compile(compiler, flags, target)
        except RuntimeError as error:
            errors.append(str(error))
            continue
        if "-fopenmp" not in flags:
            logger.warning("hf_signopt: the compiler has no OpenMP; fused CPU kernels run single-threaded")
        return _load_private(target)
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
    # the balancer's update takes its counts as a raw address (an int), the cheapest for ctypes to pass
    library.hfso_bias_update_float32.argtypes = [i64, i64, ctypes.c_void_p, ptrs, i32, f32]


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
                library = _build(compiler)
                _declare(library)  # AttributeError if a (damaged) library lacks a kernel
                _library = library
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
                _failure = str(error)
                logger.warning(
                    f"hf_signopt: fused CPU kernels unavailable, using torch operations instead ({_failure})"
                )
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


def bias_update(counts: torch.Tensor, biases: list[torch.Tensor], rule: str, rate: float) -> None:
    """Add `hf_signopt.bias_balancing.bias_update(counts, width, rule, rate)` to the biases, bit for bit, in one call.

    Args:
        counts: Contiguous int64 `(layers, width)` loads, on the CPU.
        biases: Per layer, a contiguous float32 bias of `width` values (any shape), on the CPU.
        rule: One of `FUSED_BIAS_RULES`.
        rate: Step size `u`.
    """
    load(required=True).hfso_bias_update_float32(counts.shape[0], counts.shape[1], counts.data_ptr(),
                                                 _pointers(biases), FUSED_BIAS_RULES[rule], rate)
    _written(biases)
