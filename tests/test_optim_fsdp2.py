"""FSDP2 (`fully_shard`, 2 ranks, gloo, CPU mesh): every sign optimizer steps the DTensor shards like one process.

The step is elementwise, so the optimizer steps each rank's local shard (the fused C++ kernel where it applies), and
the sharded run equals one process on the global batch. The runs differ only in how the gradient is reduced: the mean
of the two half-batch means, reduce-scattered, against the full-batch mean, a few ulps apart. A sign update is
unchanged by that unless an element's sign argument lies within those ulps of 0, which for the ~60 elements x 5 steps
here has a probability of about 300 x 1e-7 (float32) or 300 x 1e-16 (float64). Without such a flip both runs apply
the same update with the same elementwise arithmetic, so the parameters agree to the rounding of the update,
< 1 ulp of |p| <= 2 per step: 5 x 2.4e-7 in float32. A flip, or gradients not averaged, shows as about lr = 1e-2.
"""

import sys
from pathlib import Path

import pytest
import torch
from worker_run import run_worker

WORKER = Path(__file__).resolve().parent / "fsdp2_worker.py"
ATOL = {"float32": 1.2e-6, "float64": 1e-14}


@pytest.mark.multiprocess
def test_fsdp2_shards_step_like_one_process_over_the_global_batch(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    run_worker([*torchrun, str(WORKER), str(tmp_path / "fsdp2")], tmp_path / "fsdp2")
    run_worker([sys.executable, str(WORKER), str(tmp_path / "single")], tmp_path / "single")
    rank0, rank1 = (torch.load(tmp_path / "fsdp2" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt")

    assert len(single) == 12  # 3 optimizers x 2 paths x 2 dtypes
    for (name, path, dtype), expected in single.items():
        sharded = rank0[name, path, dtype]
        assert sharded["dtensors"] == 6 and expected["dtensors"] == 0
        impl = "fused" if (path, dtype) == ("default", "float32") else "foreach"
        assert sharded["impls"] == rank1[name, path, dtype]["impls"] == expected["impls"] == [impl]
        for key, value in expected["params"].items():
            torch.testing.assert_close(sharded["params"][key], value, rtol=0, atol=ATOL[dtype])
            assert torch.equal(rank1[name, path, dtype]["params"][key], sharded["params"][key])
