"""Worker for test_majority_vote.py, one rank under `torchrun --nproc_per_node W` (gloo, CPU).

`python majority_vote_worker.py OUT_DIR CASE...`; each rank writes `OUT_DIR/rank{r}.pt`. Every rank trains on data of
its own, so the ranks' gradients differ. The test compares what the hook or optimizer produced against a majority
computed here independently, from every rank's own gradient, all-gathered in full precision without the hook.
"""

import logging
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hf_signopt import Signum
from hf_signopt.distributed import enable_majority_vote, majority_vote_hook

STEPS = 4


class Net(nn.Module):
    """Several tensors (several buckets at a small bucket cap) and one tensor whose gradient is always 0."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(13, 33)
        self.second = nn.Linear(33, 7)
        self.unused = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return self.second(torch.tanh(self.first(x))).square().mean() + 0.0 * self.unused.sum()


def batch(rank: int, step: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(16, 13, generator=torch.Generator().manual_seed(1000 * rank + step)).to(dtype)


def local_gradients(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """This rank's own gradient of every parameter, computed on a copy without DDP."""
    module.zero_grad()
    module(x).backward()
    return [p.grad.clone() for p in module.parameters()]


def gathered(tensors: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """`(world, *shape)` stacks of every rank's tensors, moved in full precision."""
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        out.append(torch.stack(parts))
    return out


def majority(stacked: torch.Tensor) -> torch.Tensor:
    """sign(sum over ranks of sign(value)): the vote when no value is exactly 0."""
    return torch.sign(torch.sign(stacked.double()).sum(dim=0)).to(stacked.dtype)


def hook_case(rank: int, world: int, dtype: torch.dtype, adversary: int | None) -> dict:
    """DDP with `majority_vote_hook` (optionally one rank negating its gradients): gradients after backward."""
    torch.manual_seed(0)
    net = Net().to(dtype)
    reference = Net().to(dtype)
    reference.load_state_dict(net.state_dict())

    def hook(state, bucket):
        if rank == adversary:
            bucket.buffer().neg_()
        return majority_vote_hook(state, bucket)

    model = DistributedDataParallel(net, bucket_cap_mb=0.001)  # about 250 float32 elements per bucket
    model.register_comm_hook(None, hook)
    optimizer = Signum(model.parameters(), lr=1e-2, momentum=0.0, weight_decay=0.0)
    record = {"voted": [], "all": [], "params": None}
    for step in range(STEPS):
        x = batch(rank, step, dtype)
        own = local_gradients(reference, x)
        optimizer.zero_grad()
        model(x).backward()
        record["voted"].append([p.grad.clone() for p in model.parameters()])
        record["all"].append(gathered(own, world))
        optimizer.step()
        reference.load_state_dict(net.state_dict())
    record["params"] = [p.detach().clone() for p in net.parameters()]
    return record


def signum_case(rank: int, world: int, resume: bool) -> dict:
    """`Signum(majority_vote=True)` under DDP set up by `enable_majority_vote`: parameters and momenta."""
    torch.manual_seed(0)
    net = Net().double()
    model = DistributedDataParallel(net)
    optimizer = Signum(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.0, majority_vote=True,
                       foreach=True)
    enable_majority_vote(model, optimizer)
    record = {"hooks": [hook.__name__ for hook, _ in model._comm_hooks], "all": [], "params": [],
              "initial": [p.detach().clone() for p in net.parameters()]}
    for step in range(STEPS):
        if resume and step == STEPS // 2:
            saved = optimizer.state_dict()
            optimizer = Signum(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.0, majority_vote=True,
                               foreach=True)
            optimizer.load_state_dict(saved)
        x = batch(rank, step, torch.float64)
        optimizer.zero_grad()
        model(x).backward()
        record["all"].append(gathered([p.grad.clone() for p in model.parameters()], world))
        optimizer.step()
        record["params"].append([p.detach().clone() for p in net.parameters()])
    record["momenta"] = [optimizer.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    return record


def warning_case(rank: int) -> dict:
    """`enable_majority_vote` with AdamW warns; a second call on the same model is a no-op."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("hf_signopt.distributed.majority_vote").addHandler(handler)
    model = DistributedDataParallel(Net())
    optimizer = torch.optim.AdamW(model.parameters())
    enable_majority_vote(model, optimizer)
    enable_majority_vote(model, optimizer)
    return {"messages": messages, "hooks": [hook.__name__ for hook, _ in model._comm_hooks]}


def trainer_case(out_dir: str) -> dict:
    """`Trainer(optim="signum", optim_args="majority_vote=true")`: the Trainer's DDP model leaves the gradients to
    the optimizer's vote."""
    from transformers import Trainer, TrainingArguments

    class Regression(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x):
            return {"loss": self.net(x)}

    torch.manual_seed(0)
    data = [{"x": x} for x in torch.randn(48, 13, generator=torch.Generator().manual_seed(5))]
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        optim="signum", optim_args="majority_vote=true", report_to=[], save_strategy="no", use_cpu=True,
    )
    trainer = Trainer(model=Regression(), args=args, train_dataset=data)
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    return {
        "hooks": [hook.__name__ for hook, _ in trainer.model_wrapped._comm_hooks],
        "params": [p.detach().clone() for p in trainer.model.parameters()],
        "momenta": [optimizer.state[p]["momentum_buffer"].clone() for p in trainer.model.parameters()],
    }


CASES = {
    "hook": lambda rank, world: {
        str(dtype): hook_case(rank, world, dtype, None) for dtype in (torch.float32, torch.bfloat16)
    },
    "adversary": lambda rank, world: hook_case(rank, world, torch.float32, adversary=world - 1),
    "signum": lambda rank, world: {
        "plain": signum_case(rank, world, resume=False), "resumed": signum_case(rank, world, resume=True)
    },
    "warning": lambda rank, world: warning_case(rank),
}


def main(out_dir: str, cases: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {case: trainer_case(out_dir) if case == "trainer" else CASES[case](rank, world) for case in cases}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
