"""Functional step math of the sign optimizers, on lists of tensors.

Each `*_step` function updates parameters and optimizer state in place for tensors that share one
device and dtype. Three implementations compute the same formulas:

* ``"fused"``: one pass of a compiled C++/OpenMP kernel over every element (CPU only, float32
  and bfloat16 parameters); see `hf_signopt.optim._cpu_kernels`.
* ``"foreach"``: torch tensor operations batched over the whole list (any device, any float dtype).
  This is the CUDA path; the project's tests run it on CPU only (no GPU was available to verify a
  fused CUDA kernel, so none is provided).
* ``"single_tensor"``: the same torch operations applied one tensor at a time (lowest peak memory).

`select_impl` is the one place that chooses between them.

Non-finite gradient elements (NaN, +-inf) leave their parameter element and every state element
unchanged (weight decay included), and their number is added to the device-side int64 tensor
``nonfinite_count`` without any host-device synchronisation.
"""

from collections.abc import Callable

import torch

from . import _cpu_kernels

Tensors = list[torch.Tensor]


def check_fused_supported(param: torch.Tensor) -> None:
    """Raise ValueError if the fused CPU kernel cannot update `param` (device or dtype)."""
    if param.device.type != "cpu" or param.dtype not in _cpu_kernels.SUPPORTED_DTYPES:
        raise ValueError(
            f"fused=True supports CPU parameters of dtype float32 or bfloat16; got {param.dtype} on {param.device}"
        )


def select_impl(tensors: Tensors, foreach: bool | None, fused: bool | None) -> str:
    """Choose the step implementation for tensors that share one device and parameter dtype.

    ``fused=None, foreach=None`` (the default) picks the fused kernel where it applies (CPU, float32
    or bfloat16, contiguous tensors, a working compiler) and ``foreach`` elsewhere, CUDA included
    (the fused kernel is CPU-only). ``foreach=False`` selects ``single_tensor``.

    Args:
        tensors: Every tensor the step touches (parameters first, then gradients and state).
        foreach: The optimizer's ``foreach`` flag (None: decide automatically).
        fused: The optimizer's ``fused`` flag (None: decide automatically).

    Returns:
        ``"fused"``, ``"foreach"`` or ``"single_tensor"``.

    Raises:
        RuntimeError: ``fused=True`` was requested where the fused kernel does not apply.
    """
    param = tensors[0]
    supported = param.device.type == "cpu" and param.dtype in _cpu_kernels.SUPPORTED_DTYPES
    # The kernel reads raw memory: plain contiguous CPU tensors only (no DTensor or other subclass),
    # floats in the parameter's dtype (state left behind by a later model.to(...) is not), counters int8/int16.
    plain = all(
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.is_contiguous()
        and t.device.type == "cpu"
        and t.dtype in (param.dtype, torch.int8, torch.int16)
        for t in tensors
    )
    fused_ok = supported and plain
    if fused:
        if not fused_ok:
            problem = (f"{param.dtype} on {param.device}" if not supported
                       else "a non-contiguous, subclass, non-CPU or other-dtype gradient or state tensor")
            raise RuntimeError(
                "fused=True needs plain contiguous CPU parameters, gradients and state of dtype float32 or "
                f"bfloat16; got {problem}"
            )
        _cpu_kernels.load(required=True)
        return "fused"
    if fused is None and foreach is None and fused_ok and _cpu_kernels.load(required=False) is not None:
        return "fused"
    return "single_tensor" if foreach is False else "foreach"


def new_nonfinite_counter(device: torch.device) -> torch.Tensor:
    """Return a zero int64 counter of skipped non-finite gradient elements on `device`."""
    return torch.zeros((), dtype=torch.int64, device=device)


def _count(mask: torch.Tensor) -> torch.Tensor:
    """Number of ones in a 0/1 float mask as an int64 scalar tensor (float32 sums are exact to 2**24)."""
    if mask.numel() <= 2**24:
        return mask.sum(dtype=torch.float32).to(torch.int64)
    return torch.count_nonzero(mask)


def _clean_grads(grads: Tensors, nonfinite_count: torch.Tensor) -> tuple[Tensors, Tensors]:
    """Return gradients with non-finite elements zeroed, and 0/1 masks (gradient dtype) of the finite ones.

    The number of non-finite elements is added to `nonfinite_count` on its device (no sync).
    """
    clean = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
    finite = [torch.eq(c, g, out=torch.empty_like(g)) for c, g in zip(clean, grads)]
    total = sum(g.numel() for g in grads)
    nonfinite_count.add_(total - torch.stack([_count(f) for f in finite]).sum())
    return clean, finite


def _masked_lerp_(targets: Tensors, sources: Tensors, finite: Tensors, weight: float) -> None:
    """targets <- lerp(targets, sources, weight) where the gradient is finite, unchanged elsewhere.

    The 0/1 masks are scaled to 0/weight in place and restored afterwards (exactly: w / w == 1).
    Low-precision targets are computed in float32 and rounded once, like the fused kernel.
    """
    if targets[0].dtype.itemsize < 4:
        work = [t.float() for t in targets]
        weights = [f.float().mul_(weight) for f in finite]
        torch._foreach_lerp_(work, [s.float() for s in sources], weights)
        torch._foreach_copy_(targets, work)
        return
    torch._foreach_mul_(finite, weight)
    torch._foreach_lerp_(targets, sources, finite)
    torch._foreach_div_(finite, weight)


def _apply_update_(params: Tensors, finite: Tensors, update: Tensors, lr: float, weight_decay: float,
                   update_is_scratch: bool) -> None:
    """p <- p - lr * (u + wd * p) where the gradient is finite; p unchanged elsewhere.

    This is ``p * (1 - lr * wd) - lr * u`` (decoupled decay first). Low-precision parameters are
    computed in float32 and rounded once, like the fused kernel.
    """
    low = params[0].dtype.itemsize < 4
    work = [p.float() for p in params] if low else params
    mask = [f.float() for f in finite] if low else finite
    if weight_decay != 0.0:
        if update_is_scratch:
            torch._foreach_add_(update, work, alpha=weight_decay)
        else:
            update = torch._foreach_add(update, work, alpha=weight_decay)
    torch._foreach_addcmul_(work, update, mask, value=-lr)
    if low:
        torch._foreach_copy_(params, work)


def _torch_lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, nonfinite_count):
    clean, finite = _clean_grads(grads, nonfinite_count)
    update = torch._foreach_lerp(exp_avgs, clean, 1.0 - beta1)
    torch._foreach_sign_(update)
    _apply_update_(params, finite, update, lr, weight_decay, update_is_scratch=True)
    _masked_lerp_(exp_avgs, clean, finite, 1.0 - beta2)


def _torch_signum(params, grads, momentum_buffers, *, lr, momentum, weight_decay, nonfinite_count):
    clean, finite = _clean_grads(grads, nonfinite_count)
    _masked_lerp_(momentum_buffers, clean, finite, 1.0 - momentum)
    update = torch._foreach_sign(momentum_buffers)
    _apply_update_(params, finite, update, lr, weight_decay, update_is_scratch=True)


def _torch_signsgd(params, grads, *, lr, weight_decay, nonfinite_count):
    clean, finite = _clean_grads(grads, nonfinite_count)
    _apply_update_(params, finite, torch._foreach_sign(clean), lr, weight_decay, update_is_scratch=True)


def _torch_sign_momentum(params, grads, momentum_buffers, *, lr, momentum, weight_decay, nonfinite_count):
    clean, finite = _clean_grads(grads, nonfinite_count)
    _masked_lerp_(momentum_buffers, torch._foreach_sign(clean), finite, 1.0 - momentum)
    _apply_update_(params, finite, momentum_buffers, lr, weight_decay, update_is_scratch=False)


def _torch_simba(params, grads, sign_counts, exp_avgs=(), *, lr, window_size, threshold, weight_decay, beta,
                 nonfinite_count):
    clean, finite = _clean_grads(grads, nonfinite_count)
    count_threshold = int(window_size * threshold)
    grad_signs = torch._foreach_sign(clean)  # 0 where the gradient is not finite
    history = exp_avgs if exp_avgs else sign_counts
    update = [torch.where(s.abs() > count_threshold, h.sign(), gs)  # promotes an int8/int16 sign to float
              for s, h, gs in zip(sign_counts, history, grad_signs)]
    _apply_update_(params, finite, update, lr, weight_decay, update_is_scratch=True)
    if exp_avgs:
        _masked_lerp_(exp_avgs, clean, finite, 1.0 - beta)
    for s, gs in zip(sign_counts, grad_signs):
        # Saturating s <- clamp(s + sign(g), -w, w); widen first when s + 1 could overflow the dtype.
        if window_size == torch.iinfo(s.dtype).max:
            s.copy_((s.to(torch.int32) + gs.to(torch.int32)).clamp_(-window_size, window_size))
        else:
            s.add_(gs.to(s.dtype)).clamp_(-window_size, window_size)


def _run(impl: str, torch_fn: Callable, fused_fn: Callable, lists: tuple[Tensors, ...], **hyper) -> None:
    """Call the fused kernel, the batched torch function, or the torch function once per tensor."""
    if impl == "fused":
        fused_fn(*lists, **hyper)
    elif impl == "foreach":
        torch_fn(*lists, **hyper)
    else:
        for tensors in zip(*lists):
            torch_fn(*([t] for t in tensors), **hyper)


def lion_step(params: Tensors, grads: Tensors, exp_avgs: Tensors, *, lr: float, beta1: float, beta2: float,
              weight_decay: float, nonfinite_count: torch.Tensor, impl: str) -> None:
    """Lion: c = b1*m + (1-b1)*g; p <- p*(1-lr*wd) - lr*sign(c); m <- b2*m + (1-b2)*g."""
    _run(impl, _torch_lion, _cpu_kernels.lion, (params, grads, exp_avgs), lr=lr, beta1=beta1, beta2=beta2,
         weight_decay=weight_decay, nonfinite_count=nonfinite_count)


def signum_step(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, lr: float, momentum: float,
                weight_decay: float, nonfinite_count: torch.Tensor, impl: str) -> None:
    """Signum: m <- mu*m + (1-mu)*g; p <- p*(1-lr*wd) - lr*sign(m). Empty buffers: signSGD."""
    if not momentum_buffers:
        _run(impl, _torch_signsgd, _cpu_kernels.signsgd, (params, grads), lr=lr, weight_decay=weight_decay,
             nonfinite_count=nonfinite_count)
        return
    _run(impl, _torch_signum, _cpu_kernels.signum, (params, grads, momentum_buffers), lr=lr, momentum=momentum,
         weight_decay=weight_decay, nonfinite_count=nonfinite_count)


def sign_momentum_step(params: Tensors, grads: Tensors, momentum_buffers: Tensors, *, lr: float, momentum: float,
                       weight_decay: float, nonfinite_count: torch.Tensor, impl: str) -> None:
    """SignMomentum: m <- mu*m + (1-mu)*sign(g); p <- p*(1-lr*wd) - lr*m."""
    _run(impl, _torch_sign_momentum, _cpu_kernels.sign_momentum, (params, grads, momentum_buffers), lr=lr,
         momentum=momentum, weight_decay=weight_decay, nonfinite_count=nonfinite_count)


def simba_step(params: Tensors, grads: Tensors, sign_counts: Tensors, exp_avgs: Tensors, *, lr: float,
               window_size: int, threshold: float, weight_decay: float, beta: float,
               nonfinite_count: torch.Tensor, impl: str) -> None:
    """Simba: u = sign(h) where |s| > int(w*threshold) else sign(g); p <- p*(1-lr*wd) - lr*u.

    ``h`` is the sign counter ``s`` itself (``exp_avgs`` empty, the "counts" variant) or the EMA
    ``m`` (the "ema" variant, then ``m <- beta*m + (1-beta)*g``). Finally
    ``s <- clamp(s + sign(g), -w, w)``.
    """
    lists = (params, grads, sign_counts, exp_avgs) if exp_avgs else (params, grads, sign_counts)
    _run(impl, _torch_simba, _cpu_kernels.simba, lists, lr=lr, window_size=window_size, threshold=threshold,
         weight_decay=weight_decay, beta=beta, nonfinite_count=nonfinite_count)
