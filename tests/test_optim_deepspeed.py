"""DeepSpeed ZeRO-2 through `Trainer` (2 ranks, CPU, gloo): a sign optimizer trains exactly like plain DDP.

Runs `benchmarks/deepspeed_zero2.py --compare` (which launches both engines with torchrun) for Simba. With 2 ranks both
engines average each gradient element from the same two values (a commutative addition and an exact division by 2),
and the step is elementwise, so ZeRO stepping its flat 1/2 partitions does DDP's arithmetic; only the clipping norm
is summed in another order, and Simba's update ignores the gradient's scale. Losses and weights are therefore expected
bitwise equal (observed: 0). The tolerance allows float32 rounding of the loss (~4, ulp 4.8e-7) in case a future
version reorders something harmless; a partition stepped twice or not at all moves a weight by 2 lr = 6e-3.

Needs deepspeed (not a CI dependency; `pip install deepspeed` with `DS_BUILD_OPS=0`). About a minute; the first
DeepSpeed run on a machine also JIT-compiles its shared-memory comm op (a few minutes, then cached).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "deepspeed_zero2.py"


@pytest.mark.multiprocess
def test_zero2_trains_a_sign_optimizer_like_ddp(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    command = [sys.executable, str(SCRIPT), "--compare", "--accelerator", "cpu", "--optim", "simba", "--steps", "5",
               "--output_dir", str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads((tmp_path / "compare.json").read_text())
    ddp, zero = result["ddp"], result["zero2"]
    assert zero["optimizer_chain"][-2:] == ["DeepSpeedZeroOptimizer", "Simba"]
    assert ddp["optimizer_chain"][-1] == "Simba"
    # ZeRO-2 partitions the optimizer state: each rank holds half of what a DDP rank holds.
    assert ddp["optimizer_state_numel_per_rank"] == [ddp["model_numel"]] * 2
    assert zero["optimizer_state_numel_per_rank"] == [ddp["model_numel"] // 2] * 2
    assert ddp["steps"] == zero["steps"] == [1, 2, 3, 4, 5]
    assert ddp["loss"][-1] < ddp["loss"][0] - 0.2  # it trains
    assert result["max_loss_diff"] <= 1e-6, result["loss_diffs"]
    assert result["max_param_diff"] <= 1e-6
