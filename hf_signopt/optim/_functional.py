"""Functional step math of the sign optimizers, on lists of tensors.

Each `*_step` function updates parameters and optimizer state in place for tensors that share one
device and dtype. Three implementations compute the same formulas:

* ``"fused"``: one pass of a compiled C++/OpenMP kernel over every element (CPU only, float32,
  bfloat16 and float16 parameters); see `hf_signopt.optim._cpu_kernels`.
* ``"foreach"``: torch tensor operations batched over the whole list (any device, any float dtype).
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
    fused_ok = (
        param.device.type == "cpu"
        and param.dtype in _cpu_kernels.SUPPORTED_DTYPES
        and all(t.is_contiguous() for t in tensors)
    )
    if fused:
        if not fused_ok:
            raise RuntimeError(
                "fused=True needs contiguous CPU parameters of dtype float32 or bfloat16; "
                f"got {param.dtype} on {param.device}"
            )
        _cpu_kernels.load(required=True)
        return "fused"
    if fused is None and foreach is None and fused_ok and _cpu_kernels.load(required=False) is not None:
        return "fused"
    return "single_tensor" if foreach is False else "foreach"


def new_nonfinite_counter(device: torch.device) -> torch.Tensor:
    """Return a zero int64 counter of skipped non-finite gradient elements on `device`."""
    return torch.zeros((), dtype=torch.int64, device=device)


def _finite_masks(grads: Tensors, nonfinite_count: torch.Tensor) -> Tensors:
    finite = [torch.isfinite(g) for g in grads]
    total = sum(g.numel() for g in grads)
    nonfinite_count.add_(total - torch.stack([f.sum() for f in finite]).sum())
    return finite


def _decay_(params: Tensors, finite: Tensors, lr: float, weight_decay: float) -> None:
    """p <- p * (1 - lr * wd) where the gradient is finite."""
    if weight_decay != 0.0:
        decay = 1.0 - lr * weight_decay
        torch._foreach_mul_(params, [torch.where(f, decay, 1.0) for f in finite])


def _torch_lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, nonfinite_count):
    finite = _finite_masks(grads, nonfinite_count)
    # Where g is not finite, use m in its place: lerp(m, m, w) == m exactly, so m stays unchanged.
    g_fill = [torch.where(f, g, m) for f, g, m in zip(finite, grads, exp_avgs)]
    update = torch._foreach_sign(torch._foreach_lerp(exp_avgs, g_fill, 1.0 - beta1))
    torch._foreach_mul_(update, finite)
    _decay_(params, finite, lr, weight_decay)
    torch._foreach_add_(params, update, alpha=-lr)
    torch._foreach_lerp_(exp_avgs, g_fill, 1.0 - beta2)


def _torch_signum(params, grads, momentum_buffers, *, lr, momentum, weight_decay, nonfinite_count):
    finite = _finite_masks(grads, nonfinite_count)
    if momentum_buffers:
        g_fill = [torch.where(f, g, m) for f, g, m in zip(finite, grads, momentum_buffers)]
        torch._foreach_lerp_(momentum_buffers, g_fill, 1.0 - momentum)
        update = torch._foreach_sign(momentum_buffers)
        torch._foreach_mul_(update, finite)
    else:
        update = [torch.where(f, g.sign(), 0.0) for f, g in zip(finite, grads)]
    _decay_(params, finite, lr, weight_decay)
    torch._foreach_add_(params, update, alpha=-lr)


def _torch_sign_momentum(params, grads, momentum_buffers, *, lr, momentum, weight_decay, nonfinite_count):
    finite = _finite_masks(grads, nonfinite_count)
    sign_fill = [torch.where(f, g.sign(), m) for f, g, m in zip(finite, grads, momentum_buffers)]
    torch._foreach_lerp_(momentum_buffers, sign_fill, 1.0 - momentum)
    update = torch._foreach_mul(momentum_buffers, finite)
    _decay_(params, finite, lr, weight_decay)
    torch._foreach_add_(params, update, alpha=-lr)


def _torch_simba(params, grads, sign_counts, exp_avgs, *, lr, window_size, threshold, weight_decay, beta,
                 nonfinite_count):
    finite = _finite_masks(grads, nonfinite_count)
    count_threshold = int(window_size * threshold)
    grad_signs = [torch.where(f, g.sign(), 0.0) for f, g in zip(finite, grads)]
    trusted = [(s.abs() > count_threshold) & f for s, f in zip(sign_counts, finite)]
    history = exp_avgs if exp_avgs else sign_counts
    update = [torch.where(t, h.sign(), gs) for t, h, gs in zip(trusted, history, grad_signs)]
    _decay_(params, finite, lr, weight_decay)
    torch._foreach_add_(params, update, alpha=-lr)
    if exp_avgs:
        g_fill = [torch.where(f, g, m) for f, g, m in zip(finite, grads, exp_avgs)]
        torch._foreach_lerp_(exp_avgs, g_fill, 1.0 - beta)
    for s, gs in zip(sign_counts, grad_signs):
        # Saturating s <- clamp(s + sign(g), -w, w); widen first when s + 1 could overflow the dtype.
        if window_size == torch.iinfo(s.dtype).max:
            s.copy_((s.to(torch.int32) + gs.to(torch.int32)).clamp_(-window_size, window_size))
        else:
            s.add_(gs.to(s.dtype)).clamp_(-window_size, window_size)


def _run(impl: str, torch_fn: Callable, fused_fn: Callable, lists: tuple[Tensors, ...], **hyper) -> None:
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
        hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nonfinite_count=nonfinite_count)
        if impl == "fused":
            _cpu_kernels.signsgd(params, grads, **hyper)
        elif impl == "foreach":
            _torch_signum(params, grads, [], **hyper)
        else:
            for p, g in zip(params, grads):
                _torch_signum([p], [g], [], **hyper)
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
    hyper = dict(lr=lr, window_size=window_size, threshold=threshold, weight_decay=weight_decay, beta=beta,
                 nonfinite_count=nonfinite_count)
    if impl == "fused":
        _cpu_kernels.simba(params, grads, sign_counts, exp_avgs, **hyper)
    elif impl == "foreach":
        _torch_simba(params, grads, sign_counts, exp_avgs, **hyper)
    else:
        for i, (p, g, s) in enumerate(zip(params, grads, sign_counts)):
            _torch_simba([p], [g], [s], [exp_avgs[i]] if exp_avgs else [], **hyper)
