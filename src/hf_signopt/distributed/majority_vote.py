"""signSGD with majority vote (Bernstein et al., 2019, "signSGD with majority vote is communication efficient and
fault tolerant"): each data-parallel rank sends one bit per gradient element, its sign, and every rank steps along
the elementwise majority of those signs.

The vote, on every rank alike: a rank votes +1 where its value is > 0 and -1 where it is < 0. A value that is
exactly 0 (or NaN) carries no sign, and one bit cannot say "abstain", so it votes +1 where `rank + element index`
is even and -1 where it is odd: zeros add no bias in either direction. The result is `sign(sum of the votes)` in
the values' dtype, 0 on a tie (possible only with an even number of ranks). So, with an even number of ranks, an
element that is 0 on every rank gets 0 and its parameter does not move; with an odd number it gets +1 or -1 by its
index. One rank (world size 1) sends nothing and the result is `sign(value)` (0 stays 0, NaN gives 0).

Communication: one `all_gather` of the packed bits, `ceil(n / 8)` bytes from each rank, where an fp32 all-reduce
moves `4 n` bytes per rank: 1/32 of the bytes at 2 ranks (a ring all-gather sends `(W - 1) ceil(n / 8)` bytes, a
ring all-reduce `2 (W - 1) / W * 4 n`).

Two ways to use it, both set up by `enable_majority_vote(ddp_model, optimizer)`:

- `majority_vote_hook`, a DDP communication hook: each gradient bucket is replaced by the vote of the ranks'
  gradient signs while backward runs (signSGD with majority vote; pair it with a sign optimizer).
- `Signum(..., majority_vote=True)` (`optim_args="majority_vote=true"` for the Trainer's `signum` and `signsgd`):
  the optimizer keeps each rank's momentum of its own gradients and votes on the momenta's signs in its step, the
  paper's Signum with majority vote. DDP then communicates nothing itself (torch's `noop_hook`).
"""

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel
from transformers.utils import logging

logger = logging.get_logger(__name__)

_SHIFTS = tuple(range(8))  # element 8 j + k of the values is bit k (little-endian) of byte j


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _vote_bits(values: torch.Tensor, rank: int, out: torch.Tensor) -> None:
    """`values` `(m, 8)` -> `out` `(m, 8)` bool, True for a +1 vote. Column k holds indices = k (mod 8), so where
    `rank + k` is even a 0 or NaN votes +1 (`not value < 0`), elsewhere -1 (`value > 0`)."""
    even = rank % 2
    torch.lt(values[:, even::2], 0, out=out[:, even::2])
    out[:, even::2].logical_not_()
    torch.gt(values[:, 1 - even :: 2], 0, out=out[:, 1 - even :: 2])


def pack_votes(values: torch.Tensor, rank: int) -> torch.Tensor:
    """One bit per element of `values` (flattened), 8 per byte, little-endian: 1 for a +1 vote, 0 for a -1 vote.

    Zeros and NaNs vote +1 where `rank + index` is even (see the module docstring). The last byte is padded.
    CPU tensors are packed by `numpy.packbits`.

    Args:
        values: Any floating-point tensor.
        rank: The voter's rank.

    Returns:
        uint8 tensor of `ceil(values.numel() / 8)` bytes on `values`' device.
    """
    flat = values.contiguous().view(-1)
    n = flat.numel()
    whole = n - n % 8
    bits = torch.empty(-(-n // 8) * 8, dtype=torch.bool, device=flat.device)
    _vote_bits(flat[:whole].view(-1, 8), rank, bits[:whole].view(-1, 8))
    if whole < n:
        tail = flat.new_zeros(8)
        tail[: n - whole] = flat[whole:]
        _vote_bits(tail.view(1, 8), rank, bits[whole:].view(1, 8))
    if bits.device.type == "cpu":
        return torch.from_numpy(np.packbits(bits.numpy(), bitorder="little"))
    return _pack_bits(bits)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """`numpy.packbits(bits, bitorder="little")` in torch ops, for devices numpy cannot read."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=bits.device)
    return (bits.view(-1, 8).to(torch.uint8) << shifts).sum(dim=1, dtype=torch.uint8)  # disjoint bits: a sum is OR


def _count_bits(packed: torch.Tensor) -> torch.Tensor:
    """Per bit position, how many rows of `packed` have it set (`numpy.unpackbits(...).sum(0)` in torch ops)."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 1).sum(dim=0, dtype=torch.int32).view(-1)


def count_votes(packed: torch.Tensor, numel: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The elementwise majority of the ranks' packed votes.

    Args:
        packed: uint8 tensor `(world_size, ceil(numel / 8))`, row r from `pack_votes(..., rank=r)`.
        numel: Number of elements voted on.
        dtype: dtype of the result.
        out: A contiguous tensor of `numel` elements and dtype `dtype` to write the result into (e.g. the gradient
            bucket the votes replace, which saves allocating, and on CPU first touching, a new one).

    Returns:
        `(numel,)` tensor of -1, 0 (a tie) or +1: `out`'s storage when given.
    """
    world = packed.shape[0]
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.numpy(), axis=1, bitorder="little")
        positive = torch.from_numpy(bits.sum(axis=0, dtype=np.uint8 if world < 256 else np.int32))
    else:
        positive = _count_bits(packed)
    # sign(positive - world / 2), exact in the result dtype up to 256 ranks (16-bit floats hold the integers to 256)
    # and in float32 beyond.
    exact = torch.float32 if world > 256 and dtype.itemsize < 4 else dtype
    positive = positive[:numel]
    votes = out.view(-1).copy_(positive) if out is not None and exact == dtype else positive.to(exact)
    votes.sub_(world / 2).sign_()
    if exact != dtype:
        votes = votes.to(dtype) if out is None else out.view(-1).copy_(votes)
    return votes


def _all_gather_votes(values: torch.Tensor, group: dist.ProcessGroup | None, rank: int, world: int,
                      async_op: bool) -> tuple[torch.Tensor, dist.Work | None]:
    """Every rank's packed votes on `values`, `(world, bytes)`, and the all-gather's work handle."""
    packed = pack_votes(values, rank)
    gathered = torch.empty(world * packed.numel(), dtype=torch.uint8, device=packed.device)
    work = dist.all_gather_single(gathered, packed, group=group, async_op=async_op)
    return gathered.view(world, -1), work


def majority_vote_signs(tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """The elementwise majority vote of every rank's signs of `tensors`, one all-gather per device.

    Must be called on every rank of `group` with tensors of the same shapes, in the same order.

    Args:
        tensors: This rank's values (gradients, momenta), any floating-point dtypes.
        group: The data-parallel process group; the default group when None.

    Returns:
        One tensor per input, shaped and typed like it: -1, 0 (a tie) or +1, the same on every rank.
    """
    rank, world = _world(group)
    if world == 1:
        return [torch.sign(t) for t in tensors]
    votes: list[torch.Tensor | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, tensor in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(i)
    for indices in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        gathered, _ = _all_gather_votes(flat, group, rank, world, async_op=False)
        _warn_if_unanimous(gathered)
        counted = count_votes(gathered, flat.numel(), flat.dtype)
        for i, vote in zip(indices, counted.split([tensors[i].numel() for i in indices])):
            votes[i] = vote.view_as(tensors[i]).to(tensors[i].dtype)
    return votes


_checked_unanimity = False


def _warn_if_unanimous(gathered: torch.Tensor) -> None:
    """Once: every rank sent the same bits, as happens when DDP has already averaged the gradients."""
    global _checked_unanimity
    if _checked_unanimity or gathered.shape[1] == 0:
        return
    _checked_unanimity = True
    if bool((gathered == gathered[:1]).all()):
        logger.warning(
            "Majority vote: every rank voted identically on every element, as when the gradients were already "
            "averaged across ranks. Under DDP call `hf_signopt.distributed.enable_majority_vote(ddp_model, "
            "optimizer)` so that DDP leaves the gradients local."
        )


def majority_vote_hook(state: dist.ProcessGroup | None, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradient becomes the majority vote of the ranks' gradient signs.

    `ddp_model.register_comm_hook(None, majority_vote_hook)` (or a process group as state). One all-gather of
    packed bits per bucket; the result is -1 / 0 / +1 in the gradient dtype, the same on every rank. Stateless, so
    DDP's bucket rebuild after the first iteration needs nothing. Pair it with a sign optimizer (signSGD, Signum,
    Lion, ...): the magnitudes are gone.

    Args:
        state: The process group to vote in, or None for the default group.
        bucket: The gradient bucket DDP passes.

    Returns:
        A future holding the voted bucket.
    """
    buffer = bucket.buffer()
    rank, world = _world(state)
    if world == 1:
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        future.set_result(torch.sign(buffer))
        return future
    gathered, work = _all_gather_votes(buffer, state, rank, world, async_op=True)

    def count(future: torch.futures.Future) -> torch.Tensor:
        future.wait()
        return count_votes(gathered, buffer.numel(), buffer.dtype, out=buffer)  # in place, as DDP's all-reduce

    return work.get_future().then(count)


def votes_in_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` (e.g. `Signum(..., majority_vote=True)`) votes across ranks in its own step."""
    return any(group.get("majority_vote") for group in optimizer.param_groups)


def enable_majority_vote(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                         process_group: dist.ProcessGroup | None = None) -> None:
    """Make data-parallel training of `model` communicate by majority vote. Call before the first backward.

    With an optimizer that votes itself (`Signum(..., majority_vote=True)`), DDP is told to leave each rank's
    gradients local (torch's `noop_hook`) and the optimizer votes on the signs of the local momenta. Otherwise
    `majority_vote_hook` replaces DDP's all-reduce; an optimizer that is not sign-based gets a warning. A model
    that is not data-parallel (one process) is left as it is.

    Args:
        model: The `DistributedDataParallel` model (what `accelerator.prepare` returns under DDP).
        optimizer: The optimizer that steps the model (unwrapped from accelerate's wrapper if needed).
        process_group: The group to vote in (default: the default group); must be the optimizer's.

    Raises:
        TypeError: If several processes train `model` but it is not a `DistributedDataParallel` module
            (FSDP and DeepSpeed shard or reduce gradients themselves).
        ValueError: If `model` already has another communication hook (calling this again is a no-op).
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if not isinstance(model, DistributedDataParallel):
        if _world(process_group)[1] > 1:
            raise TypeError(
                f"majority vote needs a torch DistributedDataParallel model, got {type(model).__name__}; "
                "FSDP and DeepSpeed reduce the gradients themselves"
            )
        return
    hook = noop_hook if optimizer is not None and votes_in_step(optimizer) else majority_vote_hook
    registered = [registered_hook for registered_hook, _ in getattr(model, "_comm_hooks", ())]
    if hook in registered:  # a second `Trainer.train()` on the same DDP model
        return
    if registered:
        raise ValueError(f"{type(model).__name__} already has a communication hook ({registered[0].__name__})")
    if hook is noop_hook:
        model.register_comm_hook(process_group, noop_hook)
        return
    from ..optim._base import SignOptimizer  # here: the optimizers import this module

    if optimizer is None or not isinstance(optimizer, SignOptimizer):
        logger.warning(
            f"Majority vote replaces every gradient by -1 / 0 / +1 votes, but the optimizer "
            f"({type(optimizer).__name__}) is not one of hf_signopt's sign optimizers: any use it makes of the "
            "gradients' magnitudes is lost."
        )
    model.register_comm_hook(process_group, majority_vote_hook)
