"""Two DDP ranks (gloo, CPU) with different data hold the same biases as one process over the global batch."""

import sys
from pathlib import Path

import pytest
import torch
from worker_run import run_worker

WORKER = Path(__file__).resolve().parent / "moe_ddp_worker.py"


# Tolerance on the parameters. Each DDP micro-batch is one of the single run's (same rows, same shapes, loss scales
# differing by powers of two), so a step's gradients differ only in how its four micro-batch gradients are summed:
# (g0+g2)+(g1+g3) under DDP, ((g0+g1)+g2)+g3 alone, at most 6u*sum|g_i| apart (u = 2^-53). Later forwards differ by
# as little, but the router softmax and the loss run in float32: where an input rounds differently, such a stage's
# output can differ by twice its float32 error, <= 2*(48+2)*2^-24 ~ 6e-6 relative (the loss's softmax over 48
# logits). So a gradient entry differs by at most 6e-6*G, G the sum of its per-token |terms| (<= 0.14 here, 1 taken),
# and SGD moves the parameters by the learning rates (sum 2.5e-2) times that, clipping being a projection that never
# widens a gap: |gap| <= 1.5e-7. Observed: ~1e-17, no float32 rounding having flipped.
PARAM_ATOL = 2e-7


@pytest.mark.multiprocess
def test_ddp_ranks_agree_with_a_single_process_over_the_global_batch(tmp_path):
    """Equal biases and MaxVio need equal top-k choices. In float64 the runs' router logits (~0.1) differ by < 1e-15,
    so a choice flips only where a logit's float32 rounding differs (< 1e-15 / ulp 7e-9 ~ 1e-7 per logit) and two
    biased scores lie within a float32 ulp (~1.5e-8 against a typical gap of 5e-3: ~3e-6): < 1e-8 over the ~1e4
    router logits of a run."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    run_worker([*torchrun, str(WORKER), str(tmp_path / "ddp")], tmp_path / "ddp")
    run_worker([sys.executable, str(WORKER), str(tmp_path / "single")], tmp_path / "single")
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt")

    assert torch.equal(rank0["biases"], rank1["biases"])
    assert rank0["biases"].abs().max() > 0
    assert torch.equal(rank0["biases"], single["biases"])
    assert rank0["maxvio"] == rank1["maxvio"] == single["maxvio"]  # from equal integer counts
    assert rank0["eval_maxvio_global"] == rank1["eval_maxvio_global"] == single["eval_maxvio_global"]
    for name, value in single["params"].items():
        torch.testing.assert_close(rank0["params"][name], value, rtol=0, atol=PARAM_ATOL)
        torch.testing.assert_close(rank1["params"][name], rank0["params"][name], rtol=0, atol=0)
