"""Two DDP ranks (gloo, CPU) with different data hold the same biases as one process over the global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "moe_ddp_worker.py"


def run_worker(command, out_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    out_dir.mkdir()
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.multiprocess
def test_ddp_ranks_agree_with_a_single_process_over_the_global_batch(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    run_worker([*torchrun, str(WORKER), str(tmp_path / "ddp"), "2"], tmp_path / "ddp")
    run_worker([sys.executable, str(WORKER), str(tmp_path / "single"), "4"], tmp_path / "single")
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt")

    assert torch.equal(rank0["biases"], rank1["biases"])
    assert rank0["biases"].abs().max() > 0
    assert torch.equal(rank0["biases"], single["biases"])
    assert rank0["maxvio"] == rank1["maxvio"] == pytest.approx(single["maxvio"])
    assert rank0["eval_maxvio_global"] == rank1["eval_maxvio_global"] == pytest.approx(single["eval_maxvio_global"])
    for name, value in single["params"].items():  # DDP averages the same gradient, up to rounding
        torch.testing.assert_close(rank0["params"][name], value, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(rank1["params"][name], rank0["params"][name], rtol=0, atol=0)
