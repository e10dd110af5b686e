"""The sign optimizers under DeepSpeed ZeRO stage 2 through `transformers.Trainer`, against plain DDP.

One script, two engines, same model, data and seed. A tiny Llama (hidden 32, 2 layers, vocab 64, built from a
config: nothing is downloaded) trains on synthetic tokens (a fixed random successor table followed 90% of the time,
so the loss visibly falls) with `Trainer(optim=...)`, on 2 processes:

- `--engine ddp`: the Trainer's own DistributedDataParallel (gloo on CPU);
- `--engine zero2`: `TrainingArguments(deepspeed={... "zero_optimization": {"stage": 2}})`, fp32. The Trainer builds
  its hf_signopt optimizer and hands it to DeepSpeed, whose ZeRO optimizer flattens each parameter group, keeps
  only this rank's 1/2 partition and steps our optimizer on that flat partition (so its state is partitioned too).

Each run writes `losses.json` (the Trainer's per-step loss, averaged over the ranks, and grad norm, the optimizer
chain, the number of optimizer-state elements each rank holds) and `params.pt` (final weights, rank 0) to
its output directory. `--compare` launches both engines with torchrun and prints step, DDP loss, ZeRO-2 loss and
|difference|, then the largest parameter difference.

    . /work/venv/bin/activate
    python benchmarks/deepspeed_zero2.py --compare                          # simba, 10 steps, CPU, both engines
    python benchmarks/deepspeed_zero2.py --compare --optim lion --steps 10
    python benchmarks/deepspeed_zero2.py --compare --optim lion --max_grad_norm 0    # no clipping
    # one engine by hand:
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/deepspeed_zero2.py \
        --engine zero2 --optim simba --output_dir outputs/deepspeed_zero2/zero2

`--accelerator` defaults to `cuda` when CUDA is available, else `cpu` (which sets `DS_ACCELERATOR=cpu` before
DeepSpeed is imported; without oneCCL DeepSpeed's CPU accelerator uses gloo). `--zero_stage 1` or `3` runs the
other ZeRO stages with the same code.

What to expect. With 2 ranks each gradient element is averaged from the same two per-rank values in both engines
(one addition, which is commutative, and a division by 2, which is exact), whatever the bucketing, so the averaged
gradients are bitwise equal; the optimizer step is elementwise, so stepping ZeRO's flat partitions does the same
arithmetic as stepping DDP's whole tensors. The only other difference is the global norm for clipping (DeepSpeed and
torch sum the squares in a different order: the grad_norm column differs in its last digit). Simba's and signSGD's
updates ignore the gradient's scale; Lion folds the clipped gradient into its momentum, where a coefficient a few
ulps off changes an update only if the sign argument is within those ulps of 0. So the losses and weights should be
bitwise equal, and a real difference (a partition stepped twice or not at all, gradients not reduced) shows as a
weight change of 2 lr = 6e-3. Observed on 2 CPU cores (torch 2.13.0+cpu, transformers 5.24.0, deepspeed 0.19.8,
gloo): 0 difference in every step's loss and in every final weight for simba and lion over 10 steps, with clipping
active at step 1 (max_grad_norm 1.0) or at every step (0.5), and for simba under ZeRO-1 and ZeRO-3 too.

Time: about 25 s for the DDP run and 30 s for ZeRO-2 (mostly imports; the 10 steps take under a second). The first
DeepSpeed run on a machine JIT-compiles DeepSpeed's shared-memory comm op (`deepspeed_shm_comm`, about 3 minutes on
2 cores, cached in `$TORCH_EXTENSIONS_DIR` or `~/.cache/torch_extensions`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OUTPUT = Path("outputs/deepspeed_zero2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true", help="launch both engines with torchrun, print the table")
    parser.add_argument("--engine", choices=("ddp", "zero2"), default="zero2")
    parser.add_argument("--zero_stage", type=int, choices=(1, 2, 3), default=2, help="ZeRO stage of --engine zero2")
    parser.add_argument("--accelerator", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--optim", default="simba", help="an hf_signopt name: simba, lion, signum, signsgd, ...")
    parser.add_argument("--optim_args", default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=4, help="per device")
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="the Trainer's default; 0 disables")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=2, help="processes per engine (--compare)")
    parser.add_argument("--output_dir", type=Path, default=None, help=f"default: {DEFAULT_OUTPUT}/<optim>[/<engine>]")
    return parser.parse_args(argv)


def default_accelerator() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------- one run (a rank)


def deepspeed_config(stage: int) -> dict:
    """fp32 ZeRO config; "auto" lets the Trainer fill batch size, accumulation and clipping from its arguments."""
    return {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": False,
            "contiguous_gradients": True,
            # The defaults (5e8 elements) would allocate GB-sized buffers for a 20k-parameter model.
            "reduce_bucket_size": 1_000_000,
            "allgather_bucket_size": 1_000_000,
            "stage3_prefetch_bucket_size": 1_000_000,
            "stage3_param_persistence_threshold": 0,
        },
        # No "optimizer" section: the Trainer builds `optim` itself. Transformers also sets this flag then.
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def synthetic_dataset(count: int, seq_len: int, vocab: int, seed: int):
    """`count` sequences in which each token is followed by a fixed random successor 90% of the time."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=gen)
    tokens = torch.empty(count, seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (count,), generator=gen)
    noise = torch.randint(vocab, (count, seq_len), generator=gen)
    follow = torch.rand(count, seq_len, generator=gen) < 0.9
    for t in range(1, seq_len):
        tokens[:, t] = torch.where(follow[:, t], successor[tokens[:, t - 1]], noise[:, t])
    return [{"input_ids": row, "labels": row} for row in tokens]


def optimizer_chain(optimizer) -> list[str]:
    """Class names from the Trainer's optimizer down to ours (accelerate wrapper -> DeepSpeed ZeRO -> hf_signopt)."""
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        chain.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def innermost(optimizer):
    while getattr(optimizer, "optimizer", None) is not None:
        optimizer = optimizer.optimizer
    return optimizer


def train(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

    import hf_signopt  # noqa: F401  (registers the optim names)
    from hf_signopt.run import end_processes

    output_dir = args.output_dir or DEFAULT_OUTPUT / args.optim / args.engine
    set_seed(args.seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=args.seq_len, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dataset = synthetic_dataset(args.steps * args.batch_size * world, args.seq_len, config.vocab_size, args.seed)

    training_args = TrainingArguments(
        output_dir=str(output_dir),
        optim=args.optim,
        optim_args=args.optim_args,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        use_cpu=args.accelerator == "cpu",
        ddp_backend="gloo" if args.accelerator == "cpu" else None,
        ddp_find_unused_parameters=False,
        deepspeed=deepspeed_config(args.zero_stage) if args.engine == "zero2" else None,
        logging_steps=1,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    ours = innermost(trainer.optimizer)
    # Elements of optimizer state (Simba's counters, Lion's momentum) this rank holds: all of them under DDP, its
    # partition under ZeRO. (ZeRO-3 fills the inner optimizer's param_groups only during its step.)
    local_state = sum(v.numel() for s in ours.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    state_per_rank = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(state_per_rank, local_state)
    else:
        state_per_rank = [local_state]
    if args.zero_stage == 3 and args.engine == "zero2":
        from deepspeed.utils import safe_get_full_fp32_param

        params = {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in trainer.model.named_parameters()}
    else:
        params = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters()}

    if trainer.is_world_process_zero():
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        if args.engine == "zero2":
            import deepspeed

            versions["deepspeed"] = deepspeed.__version__
        result = {
            "engine": args.engine if args.engine == "ddp" else f"zero{args.zero_stage}",
            "optim": args.optim,
            "world_size": world,
            "accelerator": args.accelerator,
            "steps": [entry["step"] for entry in logs],
            "loss": [entry["loss"] for entry in logs],
            "grad_norm": [entry.get("grad_norm") for entry in logs],
            "optimizer_chain": optimizer_chain(trainer.optimizer),
            "optimizer_state_numel_per_rank": state_per_rank,
            "model_numel": sum(p.numel() for p in params.values()),
            "train_seconds": round(seconds, 2),
            "versions": versions,
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "losses.json").write_text(json.dumps(result, indent=2))
        torch.save(params, output_dir / "params.pt")
        print(json.dumps({k: v for k, v in result.items() if k not in ("loss", "grad_norm", "steps")}))
    end_processes()  # without it a DDP rank once aborted at exit ("terminate called without an active exception")


# ------------------------------------------------------------------------------------------ the --compare driver


def launch(args: argparse.Namespace, engine: str, output_dir: Path) -> float:
    forwarded = [
        "--engine", engine, "--zero_stage", str(args.zero_stage), "--accelerator", args.accelerator,
        "--optim", args.optim, "--steps", str(args.steps), "--batch_size", str(args.batch_size),
        "--seq_len", str(args.seq_len), "--learning_rate", str(args.learning_rate),
        "--weight_decay", str(args.weight_decay), "--max_grad_norm", str(args.max_grad_norm),
        "--seed", str(args.seed), "--output_dir", str(output_dir),
    ]
    if args.optim_args:
        forwarded += ["--optim_args", args.optim_args]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={args.nproc}", str(Path(__file__).resolve()), *forwarded]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if args.accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-5000:] + done.stderr[-10000:])
        raise SystemExit(f"{engine} run failed with exit status {done.returncode}")
    return seconds


def compare(args: argparse.Namespace) -> None:
    import torch

    root = args.output_dir or DEFAULT_OUTPUT / args.optim
    engines = {"ddp": root / "ddp", "zero2": root / f"zero{args.zero_stage}"}
    wall = {engine: launch(args, engine, path) for engine, path in engines.items()}
    ddp, zero = (json.loads((path / "losses.json").read_text()) for path in engines.values())
    zero_name = zero["engine"]

    print(f"optim={args.optim} steps={args.steps} world={args.nproc} accelerator={args.accelerator} "
          f"max_grad_norm={args.max_grad_norm} versions={zero['versions']}")
    print(f"{zero_name} optimizer chain: {' -> '.join(zero['optimizer_chain'])}; optimizer state elements per rank "
          f"{zero['optimizer_state_numel_per_rank']} (DDP {ddp['optimizer_state_numel_per_rank']}, "
          f"model {zero['model_numel']} parameters)")
    assert ddp["steps"] == zero["steps"], (ddp["steps"], zero["steps"])
    header = f"| step | DDP loss | {zero_name} loss | abs diff | DDP grad_norm | {zero_name} grad_norm |"
    print(header)
    print("|---:|---:|---:|---:|---:|---:|")
    diffs = []
    for step, a, b, ga, gb in zip(ddp["steps"], ddp["loss"], zero["loss"], ddp["grad_norm"], zero["grad_norm"]):
        diffs.append(abs(a - b))
        print(f"| {step} | {a:.9f} | {b:.9f} | {abs(a - b):.2e} | {ga:.7f} | {gb:.7f} |")
    p_ddp, p_zero = (torch.load(path / "params.pt") for path in engines.values())
    param_diff = max((p_ddp[k] - p_zero[k]).abs().max().item() for k in p_ddp)
    print(f"max |loss diff| {max(diffs):.3e}; max |param diff| after {args.steps} steps {param_diff:.3e} "
          f"(lr {args.learning_rate}); wall: ddp {wall['ddp']:.1f} s, {zero_name} {wall['zero2']:.1f} s")
    summary = {"max_loss_diff": max(diffs), "loss_diffs": diffs, "max_param_diff": param_diff,
               "wall_seconds": wall, "ddp": ddp, zero_name: zero}
    (root / "compare.json").write_text(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.accelerator is None:
        args.accelerator = default_accelerator()
    if args.accelerator == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed is first imported
    if args.compare:
        compare(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
