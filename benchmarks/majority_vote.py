"""Majority vote against the fp32 all-reduce: bytes, communication time, and training on the main job's model.

`--part comm` (default): for `--numel` gradient elements (32M) at each `--world_sizes` (2 and 4), one step's
gradient communication on gloo loopback, timed as the median of `--repeats`: DDP's default (one fp32 all-reduce,
then the division by the world size) against the majority vote (pack the signs, one all-gather of the packed
bits, count the votes: everything `majority_vote_hook` does). Bytes each rank sends and receives are computed
from the collectives, for ring algorithms: an all-reduce of B bytes moves 2 (W - 1) / W * B each way, an
all-gather of B bytes from each rank moves (W - 1) * B. Loopback moves bytes at memory speed, so the table also
gives the vote's own compute (packing and counting, no communication) and what the bytes would take on a 10 Gbit/s
link.

`--part train`: the main job (`recipes/pretrain_moe.py`, its model, data and seed) on 2 CPU processes with
`accelerate launch`, at the main job's global batch (8 rows per rank), for `--steps` steps: signSGD + vote,
Signum + vote, Signum with DDP's all-reduce, AdamW. Writes `loss_curves.png` and `training.md` in `--output_dir`.

    python benchmarks/majority_vote.py                          # communication, ~1 min on 2 cores
    python benchmarks/majority_vote.py --part train --steps 500  # training, ~15 min on 2 cores
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_signopt.distributed import count_votes, pack_votes

REPO = Path(__file__).resolve().parent.parent
LINK_GBIT = 10  # a common data-center Ethernet link, for the bytes' transfer time
RUNS = {  # name -> (optim, optim_args, learning rate)
    "signSGD + vote": ("signsgd", "majority_vote=true", 2e-3),
    "Signum + vote": ("signum", "majority_vote=true", 2e-3),
    "Signum, fp32 all-reduce": ("signum", "", 2e-3),
    "AdamW, fp32 all-reduce": ("adamw_torch", "", 2e-3),
}


def ring_bytes(world: int, numel: int) -> dict[str, int]:
    """Bytes each rank sends (= receives) per step, for ring collectives."""
    return {"fp32 all-reduce": 2 * (world - 1) * 4 * numel // world, "majority vote": (world - 1) * -(-numel // 8)}


def _comm_rank(rank: int, world: int, numel: int, repeats: int, port: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(rank))

    # In place on the gradient, as DDP's all-reduce and the hook work on the bucket (values drift over the
    # repeats; the work does not depend on them).
    def all_reduce():
        dist.all_reduce(grad)
        grad.div_(world)

    def vote():
        packed = pack_votes(grad, rank)
        gathered = torch.empty(world * packed.numel(), dtype=torch.uint8)
        dist.all_gather_single(gathered, packed)
        count_votes(gathered.view(world, -1), numel, grad.dtype, out=grad)

    def vote_compute():  # the vote's own work, no communication
        count_votes(pack_votes(grad, rank).expand(world, -1), numel, grad.dtype, out=grad)

    times = {}
    for name, fn in (("fp32 all-reduce", all_reduce), ("majority vote", vote), ("compute", vote_compute)):
        fn()  # warm-up
        samples = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    if rank == 0:
        results.put(times)
    dist.barrier()
    dist.destroy_process_group()


def communication(numel: int, world_sizes: list[int], repeats: int) -> str:
    rows = [
        "| ranks | collective | bytes sent per rank | vs fp32 | loopback time (ms) | vs fp32 | of it pack + count (ms) "
        f"| bytes at {LINK_GBIT:g} Gbit/s (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    context = mp.get_context("spawn")
    for index, world in enumerate(world_sizes):
        results = context.Queue()
        port = 29600 + index
        processes = [context.Process(target=_comm_rank, args=(r, world, numel, repeats, port, results))
                     for r in range(world)]
        for p in processes:
            p.start()
        times = results.get()
        for p in processes:
            p.join()
        sent = ring_bytes(world, numel)
        for name in ("fp32 all-reduce", "majority vote"):
            compute = f"{1000 * times['compute']:.1f}" if name == "majority vote" else "-"
            rows.append(
                f"| {world} | {name} | {sent[name]:,} | {sent[name] / sent['fp32 all-reduce']:.4f} "
                f"| {1000 * times[name]:.1f} | {times[name] / times['fp32 all-reduce']:.2f} | {compute} "
                f"| {1000 * sent[name] * 8 / (LINK_GBIT * 1e9):.1f} |"
            )
    return "\n".join(rows)


def training(steps: int, output_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["| run | final train loss | eval loss | vs Signum, all-reduce |", "|---|---:|---:|---:|"]
    curves, evals = {}, {}
    for name, (optim, optim_args, lr) in RUNS.items():
        run_dir = output_dir / optim / (optim_args.replace("=", "-") or "allreduce")
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "recipes/accelerate/ddp_cpu.yaml"), str(REPO / "recipes/pretrain_moe.py"), "--use_cpu", "true",
            "--optim", optim, "--learning_rate", str(lr), "--max_steps", str(steps), "--eval_steps", str(steps),
            "--save_strategy", "no", "--per_device_train_batch_size", "8", "--sample_prompt", "",
            "--output_dir", str(run_dir),
        ]
        if optim_args:
            command += ["--optim_args", optim_args]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(command, check=True, cwd=REPO, env=env)
        history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
        curves[name] = [(h["step"], h["loss"]) for h in history if "loss" in h]
        evals[name] = [h["eval_loss"] for h in history if "eval_loss" in h][-1]
    reference = evals["Signum, fp32 all-reduce"]
    for name in RUNS:
        rows.append(f"| {name} | {curves[name][-1][1]:.3f} | {evals[name]:.3f} | {evals[name] / reference - 1:+.1%} |")
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        axes.plot(*zip(*points), label=name)
    axes.set(xlabel="step", ylabel="training loss", title=f"main job, 2 CPU ranks, {steps} steps")
    axes.legend()
    figure.savefig(output_dir / "loss_curves.png", dpi=120, bbox_inches="tight")
    table = "\n".join(rows)
    (output_dir / "training.md").write_text(table + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("comm", "train"), default="comm")
    parser.add_argument("--numel", type=int, default=32 * 2**20)
    parser.add_argument("--world_sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/majority_vote"))
    args = parser.parse_args()
    if args.part == "comm":
        print(communication(args.numel, args.world_sizes, args.repeats))
    else:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        print(training(args.steps, args.output_dir))


if __name__ == "__main__":
    main()
