"""The optimizer-step benchmark runs end to end on a tiny parameter set (no timings are checked)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_optim_step_benchmark_runs():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "optim_step.py"), "--numel", "4096", "--tensors", "4",
         "--steps", "1", "--warmup", "1", "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("copy bandwidth") for line in lines)
    for name in ("Lion (foreach)", "Simba w=127 (foreach)", "torch AdamW (fused)"):
        row = next(line for line in lines if line.startswith(name))
        assert len(row.split()) >= 7
    simba = next(line for line in lines if line.startswith("Simba w=127 (foreach)"))
    assert simba.split()[-2] == "1"  # int8 counters: 1 byte of state per parameter
