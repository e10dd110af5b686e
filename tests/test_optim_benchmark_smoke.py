"""The optimizer-step benchmark runs end to end on a tiny parameter set (no timings are checked)."""

import runpy
from pathlib import Path

import pytest
import torch

from hf_signopt.optim import _cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
NAME_WIDTH = 34  # the benchmark's first column
# name -> (state bytes per parameter, in the parameters' dtype: float32, bfloat16)
STATE = {
    "Lion (foreach)": (4, 2),
    "signSGD (foreach)": (0, 0),
    "Simba w=127 (foreach)": (1, 1),  # int8 counters
    "Simba w=128 (foreach)": (2, 2),  # int16 counters
    "Simba ema (foreach)": (5, 3),  # int8 counters and an EMA
    "torch AdamW (fused)": (8, 4),
}


def run_benchmark(monkeypatch, capsys, *args: str) -> dict[str, list[str]]:
    """Run the script on 4096 parameters; return its table as name -> the other columns."""
    script = ROOT / "benchmarks" / "optim_step.py"
    monkeypatch.setattr("sys.argv", [str(script), "--numel", "4096", "--tensors", "4", "--steps", "2",
                                     "--warmup", "1", *args])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith(("DRAM bandwidth of in-place", "HBM bandwidth of in-place")) for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    assert lines[header].split()[-4:] == ["AdamW", "fused", "/", "this"]
    return {line[:NAME_WIDTH].rstrip(): line[NAME_WIDTH:].split() for line in lines[header + 2:]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_optim_step_benchmark_runs_on_cpu(dtype, monkeypatch, capsys):
    rows = run_benchmark(monkeypatch, capsys, "--dtype", dtype)
    fused_kernels = _cpu_kernels.load(required=False) is not None
    for name, cells in rows.items():  # only our fused rows may lack their kernel, and only without a compiler
        assert len(cells) == 6 or (cells[0] == "unavailable" and name.endswith("(fused)") and not fused_kernels)
    element_size = 4 if dtype == "float32" else 2
    for name, state in STATE.items():
        ms, traffic, bound_ms, x_bound, state_bytes, speed = rows[name]
        state = state[dtype == "bfloat16"]
        assert float(state_bytes) == state
        assert float(traffic) == 3 * element_size + 2 * state  # read p, g, state; write p, state
        assert float(ms) >= 0 and float(bound_ms) >= 0 and float(x_bound) > 0 and speed.endswith("x")  # ms rounded
    assert rows["torch AdamW (fused)"][-1] == "1.00x"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_optim_step_benchmark_runs_on_cuda(monkeypatch, capsys):
    rows = run_benchmark(monkeypatch, capsys, "--device", "cuda", "--only", "lion,simba w=127,adamw")
    assert {"Lion (fused)", "Lion (foreach)", "Simba w=127 (fused)", "torch AdamW (fused)"} <= set(rows)
    for name, cells in rows.items():  # a kernel the GPU lacks is reported, not fatal
        assert cells[0] == "unavailable" or len(cells) == 6, name
    assert len(rows["Lion (foreach)"]) == 6
