"""Functional step math of the sign optimizers, on lists of tensors.

Each public ``*_step`` function updates parameters and optimizer state in place. It groups the
tensors by device and dtype (torch's own `Optimizer._group_tensors_by_device_and_dtype`), works
on the local shards of DTensor parameters (``fully_shard``: the step is elementwise), and runs
one of four implementations of the same formulas, chosen per group in `select_impl`:

* ``"fused"``: one pass of a compiled C++/OpenMP kernel over every element (CPU, float32 and
  bfloat16 parameters); see `hf_signopt.optim._cpu_kernels`.
* ``"triton"``: one pass of a Triton multi-tensor kernel, one launch for all tensors of a group
  (CUDA, float32/bfloat16/float16 parameters); see `hf_signopt.optim._triton_kernels`.
* ``"foreach"``: torch tensor operations (batched ``torch._foreach_*`` ops where torch has them)
  over the whole list, taken in chunks that bound the work buffers and, on CPU, fit in cache (any
  device, any float dtype). This is the path ``torch.compile`` traces.
* ``"single_tensor"``: the same torch operations applied one tensor at a time.

Non-finite gradient elements (NaN, +-inf) leave their parameter element and every state element
unchanged (weight decay included), and their number is added to a device-side int64 tensor
without any host-device synchronisation. The torch paths do this with float arithmetic, not
branches: a 0/1 mask of the finite elements multiplies the parameter update, and state is lerped
toward a target that equals the state itself where the gradient was not finite.

The learning rate may be a float or a 0-dim tensor (no recompiles when a scheduler changes it in
a compiled step); both give bitwise the same result.
"""

from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from . import _cpu_kernels, _triton_kernels

Tensors = list[torch.Tensor]

try:  # what fully_shard (FSDP2) makes of parameters
    from torch.distributed.tensor import DTensor
except ImportError:  # builds without torch.distributed, or torch < 2.5 (no public module)
    DTensor = None


def check_fused_supported(param: torch.Tensor) -> None:
    """Raise ValueError if no fused kernel can update `param` (device or dtype)."""
    kernels = _fused_kernels(param.device)
    if kernels is None or param.dtype not in kernels.SUPPORTED_DTYPES:
        raise ValueError(
            "fused=True supports CPU parameters of dtype float32 or bfloat16 and CUDA parameters of dtype "
            f"float32, bfloat16 or float16 (Triton); got {param.dtype} on {param.device}"
        )


def _fused_kernels(device: torch.device) -> ModuleType | None:
    """The fused kernel module for `device`: Triton on CUDA (and on CPU as a testing aid), else C++ on CPU."""
    if device.type == "cuda" or (device.type == "cpu" and _triton_kernels.cpu_enabled()):
        return _triton_kernels
    return _cpu_kernels if device.type == "cpu" else None


def select_impl(tensors: Tensors, foreach: bool | None, fused: bool | None) -> str:
    """Choose the step implementation for tensors that share one device and parameter dtype.

    ``fused=None, foreach=None`` (the default) picks the fused kernel where it applies (CPU: the C++
    kernel, float32 or bfloat16, and a working compiler; CUDA: the Triton kernel when triton
    imports) for plain contiguous tensors, and ``foreach`` elsewhere. ``foreach=False`` selects
    ``single_tensor``. Inside ``torch.compile`` the default is ``foreach``, which dynamo traces.

    Args:
        tensors: Every tensor the step touches (parameters first, then gradients and state).
        foreach: The optimizer's ``foreach`` flag (None: decide automatically).
        fused: The optimizer's ``fused`` flag (None: decide automatically).

    Returns:
        ``"fused"``, ``"triton"``, ``"foreach"`` or ``"single_tensor"``.

    Raises:
        RuntimeError: ``fused=True`` was requested where no fused kernel applies.
    """
    if torch.compiler.is_compiling():
        if fused:
            raise RuntimeError("fused=True kernels cannot be traced by torch.compile; use the default or foreach=True")
        return "single_tensor" if foreach is False else "foreach"
    param = tensors[0]
    kernels = _fused_kernels(param.device)
    supported = kernels is not None and param.dtype in kernels.SUPPORTED_DTYPES
    # The kernels read raw memory: plain contiguous tensors on one device (no DTensor or other
    # subclass), floats in the parameter's dtype (state left behind by a later model.to(...) is
    # not), counters int8/int16. Gradients and state are shaped like their parameters (`_local`).
    plain = all(
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.is_contiguous()
        and t.device == param.device
        and t.dtype in (param.dtype, torch.int8, torch.int16)
        for t in tensors
    )
    fused_ok = supported and plain
    if fused:
        if not fused_ok:
            problem = (f"{param.dtype} on {param.device}" if not supported
                       else "a non-contiguous, subclass, other-device or other-dtype gradient or state tensor")
            raise RuntimeError(
                "fused=True needs plain contiguous parameters, gradients and state in the parameter's dtype "
                "(CPU: float32 or bfloat16; CUDA: float32, bfloat16 or float16); got " + problem
            )
        return _load(kernels, required=True)
    if fused is None and foreach is None and fused_ok:
        impl = _load(kernels, required=False)
        if impl is not None:
            return impl
    return "single_tensor" if foreach is False else "foreach"


def _load(kernels: ModuleType, required: bool) -> str | None:
    """The impl name of a fused kernel module if it can run (raising if `required` and it cannot)."""
    if kernels is _triton_kernels:
        if not _triton_kernels.available():
            if required:
                raise RuntimeError("fused=True on CUDA needs triton (pip install 'hf-signopt[triton]')")
            return None
        return "triton"
    return "fused" if _cpu_kernels.load(required=required) is not None else None


def new_nonfinite_counter(device: torch.device) -> torch.Tensor:
    """Return a zero int64 counter of skipped non-finite gradient elements on `device`."""
    return torch.zeros((), dtype=torch.int64, device=device)


# The torch paths work through the tensors in chunks of about this many elements. On CPU, a chunk's
# parameters, gradients, state and work buffers (1 MiB each in float32) stay in cache across the
# dozen elementwise passes of a step, so only the first read and the last write of an element reach
# main memory. On other devices the chunks are large (few kernel launches); they bound the work
# buffers' memory (a few times 128 MiB) whatever the model size.
CPU_CHUNK_NUMEL = 2**18
DEVICE_CHUNK_NUMEL = 2**25


def _splittable(tensors: tuple[torch.Tensor, ...]) -> bool:
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_contiguous() for t in tensors)


def _chunks(lists: tuple[Tensors, ...], limit: int) -> Iterator[tuple[Tensors, ...]]:
    """Regroup aligned tensor lists into chunks of at most `limit` elements.

    Plain contiguous tensors larger than `limit` are cut into flat views; other tensors (strided,
    subclasses) stay whole and may exceed it. Views share their base's storage and version counter.
    """
    chunk: tuple[Tensors, ...] = tuple([] for _ in lists)
    size = 0
    for tensors in zip(*lists):
        numel = tensors[0].numel()
        if numel > limit and _splittable(tensors):
            pieces = zip(*(t.view(-1).split(limit) for t in tensors))
        else:
            pieces = [tensors]
        for piece in pieces:
            if size and size + piece[0].numel() > limit:
                yield chunk
                chunk, size = tuple([] for _ in lists), 0
            for out, t in zip(chunk, piece):
                out.append(t)
            size += piece[0].numel()
    if size:
        yield chunk


class _Workspace:
    """Flat work buffers reused from chunk to chunk, handed out as views shaped like a chunk's tensors."""

    def __init__(self, numel: int, device: torch.device) -> None:
        self.numel, self.device = numel, device
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._views: dict[tuple[str, torch.dtype, tuple[torch.Size, ...]], Tensors] = {}

    def flat(self, slot: str, dtype: torch.dtype) -> torch.Tensor:
        """The whole buffer named `slot` of `dtype` (allocated on first use)."""
        key = (slot, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self.numel, dtype=dtype, device=self.device)
        return self._buffers[key]

    def like(self, slot: str, tensors: Tensors, dtype: torch.dtype) -> Tensors:
        """Consecutive views of buffer `slot`, one per tensor, with the tensors' shapes (contents undefined)."""
        key = (slot, dtype, tuple(t.shape for t in tensors))
        if key not in self._views:  # chunks of equal shapes (the usual case) share their views
            flat, views, offset = self.flat(slot, dtype), [], 0
            for t in tensors:
                views.append(flat[offset:offset + t.numel()].view(t.shape))
                offset += t.numel()
            self._views[key] = views
        return self._views[key]


def _count(mask: torch.Tensor) -> torch.Tensor:
    """Number of ones in a 0/1 float mask as an int64 scalar tensor (float32 sums are exact to 2**24)."""
    if mask.numel() <= 2**24:
        return mask.sum(dtype=torch.float32).to(torch.int64)
    return torch.count_nonzero(mask)


def _clean(grads: Tensors, ws: _Workspace) -> tuple[Tensors, Tensors]:
    """The gradients with non-finite elements replaced by 0, and the 0/1 mask of the finite ones.

    The mask is ``clean == g``, false exactly where g is NaN or +-inf.
    """
    dtype = grads[0].dtype
    clean, finite = ws.like("clean", grads, dtype), ws.like("finite", grads, dtype)
    for c, f, g in zip(clean, finite, grads):
        torch.eq(torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0, out=c), g, out=f)
    return clean, finite


def _or_state(values: Tensors, state: Tensors, finite: Tensors, out: Tensors | None = None) -> Tensors:
    """values where finite, state elsewhere (into `out`, default in place), so that a lerp of the state
    toward the result leaves it unchanged where the gradient was not finite.

    lerp(state, values, 1) = values and lerp(state, values, 0) = state, exactly.
    """
    out = values if out is None else out
    for o, v, s, f in zip(out, values, state, finite):
        torch.lerp(s, v, f, out=o)
    return out


def _update_params_(params: Tensors, update: Tensors, finite: Tensors, *, lr: float | torch.Tensor,
                    weight_decay: float, scratch: Tensors | None = None) -> None:
    """p <- p - lr * (u + wd * p) = p * (1 - lr * wd) - lr * u where finite, p unchanged elsewhere.

    ``u + wd * p`` (with weight decay) and ``lr * u`` (for a Tensor lr) are formed in `scratch`
    (default: in `update` itself). ``p + (-1) * (lr * u) * f`` rounds exactly like
    ``p + (-lr) * u * f``, so a Tensor lr gives bitwise the float lr's result.
    """
    scratch = update if scratch is None else scratch
    if weight_decay != 0.0:
        for d, u, p in zip(scratch, update, params):
            torch.add(u, p, alpha=weight_decay, out=d)
        update = scratch
    if isinstance(lr, torch.Tensor):
        for d, u in zip(scratch, update):
            torch.mul(u, lr, out=d)
        update, lr = scratch, 1.0
    torch._foreach_addcmul_(params, update, finite, value=-lr)


def _lion(params, clean, exp_avgs, *, finite, ws, lr, beta1, beta2, weight_decay):
    target = _or_state(clean, exp_avgs, finite)
    update = ws.like("update", params, params[0].dtype)
    for u, m, g in zip(update, exp_avgs, target):
        torch.lerp(m, g, 1.0 - beta1, out=u)
    torch._foreach_sign_(update)
    _update_params_(params, update, finite, lr=lr, weight_decay=weight_decay)
    torch._foreach_lerp_(exp_avgs, target, 1.0 - beta2)


def _signum(params, clean, momentum_buffers, *, finite, ws, lr, momentum, weight_decay):
    torch._foreach_lerp_(momentum_buffers, _or_state(clean, momentum_buffers, finite), 1.0 - momentum)
    update = ws.like("update", params, params[0].dtype)
    for u, m in zip(update, momentum_buffers):
        torch.sign(m, out=u)
    _update_params_(params, update, finite, lr=lr, weight_decay=weight_decay)


def _signsgd(params, clean, *, finite, ws, lr, weight_decay):
    torch._foreach_sign_(clean)
    _update_params_(params, clean, finite, lr=lr, weight_decay=weight_decay)


def _sign_momentum(params, clean, momentum_buffers, *, finite, ws, lr, momentum, weight_decay):
    torch._foreach_sign_(clean)
    torch._foreach_lerp_(momentum_buffers, _or_state(clean, momentum_buffers, finite), 1.0 - momentum)
    _update_params_(params, momentum_buffers, finite, lr=lr, weight_decay=weight_decay, scratch=clean)


def _simba(params, clean, sign_counts, exp_avgs=(), *, finite, ws, lr, window_size, threshold, weight_decay,
           beta):
    dtype = params[0].dtype
    if exp_avgs:
        ema_target = _or_state(clean, exp_avgs, finite, out=ws.like("ema_target", params, dtype))
    grad_signs = clean
    torch._foreach_sign_(grad_signs)  # 0 where the gradient is not finite
    counts = ws.like("counts", params, dtype)  # integer counts, exact in floats (|s| <= 32767)
    torch._foreach_copy_(counts, sign_counts)
    # u = sign(h) where |s| > k = int(w * threshold), else sign(g).
    k, update = int(window_size * threshold), ws.like("update", params, dtype)
    if exp_avgs:  # the 0/1 lerp weight |s| > k selects exactly
        trust = ws.like("trust", params, dtype)
        for t, u, s, m, gs in zip(trust, update, sign_counts, exp_avgs, grad_signs):
            torch.gt(torch.abs(s), k, out=t)
            torch.lerp(gs, torch.sign(m, out=u), t, out=u)
    else:  # hardshrink(s, k) is s where |s| > k, else 0; |2s| >= 2 outweighs |sign(g)| <= 1
        for u, s, gs in zip(update, counts, grad_signs):
            torch.add(gs, torch.hardshrink(s, k, out=u), alpha=2, out=u).sign_()
    _update_params_(params, update, finite, lr=lr, weight_decay=weight_decay)
    if exp_avgs:
        torch._foreach_lerp_(exp_avgs, ema_target, 1.0 - beta)
    # Saturating s <- clamp(s + sign(g), -w, w); sign(g) is 0 where g is not finite.
    torch._foreach_add_(counts, grad_signs)
    for c in counts:
        c.clamp_(-window_size, window_size)
    torch._foreach_copy_(sign_counts, counts)


def _torch_step(kernel: Callable, lists: tuple[Tensors, ...], nonfinite_count: torch.Tensor, **hyper) -> None:
    """Run `kernel(params, clean_grads, *state, finite=, ws=, **hyper)` chunk by chunk.

    Floating-point tensors not in the work dtype (the parameter dtype, or float32 for 16-bit
    parameters) are computed on work copies and rounded back once. The kernel gets the gradients
    with non-finite elements zeroed (a work buffer it may overwrite) and `finite`, the 0/1 mask of
    finite gradient elements; it must leave parameters and state unchanged where the mask is 0.
    """
    param = lists[0][0]
    limit = CPU_CHUNK_NUMEL if param.device.type == "cpu" else DEVICE_CHUNK_NUMEL
    chunks = list(_chunks(lists, limit))
    if not chunks:  # only empty tensors
        return
    ws = _Workspace(max(sum(t.numel() for t in chunk[0]) for chunk in chunks), param.device)
    work_dtype = torch.float32 if param.dtype.itemsize < 4 else param.dtype
    finite_counts, total = [], 0
    for chunk in chunks:
        work = []
        for i, tensors in enumerate(chunk):
            if tensors[0].is_floating_point() and tensors[0].dtype != work_dtype:
                copies = ws.like(f"work{i}", tensors, work_dtype)
                torch._foreach_copy_(copies, tensors)
                work.append(copies)
            else:
                work.append(tensors)
        work[1], finite = _clean(work[1], ws)
        numel = sum(t.numel() for t in finite)
        finite_counts.append(_count(ws.flat("finite", work_dtype)[:numel]))  # the chunk's masks, end to end
        total += numel
        kernel(*work, finite=finite, ws=ws, **hyper)
        for i, (tensors, copies) in enumerate(zip(chunk, work)):
            if i != 1 and copies is not tensors:
                torch._foreach_copy_(tensors, copies)
    nonfinite_count.add_(total - torch.stack(finite_counts).sum())


def _local(lists: tuple[Tensors, ...]) -> tuple[Tensors, ...]:
    """The lists with DTensors replaced by their local shards (views of their storage).

    The step is elementwise, so stepping the shards is stepping the DTensors, without DTensor
    dispatch on every operation, provided a parameter, its gradient and its state are sharded alike.
    """
    if DTensor not in set(map(type, lists[0])):  # type(), not isinstance: this runs on every step
        return lists
    local = tuple([t._local_tensor if type(t) is DTensor else t for t in tensors] for tensors in lists)
    shapes = [t.shape for t in local[0]]
    for tensors, originals in zip(local[1:], lists[1:]):
        if [t.shape for t in tensors] != shapes:
            i = next(i for i, t in enumerate(tensors) if t.shape != shapes[i])
            raise RuntimeError(
                f"a parameter of placements {getattr(lists[0][i], 'placements', None)} and local shape "
                f"{tuple(shapes[i])} has a gradient or state of placements "
                f"{getattr(originals[i], 'placements', None)} and local shape {tuple(tensors[i].shape)}; "
                "sign optimizers step the local shards and need them sharded alike"
            )
    return local


def _device_dtype_groups(lists: tuple[Tensors, ...]) -> Iterator[tuple[Tensors, ...]]:
    """The lists split by the parameters' (device, dtype), as torch's optimizers group them.

    Only parameters and gradients go through torch's grouping (state may hold integer counters,
    which it refuses); the state lists follow by index. Inside ``torch.compile`` torch leaves
    grouping to inductor, so the lists are split here in Python instead (traced once).
    """
    if torch.compiler.is_compiling():
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(lists[0]):
            groups.setdefault((p.device, p.dtype), []).append(i)
        indices = list(groups.values())
    else:
        grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(list(lists[:2]), with_indices=True)
        indices = [group_indices for _, group_indices in grouped.values()]
    for group_indices in indices:
        yield _local(tuple([tensors[i] for i in group_indices] for tensors in lists))


def _step(name: str, torch_fn: Callable, lists: tuple[Tensors, ...], *, foreach: bool | None,
          fused: bool | None, nonfinite_counts: dict[torch.device, torch.Tensor], **hyper) -> None:
    """Run kernel `name` on each (device, dtype) group: fused C++, Triton, or `torch_fn` on the torch paths.

    `nonfinite_counts` maps each device to its int64 count of skipped gradient elements, created here on first use.
    """
    for group in _device_dtype_groups(lists):
        device = group[0][0].device
        if device not in nonfinite_counts:
            nonfinite_counts[device] = new_nonfinite_counter(device)
        impl = select_impl([t for tensors in group for t in tensors], foreach, fused)
        if impl == "fused":
            lr = hyper["lr"]
            fused_hyper = dict(hyper, lr=float(lr)) if isinstance(lr, torch.Tensor) else hyper
            getattr(_cpu_kernels, name)(*group, nonfinite_count=nonfinite_counts[device], **fused_hyper)
        elif impl == "triton":
            getattr(_triton_kernels, name)(*group, nonfinite_count=nonfinite_counts[device], **hyper)
        elif impl == "foreach":
            _torch_step(torch_fn, group, nonfinite_counts[device], **hyper)
        else:
            for tensors in zip(*group):
                _torch_step(torch_fn, tuple([t] for t in tensors), nonfinite_counts[device], **hyper)


def lion_step(params: Tensors, grads: Tensors, exp_avgs: Tensors, *, lr: float | torch.Tensor, beta1: float,
              beta2: float, weight_decay: float, foreach: bool | None, fused: bool | None,
              nonfinite_counts: dict[torch.device, torch.Tensor]) -> None:
    """Lion: c = b1*m + (1-b1)*g; p <- p*(1-lr*wd) - lr*sign(c); m <- b2*m + (1-b2)*g. See `hf_signopt.Lion`."""
    _step("lion", _lion, (params, grads, exp_avgs), lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
          foreach=foreach, fused=fused, nonfinite_counts=nonfinite_counts)


def signum_step(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, lr: float | torch.Tensor,
                momentum: float, weight_decay: float, foreach: bool | None, fused: bool | None,
                nonfinite_counts: dict[torch.device, torch.Tensor]) -> None:
    """Signum: m <- mu*m + (1-mu)*g; p <- p*(1-lr*wd) - lr*sign(m). No buffers: signSGD. See `hf_signopt.Signum`."""
    flags = dict(foreach=foreach, fused=fused, nonfinite_counts=nonfinite_counts)
    if not momentum_buffers:
        _step("signsgd", _signsgd, (params, grads), lr=lr, weight_decay=weight_decay, **flags)
    else:
        _step("signum", _signum, (params, grads, momentum_buffers), lr=lr, momentum=momentum,
              weight_decay=weight_decay, **flags)


def sign_momentum_step(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, lr: float | torch.Tensor,
                       momentum: float, weight_decay: float, foreach: bool | None, fused: bool | None,
                       nonfinite_counts: dict[torch.device, torch.Tensor]) -> None:
    """SignMomentum: m <- mu*m + (1-mu)*sign(g); p <- p*(1-lr*wd) - lr*m. See `hf_signopt.SignMomentum`."""
    _step("sign_momentum", _sign_momentum, (params, grads, momentum_buffers), lr=lr, momentum=momentum,
          weight_decay=weight_decay, foreach=foreach, fused=fused, nonfinite_counts=nonfinite_counts)


def simba_step(params: Tensors, grads: Tensors, sign_counts: Tensors, exp_avgs: Tensors, *,
               lr: float | torch.Tensor, window_size: int, threshold: float, weight_decay: float, beta: float,
               foreach: bool | None, fused: bool | None, nonfinite_counts: dict[torch.device, torch.Tensor]) -> None:
    """Simba: u = sign(h) where |s| > int(w*threshold) else sign(g); p <- p*(1-lr*wd) - lr*u.

    ``h`` is the sign counter ``s`` itself (``exp_avgs`` empty, the "counts" variant) or the EMA
    ``m`` (the "ema" variant, then ``m <- beta*m + (1-beta)*g``). Finally
    ``s <- clamp(s + sign(g), -w, w)``. See `hf_signopt.Simba`.
    """
    lists = (params, grads, sign_counts, exp_avgs) if exp_avgs else (params, grads, sign_counts)
    _step("simba", _simba, lists, lr=lr, window_size=window_size, threshold=threshold, weight_decay=weight_decay,
          beta=beta, foreach=foreach, fused=fused, nonfinite_counts=nonfinite_counts)
