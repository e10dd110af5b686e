"""Fused single-pass Triton step kernels of the sign optimizers (CUDA; CPU through Triton's interpreter).

Each public function updates every tensor of its lists with ONE kernel launch (a multi-tensor
apply) that reads each parameter, gradient and state element once and writes each parameter and
state element once. Its arguments are those of the fused CPU kernels in
`hf_signopt.optim._cpu_kernels`, and the results are bitwise those of the per-tensor torch path
(``_functional._torch_step``), which is why the kernels spell out that path's operation order:

* ``torch.lerp(s, e, w)`` is ``fma(w, e - s, s)`` for ``w < 0.5``, else ``fma(w - 1, e - s, e)``
  (ATen's vectorised CPU kernel; GCC contracts its scalar tail to the same FMAs), the decoupled weight
  decay ``torch.add(u, p, alpha=wd)`` is ``fma(p, wd, u)``, and the update
  ``addcmul(p, u, finite, value=-lr)`` is ``p + (-lr * u) * finite``. Kernels are launched with
  ``enable_fp_fusion=False``, so only these explicit FMAs are fused (the interpreter never fuses).
* Non-finite gradient elements go through the same float arithmetic as in the torch path: the
  gradient is zeroed there, state is lerped toward itself with weight 0 and the parameter update
  is multiplied by 0. Their number is added to ``nonfinite_count`` with one atomic per block that
  saw any. Simba's counters are computed in int32 (the torch path's float values are integers).
* 16-bit parameters and state are computed in float32 and rounded once. bfloat16 is converted with
  integer bit operations (round to nearest even, NaN to 0x7FC0, as ``c10::BFloat16``), because
  Triton's interpreter does not round float32 to bfloat16 to nearest even.

The one exception is the sign of some zeros. Where ``torch.lerp``'s weight is 1 (as the 0/1 mask
of finite gradient elements is) and ``end`` is -0.0 (a -0.0 gradient element), ATen's CPU kernel
gives the zero result a sign that depends on the element's position (vector loop or scalar tail);
the kernels give it the vector loop's sign. Values compare equal either way.

Launch layout: one int64 device tensor per parameter set, the table. Its first ``num_blocks``
entries map each program (a 1-D grid, one program per block of `BLOCK_SIZE` elements of one
tensor) to ``(tensor index << 32) | block index in the tensor``; then come one row per tensor of
the tensors' ``data_ptr()``s (parameter, gradient, state...) and its element count. Element
offsets are int64, so tensors may exceed 2**31 elements. The table is built once per parameter
set and reused across steps: it is cached (the last `TABLE_CACHE_SIZE` sets) under the
``data_ptr()``s, element counts, dtypes, device and block size. A learning rate given as a 0-dim
device tensor is loaded inside the kernel, so no step synchronises with the host.

Triton is imported, and the kernels are decorated with ``triton.jit``, on first use (importing
triton takes about half a second). ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so
the kernels are decorated once per value of that variable. Testing aid: with
``HF_SIGNOPT_TRITON_ON_CPU=1`` (see `cpu_enabled`) and ``TRITON_INTERPRET=1``, Triton's
interpreter runs these kernels on CPU tensors (slowly), which is how the CPU-only test suite
checks them bit for bit.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

if TYPE_CHECKING:  # the kernel bodies run only in `_jitted`'s scope, which imports triton on first use
    import triton.language as tl  # noqa: TC004

logger = logging.get_logger(__name__)

Tensors = list[torch.Tensor]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_COUNT_BITS = {torch.int8: 8, torch.int16: 16}

# Elements per program and warps per program on GPU (16 float32 elements a thread). Part of the
# table cache key; tests lower the block size to cover many blocks per tensor in the interpreter.
BLOCK_SIZE = 4096
NUM_WARPS = 8
TABLE_CACHE_SIZE = 8

_tables: collections.OrderedDict[tuple, tuple[torch.Tensor, int]] = collections.OrderedDict()


@functools.cache
def available() -> bool:
    """Return whether triton imports (checked once; logs one warning if it does not)."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        logger.warning(f"hf_signopt: triton is unavailable, the fused Triton kernels are off ({error})")
        return False
    return True


def cpu_enabled() -> bool:
    """Return whether ``HF_SIGNOPT_TRITON_ON_CPU=1``: run the Triton kernels on CPU tensors too.

    A testing aid: it takes ``TRITON_INTERPRET=1`` as well, for Triton's interpreter.
    """
    return os.environ.get("HF_SIGNOPT_TRITON_ON_CPU") == "1"


# ---------------------------------------------------------------------------------------------
# Kernel bodies: plain functions here; `_jitted` decorates copies of them with triton.jit in a
# scope where `tl` is triton.language. Float scalars are cast to float32 first (the interpreter
# passes Python floats through as float64).
# ---------------------------------------------------------------------------------------------


def _block(table, num_blocks, ROW: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block: the address of its tensor's table row, its element offsets and mask."""
    entry = tl.load(table + tl.program_id(0))
    tensor = entry >> 32
    offsets = (entry - (tensor << 32)) * BLOCK + tl.arange(0, BLOCK)
    row = table + num_blocks + tensor * ROW
    return row, offsets, offsets < tl.load(row + ROW - 1)


def _load_float(address, offsets, mask, KIND: tl.constexpr):
    """Elements of the float tensor at `address` (float32, bfloat16 or float16 by KIND) as float32."""
    if KIND == 1:  # bfloat16 is the upper half of a float32
        bits = tl.load(address.to(tl.pointer_type(tl.uint16)) + offsets, mask=mask, other=0)
        value = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 2:
        value = tl.load(address.to(tl.pointer_type(tl.float16)) + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        value = tl.load(address.to(tl.pointer_type(tl.float32)) + offsets, mask=mask, other=0.0)
    return value


def _store_float(address, offsets, mask, value, KIND: tl.constexpr):
    """Round float32 `value` to nearest even in the tensor's dtype and store it."""
    if KIND == 1:
        bits = value.to(tl.uint32, bitcast=True)
        nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = tl.where(nan, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
        tl.store(address.to(tl.pointer_type(tl.uint16)) + offsets, rounded.to(tl.uint16), mask=mask)
    elif KIND == 2:
        tl.store(address.to(tl.pointer_type(tl.float16)) + offsets, value.to(tl.float16), mask=mask)
    else:
        tl.store(address.to(tl.pointer_type(tl.float32)) + offsets, value, mask=mask)


def _clean(grad, nonfinite_count):
    """The gradient with non-finite elements zeroed and the 0/1 float mask of the finite ones.

    Adds the number of non-finite elements to the int64 `nonfinite_count` (masked-off lanes were
    loaded as 0, which is finite).
    """
    finite = (grad.to(tl.uint32, bitcast=True) & 0x7F800000) != 0x7F800000  # exponent all ones: NaN, +-inf
    # tl.sum's own reduction: tl.sum is a jit function of triton.language, decorated in the mode of
    # the moment triton was imported, but its combine function is only compared, never called, by
    # the interpreter (which sums with numpy).
    bad = tl.reduce((~finite).to(tl.int32), 0, tl.standard._sum_combine)
    tl.atomic_add(nonfinite_count, bad.to(tl.int64), mask=bad > 0, sem="relaxed")
    return tl.where(finite, grad, 0.0), finite.to(tl.float32)


def _lerp(start, end, weight):
    """torch.lerp(start, end, weight) as ATen's CPU kernel rounds it."""
    diff = end - start
    return tl.where(weight < 0.5, tl.fma(weight, diff, start), tl.fma(weight - 1.0, diff, end))


def _sign(x):
    """torch.sign: -1, +0 or 1 (+0 for +-0 and NaN)."""
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


def _step_param(param, update, finite, lr, weight_decay, LR_TENSOR: tl.constexpr, DECAY: tl.constexpr):
    """p + (-lr * (u + wd * p)) * finite, rounded as `_functional._update_params_` rounds it."""
    if LR_TENSOR:
        lr = tl.load(lr).to(tl.float32)
    else:
        lr = tl.cast(lr, tl.float32)
    if DECAY:
        update = tl.fma(param, tl.cast(weight_decay, tl.float32), update)
    return param + (-lr * update) * finite


def _lion_kernel(table, num_blocks, lr, weight_decay, nonfinite_count, beta1_weight, beta2_weight,
                 KIND: tl.constexpr, LR_TENSOR: tl.constexpr, DECAY: tl.constexpr, BLOCK: tl.constexpr):
    row, offsets, mask = _block(table, num_blocks, 4, BLOCK)
    param = _load_float(tl.load(row), offsets, mask, KIND)
    exp_avg = _load_float(tl.load(row + 2), offsets, mask, KIND)
    grad, finite = _clean(_load_float(tl.load(row + 1), offsets, mask, KIND), nonfinite_count)
    target = _lerp(exp_avg, grad, finite)
    update = _sign(_lerp(exp_avg, target, tl.cast(beta1_weight, tl.float32)))
    param = _step_param(param, update, finite, lr, weight_decay, LR_TENSOR, DECAY)
    _store_float(tl.load(row), offsets, mask, param, KIND)
    _store_float(tl.load(row + 2), offsets, mask, _lerp(exp_avg, target, tl.cast(beta2_weight, tl.float32)), KIND)


def _signum_kernel(table, num_blocks, lr, weight_decay, nonfinite_count, momentum_weight,
                   KIND: tl.constexpr, LR_TENSOR: tl.constexpr, DECAY: tl.constexpr, BLOCK: tl.constexpr):
    row, offsets, mask = _block(table, num_blocks, 4, BLOCK)
    param = _load_float(tl.load(row), offsets, mask, KIND)
    buffer = _load_float(tl.load(row + 2), offsets, mask, KIND)
    grad, finite = _clean(_load_float(tl.load(row + 1), offsets, mask, KIND), nonfinite_count)
    buffer = _lerp(buffer, _lerp(buffer, grad, finite), tl.cast(momentum_weight, tl.float32))
    param = _step_param(param, _sign(buffer), finite, lr, weight_decay, LR_TENSOR, DECAY)
    _store_float(tl.load(row), offsets, mask, param, KIND)
    _store_float(tl.load(row + 2), offsets, mask, buffer, KIND)


def _signsgd_kernel(table, num_blocks, lr, weight_decay, nonfinite_count,
                    KIND: tl.constexpr, LR_TENSOR: tl.constexpr, DECAY: tl.constexpr, BLOCK: tl.constexpr):
    row, offsets, mask = _block(table, num_blocks, 3, BLOCK)
    param = _load_float(tl.load(row), offsets, mask, KIND)
    grad, finite = _clean(_load_float(tl.load(row + 1), offsets, mask, KIND), nonfinite_count)
    param = _step_param(param, _sign(grad), finite, lr, weight_decay, LR_TENSOR, DECAY)
    _store_float(tl.load(row), offsets, mask, param, KIND)


def _sign_momentum_kernel(table, num_blocks, lr, weight_decay, nonfinite_count, momentum_weight,
                          KIND: tl.constexpr, LR_TENSOR: tl.constexpr, DECAY: tl.constexpr, BLOCK: tl.constexpr):
    row, offsets, mask = _block(table, num_blocks, 4, BLOCK)
    param = _load_float(tl.load(row), offsets, mask, KIND)
    buffer = _load_float(tl.load(row + 2), offsets, mask, KIND)
    grad, finite = _clean(_load_float(tl.load(row + 1), offsets, mask, KIND), nonfinite_count)
    buffer = _lerp(buffer, _lerp(buffer, _sign(grad), finite), tl.cast(momentum_weight, tl.float32))
    param = _step_param(param, buffer, finite, lr, weight_decay, LR_TENSOR, DECAY)
    _store_float(tl.load(row), offsets, mask, param, KIND)
    _store_float(tl.load(row + 2), offsets, mask, buffer, KIND)


def _simba_kernel(table, num_blocks, lr, weight_decay, nonfinite_count, threshold, window_size, beta_weight,
                  KIND: tl.constexpr, LR_TENSOR: tl.constexpr, DECAY: tl.constexpr, BLOCK: tl.constexpr,
                  COUNT_BITS: tl.constexpr, EMA: tl.constexpr):
    row, offsets, mask = _block(table, num_blocks, 5 if EMA else 4, BLOCK)
    param = _load_float(tl.load(row), offsets, mask, KIND)
    grad, finite = _clean(_load_float(tl.load(row + 1), offsets, mask, KIND), nonfinite_count)
    if COUNT_BITS == 8:
        counts_address = tl.load(row + 2).to(tl.pointer_type(tl.int8))
    else:
        counts_address = tl.load(row + 2).to(tl.pointer_type(tl.int16))
    counts = tl.load(counts_address + offsets, mask=mask, other=0).to(tl.int32)
    grad_sign = (grad > 0).to(tl.int32) - (grad < 0).to(tl.int32)  # 0 where not finite
    trusted = tl.abs(counts) > threshold
    if EMA:  # u = sign(m) where |s| > k else sign(g)
        exp_avg = _load_float(tl.load(row + 3), offsets, mask, KIND)
        update = tl.where(trusted, _sign(exp_avg), grad_sign.to(tl.float32))
    else:  # u = sign(sign(g) + 2 * hardshrink(s, k)): sign(s) where |s| > k else sign(g)
        update = _sign((grad_sign + 2 * tl.where(trusted, counts, 0)).to(tl.float32))
    param = _step_param(param, update, finite, lr, weight_decay, LR_TENSOR, DECAY)
    _store_float(tl.load(row), offsets, mask, param, KIND)
    if EMA:
        exp_avg = _lerp(exp_avg, _lerp(exp_avg, grad, finite), tl.cast(beta_weight, tl.float32))
        _store_float(tl.load(row + 3), offsets, mask, exp_avg, KIND)
    counts = tl.minimum(tl.maximum(counts + grad_sign, -window_size), window_size)
    tl.store(counts_address + offsets, counts.to(counts_address.dtype.element_ty), mask=mask)


_JIT_FUNCTIONS = (_block, _load_float, _store_float, _clean, _lerp, _sign, _step_param, _lion_kernel,
                  _signum_kernel, _signsgd_kernel, _sign_momentum_kernel, _simba_kernel)


@functools.cache
def _jitted(interpret: str) -> dict[str, Any]:
    """The kernels decorated with triton.jit while ``TRITON_INTERPRET`` is `interpret`, by name.

    Each mode gets its own copies of the functions, with their own globals, so that a kernel calls
    the helpers of its own mode.
    """
    import triton
    import triton.language

    scope = dict(globals(), tl=triton.language)
    for fn in _JIT_FUNCTIONS:
        copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__)
        copy.__annotations__, copy.__qualname__, copy.__doc__ = fn.__annotations__, fn.__qualname__, fn.__doc__
        scope[fn.__name__] = triton.jit(copy)
    return scope


def _table(lists: tuple[Tensors, ...]) -> tuple[torch.Tensor, int]:
    """The launch table of aligned tensor lists and its number of blocks, from the cache if it has it."""
    params = lists[0]
    key = (params[0].device, BLOCK_SIZE, tuple(tensors[0].dtype for tensors in lists),
           tuple(p.numel() for p in params), tuple(t.data_ptr() for tensors in lists for t in tensors))
    if key in _tables:
        _tables.move_to_end(key)
        return _tables[key]
    for tensors in zip(*lists, strict=True):
        assert all(t.is_contiguous() and t.numel() == tensors[0].numel() and t.device == tensors[0].device
                   for t in tensors), "the Triton kernels take contiguous tensors of one shape and device"
    for tensors in lists:
        assert all(t.dtype == tensors[0].dtype for t in tensors), "each list holds tensors of one dtype"
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    blocks = (numels + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = int(blocks.sum())
    assert num_blocks < 2**31 and int(blocks.max()) < 2**32, "too many blocks for one launch"
    tensor_ids = torch.repeat_interleave(torch.arange(len(params)), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    entries = (tensor_ids << 32) + torch.arange(num_blocks) - first_block[tensor_ids]
    rows = torch.tensor([[t.data_ptr() for t in tensors] for tensors in zip(*lists)], dtype=torch.int64)
    table = torch.cat([entries, torch.cat([rows, numels[:, None]], 1).flatten()]).to(params[0].device)
    _tables[key] = table, num_blocks
    if len(_tables) > TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return table, num_blocks


def _launch(name: str, lists: tuple[Tensors, ...], *scalars: float, lr: float | torch.Tensor,
            weight_decay: float, nonfinite_count: torch.Tensor, **constants: int | bool) -> None:
    """Launch kernel `name` once over every block of every tensor of `lists`."""
    if not lists[0]:
        return
    table, num_blocks = _table(lists)
    if num_blocks == 0:
        return
    device = lists[0][0].device
    if isinstance(lr, torch.Tensor) and lr.device != device:
        lr = lr.item() if lr.device.type == "cpu" else lr.to(device)  # a CPU scalar: read without a device sync
    kernel: Callable = _jitted(os.environ.get("TRITON_INTERPRET", "0"))[name]
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(num_blocks,)](table, num_blocks, lr, weight_decay, nonfinite_count, *scalars,
                              KIND=_FLOAT_KINDS[lists[0][0].dtype], LR_TENSOR=isinstance(lr, torch.Tensor),
                              DECAY=weight_decay != 0.0, BLOCK=BLOCK_SIZE, **constants,
                              num_warps=NUM_WARPS, enable_fp_fusion=False)


def _written(*lists: Tensors) -> None:
    """Bump the autograd version counters of tensors the kernel wrote through raw pointers."""
    torch.autograd.graph.increment_version([t for tensors in lists for t in tensors])


def lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, nonfinite_count) -> None:
    """Fused Lion step; see `hf_signopt.optim._functional.lion_step`.

    Args:
        params: Parameters (float32, bfloat16 or float16, contiguous, one device).
        grads: Their gradients, same dtypes.
        exp_avgs: Lion's momentum ``m``, same dtypes.
        lr: Learning rate, a float or a 0-dim float32 tensor.
        beta1: Interpolation coefficient of the update direction.
        beta2: Momentum coefficient.
        weight_decay: Decoupled weight decay.
        nonfinite_count: 0-dim int64 tensor on the device, incremented by the non-finite gradient elements.
    """
    _launch("_lion_kernel", (params, grads, exp_avgs), 1.0 - beta1, 1.0 - beta2, lr=lr,
            weight_decay=weight_decay, nonfinite_count=nonfinite_count)
    _written(params, exp_avgs)


def signum(params, grads, momentum_buffers, *, lr, momentum, weight_decay, nonfinite_count) -> None:
    """Fused Signum step; see `hf_signopt.optim._functional.signum_step` and `lion` for the arguments."""
    _launch("_signum_kernel", (params, grads, momentum_buffers), 1.0 - momentum, lr=lr, weight_decay=weight_decay,
            nonfinite_count=nonfinite_count)
    _written(params, momentum_buffers)


def signsgd(params, grads, *, lr, weight_decay, nonfinite_count) -> None:
    """Fused signSGD step (Signum with momentum 0); see `hf_signopt.optim._functional.signum_step`."""
    _launch("_signsgd_kernel", (params, grads), lr=lr, weight_decay=weight_decay, nonfinite_count=nonfinite_count)
    _written(params)


def sign_momentum(params, grads, momentum_buffers, *, lr, momentum, weight_decay, nonfinite_count) -> None:
    """Fused SignMomentum step; see `hf_signopt.optim._functional.sign_momentum_step`."""
    _launch("_sign_momentum_kernel", (params, grads, momentum_buffers), 1.0 - momentum, lr=lr,
            weight_decay=weight_decay, nonfinite_count=nonfinite_count)
    _written(params, momentum_buffers)


def simba(params, grads, sign_counts, exp_avgs=(), *, lr, window_size, threshold, weight_decay, beta,
          nonfinite_count) -> None:
    """Fused Simba step; see `hf_signopt.optim._functional.simba_step`.

    Args:
        params: Parameters (float32, bfloat16 or float16, contiguous, one device).
        grads: Their gradients, same dtypes.
        sign_counts: The sign counters ``s``, all int8 or all int16.
        exp_avgs: The EMAs ``m`` (the "ema" variant), or empty (the "counts" variant).
        lr: Learning rate, a float or a 0-dim float32 tensor.
        window_size: Counter bound ``w``.
        threshold: ``|s|`` must exceed ``int(window_size * threshold)`` to trust the history.
        weight_decay: Decoupled weight decay.
        beta: EMA coefficient (the "ema" variant).
        nonfinite_count: 0-dim int64 tensor on the device, incremented by the non-finite gradient elements.
    """
    if not params:
        return
    lists = (params, grads, sign_counts, list(exp_avgs)) if exp_avgs else (params, grads, sign_counts)
    _launch("_simba_kernel", lists, int(window_size * threshold), window_size, 1.0 - beta, lr=lr,
            weight_decay=weight_decay, nonfinite_count=nonfinite_count, COUNT_BITS=_COUNT_BITS[sign_counts[0].dtype],
            EMA=bool(exp_avgs))
    _written(params, sign_counts, exp_avgs)
