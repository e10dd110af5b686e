"""signSGD / Signum with majority vote: the bit packing, the vote rule, the DDP hook and the voting optimizer.

The multi-process tests run `majority_vote_worker.py` under torchrun (gloo, CPU) with different data per rank and
compare with a majority computed from all ranks' own full-precision gradients. Votes are integers, so every
comparison is exact: a vote differs by at least 1, a parameter step by lr.
"""

import sys
from pathlib import Path

import pytest
import torch
from worker_run import run_worker

from hf_signopt import Signum
from hf_signopt.distributed import count_votes, majority_vote_signs, pack_votes

WORKER = Path(__file__).resolve().parent / "majority_vote_worker.py"
LR, MOMENTUM = 1e-2, 0.9


def reference_vote(values: torch.Tensor) -> torch.Tensor:
    """The documented rule, written out: `values` is `(world, n)`; a 0 or NaN of rank r at index i votes +1 if
    r + i is even, else -1; the result is the sign of the sum."""
    world, n = values.shape
    parity = (torch.arange(world)[:, None] + torch.arange(n)[None, :]) % 2
    signless = (values == 0) | values.isnan()
    votes = torch.where(signless, 1 - 2 * parity, torch.sign(values).nan_to_num()).to(torch.int64)
    return torch.sign(votes.sum(dim=0))


@pytest.mark.parametrize("world", [2, 3, 4, 5])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_packed_votes_count_to_the_documented_majority(world, n):
    generator = torch.Generator().manual_seed(world * 1000 + n)
    values = torch.randn(world, n, generator=generator)
    values[torch.rand(world, n, generator=generator) < 0.3] = 0.0  # zeros, also where all ranks have them
    values[:, : n // 4] = 0.0
    if n > 2:
        values[0, 2] = torch.nan
    packed = torch.stack([pack_votes(values[r], r) for r in range(world)])
    assert packed.dtype == torch.uint8 and packed.shape == (world, (n + 7) // 8)
    result = count_votes(packed, n, torch.float32)
    assert torch.equal(result, reference_vote(values).float())
    if world % 2 == 0:  # zero on every rank: a tie
        assert torch.all(result[: n // 4] == 0)


@pytest.mark.parametrize("world", [3, 300])  # 16-bit floats hold the counts only up to 256
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_votes_written_into_a_given_tensor_in_any_dtype(world, dtype):
    values = torch.randn(world, 99, generator=torch.Generator().manual_seed(world))
    packed = torch.stack([pack_votes(values[r], r) for r in range(world)])
    expected = reference_vote(values)
    out = torch.empty(99, dtype=dtype)
    result = count_votes(packed, 99, dtype, out=out)
    assert result.data_ptr() == out.data_ptr() and torch.equal(out, expected.to(dtype))
    assert torch.equal(count_votes(packed, 99, dtype), expected.to(dtype))


def test_torch_bit_packing_for_accelerators_equals_numpys():
    from hf_signopt.distributed.majority_vote import _count_bits, _pack_bits

    bits = torch.rand(3, 8 * 37, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = torch.stack([_pack_bits(row) for row in bits])
    assert torch.equal(packed, torch.stack([pack_votes(torch.where(row, 1.0, -1.0), 0) for row in bits]))
    assert torch.equal(_count_bits(packed), bits.sum(dim=0, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_votes_depend_only_on_the_signs_whatever_the_dtype(dtype):
    values = torch.randn(3, 101, generator=torch.Generator().manual_seed(7))
    values[:, ::5] = 0.0
    for rank in range(3):
        assert torch.equal(pack_votes(values[rank].to(dtype), rank), pack_votes(values[rank], rank))


def test_zeros_split_by_parity_and_ties_give_zero():
    # Two ranks, one voting +, one -: a tie. A lone zero next to a sign: the zero's vote depends on rank + index.
    values = torch.tensor([[1.0, 0.0, 0.0, -2.0], [-1.0, 3.0, -3.0, 0.0]])
    packed = torch.stack([pack_votes(values[r], r) for r in range(2)])
    # index 1: rank 0's zero votes -1 (0 + 1 odd), rank 1 +1: tie. index 2: rank 0's zero votes +1, rank 1 -1: tie.
    # index 3: rank 0 -1, rank 1's zero votes +1 (1 + 3 even): tie.
    assert count_votes(packed, 4, torch.float32).tolist() == [0.0, 0.0, 0.0, 0.0]
    # Three ranks: rank 2's zero decides, -1 at index 1 (2 + 1 odd) and +1 at index 2 (2 + 2 even).
    values = torch.tensor([[1.0, 2.0, -1.0], [1.0, -2.0, 1.0], [-1.0, 0.0, 0.0]])
    packed = torch.stack([pack_votes(values[r], r) for r in range(3)])
    assert count_votes(packed, 3, torch.bfloat16).tolist() == [1.0, -1.0, 1.0]


def test_one_process_votes_the_own_sign():
    values = [torch.tensor([0.5, 0.0, -2.0, torch.nan]), torch.randn(3, dtype=torch.bfloat16)]
    votes = majority_vote_signs(values)
    torch.testing.assert_close(votes[0], torch.sign(values[0]), rtol=0, atol=0, equal_nan=True)
    assert votes[1].dtype == torch.bfloat16 and torch.equal(votes[1], torch.sign(values[1]))


@pytest.mark.parametrize("momentum", [0.0, MOMENTUM])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_voting_optimizer_in_one_process_equals_signum(momentum, dtype):
    torch.manual_seed(0)
    params = [torch.randn(37, dtype=dtype), torch.randn(4, 5, dtype=dtype)]
    copies = [p.clone() for p in params]
    voting = Signum(params, lr=LR, momentum=momentum, weight_decay=0.1, majority_vote=True, foreach=True)
    plain = Signum(copies, lr=LR, momentum=momentum, weight_decay=0.1, foreach=True)
    for step in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn_like(p)
            p.grad[0] = 0.0
            q.grad = p.grad.clone()
        voting.step()
        plain.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
    assert voting.state_dict()["param_groups"][0]["majority_vote"] is True


def test_a_non_finite_gradient_votes_like_a_zero_and_is_counted():
    # Every rank must apply the same vote, so the element is not skipped as in Signum: it is decayed and
    # stepped by the vote, its momentum stays as it was, and the optimizer counts it.
    param = torch.tensor([1.0, 2.0])
    optimizer = Signum([param], lr=LR, momentum=MOMENTUM, weight_decay=0.1, majority_vote=True)
    param.grad = torch.tensor([1.0, 1.0])
    optimizer.step()
    momentum = optimizer.state[param]["momentum_buffer"].clone()
    before = param.clone()
    param.grad = torch.tensor([torch.nan, 1.0])
    optimizer.step()
    assert optimizer.nonfinite_grad_count() == 1
    assert optimizer.state[param]["momentum_buffer"][0] == momentum[0]
    assert param[0] == before[0] * (1 - LR * 0.1) - LR  # the unchanged momentum's sign


def test_majority_vote_is_validated_and_an_optim_args_key():
    with pytest.raises(TypeError, match="majority_vote must be a bool"):
        Signum([torch.zeros(2)], majority_vote=1)
    from hf_signopt.integrations import optim_arg_specs

    assert optim_arg_specs(Signum)["majority_vote"].annotation is bool


def run_ranks(tmp_path, world, *cases):
    out = tmp_path / f"world{world}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    run_worker([*torchrun, str(WORKER), str(out), *cases], out)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def check_hook(ranks, world):
    """Every voted gradient equals the majority of the ranks' own gradients; the ranks stay identical."""
    for result in ranks:
        for voted, everyone in zip(result["voted"], result["all"]):
            unused, *used = zip(voted, everyone)  # `Net.unused` is the first parameter
            for vote, stacked in used:
                assert not torch.any(stacked == 0)  # the documented zero rule is tested above
                assert vote.dtype == stacked.dtype and torch.equal(vote, torch.sign(torch.sign(stacked).sum(0)))
            vote, stacked = unused  # 0 on every rank: a tie at an even world size, +-1 at an odd one
            assert torch.all(stacked == 0)
            assert torch.all(vote == 0) if world % 2 == 0 else torch.all(vote.abs() == 1)
    for p, q in zip(ranks[0]["params"], ranks[-1]["params"]):
        assert torch.equal(p, q)


def check_voting_optimizer(ranks):
    """Parameters follow an independent simulation of Signum with majority vote, from every rank's own gradients;
    each rank keeps its own momentum; resuming from the optimizer's state dict continues exactly."""
    first = ranks[0]["signum"]["plain"]
    assert all(r["signum"]["plain"]["hooks"] == ["noop_hook"] for r in ranks)  # DDP leaves the gradients local
    params = [p.clone() for p in first["initial"][1:]]  # `Net.unused` (gradient 0) is the first parameter
    momenta = [torch.zeros_like(stacked) for stacked in first["all"][0][1:]]  # (world, *shape): one per rank
    for everyone, trained in zip(first["all"], first["params"]):
        for p, m, stacked, q in zip(params, momenta, everyone[1:], trained[1:]):
            m.lerp_(stacked, 1 - MOMENTUM)
            p -= LR * torch.sign(torch.sign(m).sum(0))
            assert torch.equal(q, p)
    for rank, r in enumerate(ranks):
        for key in ("plain", "resumed"):
            for p, q in zip(r["signum"][key]["params"][-1], first["params"][-1]):
                assert torch.equal(p, q)
        for own, m in zip(r["signum"]["plain"]["momenta"][1:], momenta):
            assert torch.equal(own, m[rank])
    assert not torch.equal(momenta[0][0], momenta[0][1])


@pytest.mark.multiprocess
def test_three_ranks_hook_adversary_voting_optimizer_and_warning(tmp_path):
    ranks = run_ranks(tmp_path, 3, "hook", "adversary", "signum", "warning", "trainer")
    for dtype in ("torch.float32", "torch.bfloat16"):
        check_hook([r["hook"][dtype] for r in ranks], 3)
    # Rank 2 negates its gradients: wherever ranks 0 and 1 agree, the vote is theirs.
    agreed = disagreed = 0
    for voted, everyone in zip(ranks[0]["adversary"]["voted"], ranks[0]["adversary"]["all"]):
        for vote, stacked in zip(voted[1:], everyone[1:]):
            honest = torch.sign(stacked[:2])
            agree = honest[0] == honest[1]
            assert torch.equal(vote[agree], honest[0][agree])
            agreed, disagreed = agreed + int(agree.sum()), disagreed + int((~agree).sum())
    assert agreed > 100 and disagreed > 100  # both cases occur
    check_voting_optimizer(ranks)
    for r in ranks:
        assert r["warning"]["hooks"] == ["majority_vote_hook"]
        assert len(r["warning"]["messages"]) == 1 and "AdamW" in r["warning"]["messages"][0]
    # The Trainer with optim_args="majority_vote=true": DDP left the gradients local (the ranks' momenta differ)
    # and the ranks' parameters stayed identical.
    trained = [r["trainer"] for r in ranks]
    assert all(t["hooks"] == ["noop_hook"] for t in trained)
    for p, q in zip(trained[0]["params"], trained[-1]["params"]):
        assert torch.equal(p, q)
    assert not torch.equal(trained[0]["momenta"][1], trained[1]["momenta"][1])


@pytest.mark.multiprocess
def test_four_ranks_hook_and_voting_optimizer(tmp_path):
    ranks = run_ranks(tmp_path, 4, "hook", "signum")
    for dtype in ("torch.float32", "torch.bfloat16"):
        check_hook([r["hook"][dtype] for r in ranks], 4)
    check_voting_optimizer(ranks)
