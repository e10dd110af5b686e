"""Time one optimizer step on a fixed parameter set and compare it with its memory-traffic bound.

All optimizers update the same parameters (32M in 64 tensors by default, float32 or bfloat16, weight
decay on, the gradients fixed): each of ours on its fused and its foreach path, torch AdamW foreach
and fused, and the peer Lion implementations that are importable (lion-pytorch, with its Triton
kernel on CUDA; torch-optimi; pytorch-optimizer; on CUDA bitsandbytes' 32-bit Lion; missing ones
are skipped). A row whose optimizer cannot be built or stepped here (say, a fused kernel this
device lacks) says so instead. After warm-up, the steps are timed in rounds, one step of each
optimizer per round, so that a noisy shared machine slows all of them alike; the median is
reported. On CUDA, each call is timed by CUDA events recorded around it.

Each round also times the bandwidth probe ``a += b`` over two float32 tensors of as many bytes as
the parameters: it reads a and b and writes a in place, 12 B per element, the access pattern of an
optimizer step. An optimizer's lower bound is the bytes it must move per parameter (read p, g and
state, write p and state: 3 x the parameter's element size + 2 x state bytes) over the probe's
bandwidth; "x bound" is the step time over that bound.

    python benchmarks/optim_step.py                      # 32M float32 parameters, torch's thread count
    python benchmarks/optim_step.py --threads 1 --steps 5
    python benchmarks/optim_step.py --numel 4194304 --only lion,adamw --dtype bfloat16
    python benchmarks/optim_step.py --device cuda        # fused = our Triton kernels
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from hf_signopt import Lion, SignMomentum, Signum, Simba

HYPER = {"lr": 1e-4, "weight_decay": 0.1}


def candidates(device: torch.device) -> dict[str, Callable]:
    """name -> factory(params): ours on each path, torch AdamW, importable peer Lions."""
    ours = {
        "Lion": lambda ps, **k: Lion(ps, **HYPER, **k),
        "Signum": lambda ps, **k: Signum(ps, **HYPER, **k),
        "signSGD": lambda ps, **k: Signum(ps, momentum=0.0, **HYPER, **k),
        "SignMomentum": lambda ps, **k: SignMomentum(ps, **HYPER, **k),
        "Simba w=127": lambda ps, **k: Simba(ps, window_size=127, **HYPER, **k),
        "Simba w=128": lambda ps, **k: Simba(ps, window_size=128, **HYPER, **k),
        "Simba ema": lambda ps, **k: Simba(ps, window_size=127, momentum="ema", **HYPER, **k),
    }
    out = {}
    for name, factory in ours.items():
        out[f"{name} (fused)"] = lambda ps, f=factory: f(ps, fused=True)
        out[f"{name} (foreach)"] = lambda ps, f=factory: f(ps, foreach=True)
    out["torch AdamW (foreach)"] = lambda ps: torch.optim.AdamW(ps, **HYPER, foreach=True)
    out["torch AdamW (fused)"] = lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)
    cuda = device.type == "cuda"
    try:
        import lion_pytorch

        name = "lion-pytorch Lion" + (" (triton)" if cuda else "")
        out[name] = lambda ps: lion_pytorch.Lion(ps, **HYPER, use_triton=cuda)
    except ImportError:
        pass
    try:
        import optimi

        out["torch-optimi Lion (foreach)"] = lambda ps: optimi.Lion(ps, **HYPER, decouple_lr=False, foreach=True)
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        out["pytorch-optimizer Lion (foreach)"] = lambda ps: pytorch_optimizer.Lion(ps, **HYPER, foreach=True)
    except ImportError:
        pass
    if cuda:
        try:
            import bitsandbytes as bnb

            out["bitsandbytes Lion (32-bit)"] = lambda ps: bnb.optim.Lion(ps, **HYPER, optim_bits=32)
        except ImportError:
            pass
    return out


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn()` takes; on CUDA, between events recorded around it on the current stream."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def state_bytes_per_param(optimizer: torch.optim.Optimizer, numel: int) -> float:
    """Bytes of per-element optimizer state (scalars such as AdamW's step excluded)."""
    total = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total / numel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=32 * 2**20, help="total parameters")
    parser.add_argument("--tensors", type=int, default=64, help="number of parameter tensors")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--only", default="", help="comma-separated substrings of the names to run")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU and a CUDA build of torch")
    wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
    factories = {n: f for n, f in candidates(device).items() if not wanted or any(w in n.lower() for w in wanted)}

    gen = torch.Generator().manual_seed(0)
    size = args.numel // args.tensors
    params = [torch.nn.Parameter(torch.randn(size, generator=gen).to(device, dtype)) for _ in range(args.tensors)]
    for p in params:
        p.grad = torch.randn(size, generator=gen).to(device, dtype)
    numel, itemsize = size * args.tensors, params[0].element_size()
    probe_numel = numel * itemsize // 4
    a, b = torch.rand(probe_numel, device=device), torch.rand(probe_numel, device=device)

    optimizers, unavailable = {}, {}
    for name, factory in factories.items():
        try:
            optimizer = factory(params)
            for _ in range(args.warmup):
                optimizer.step()
        except Exception as error:  # noqa: BLE001 - a kernel or backend this device lacks is a row, not a crash
            first_line = str(error).partition("\n")[0]
            unavailable[name] = f"{type(error).__name__}: {first_line}"
            continue
        optimizers[name] = optimizer
    probe_times, step_times = [], {name: [] for name in optimizers}
    for _ in range(args.steps):
        probe_times.append(timed(lambda: a.add_(b), device))
        for name, optimizer in optimizers.items():
            step_times[name].append(timed(optimizer.step, device))
    bandwidth = 3 * 4 * probe_numel / statistics.median(probe_times)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} thread(s)"
    count = f"{numel / 2**20:g}M" if numel >= 2**20 else f"{numel}"
    print(f"{count} {args.dtype} parameters in {args.tensors} tensors, weight decay on, {where}, "
          f"median of {args.steps} rounds after {args.warmup} warm-up steps")
    memory = "HBM" if device.type == "cuda" else "DRAM"
    print(f"{memory} bandwidth of in-place float32 a += b (read 2, write 1): {bandwidth / 1e9:.1f} GB/s")
    digits = 3 if device.type == "cuda" else 1  # steps take ~0.1 ms on a GPU
    adamw = statistics.median(step_times["torch AdamW (fused)"]) if "torch AdamW (fused)" in step_times else None
    header = (f"{'optimizer':34s} {'ms/step':>8s} {'B/param':>8s} {'bound ms':>9s} {'x bound':>8s} "
              f"{'state B/param':>13s} {'AdamW fused / this':>18s}")
    print(header)
    print("-" * len(header))
    for name in factories:
        if name in unavailable:
            print(f"{name:34s} unavailable ({unavailable[name]})")
            continue
        seconds = statistics.median(step_times[name])
        state = state_bytes_per_param(optimizers[name], numel)
        traffic = 3 * itemsize + 2 * state
        bound = traffic * numel / bandwidth
        speed = f"{adamw / seconds:17.2f}x" if adamw else f"{'-':>18s}"
        print(f"{name:34s} {seconds * 1e3:8.{digits}f} {traffic:8.0f} {bound * 1e3:9.{digits}f} "
              f"{seconds / bound:8.2f} "
              f"{state:13.0f} {speed}")


if __name__ == "__main__":
    main()
