"""Metrics file, plots, model card and measurements (hf_signopt.reporting)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_signopt.reporting import (
    StepTimeCallback,
    metric_series,
    optimizer_state_bytes,
    plot_curves,
    plot_expert_load,
    render_model_card,
    require_matplotlib,
    write_metrics_file,
)
from hf_signopt.reporting import measurements


TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "causal_lm.md"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

LOG_HISTORY = [
    {"loss": 5.0, "step": 10, "moe/maxvio": 1.5},
    {"eval_loss": 4.8, "step": 10},
    {"loss": 4.0, "step": 20, "moe/maxvio": 0.5},
    {"eval_loss": 4.1, "step": 20},
]


def test_metric_series_picks_one_key_in_order():
    assert metric_series(LOG_HISTORY, "loss") == ([10, 20], [5.0, 4.0])
    assert metric_series(LOG_HISTORY, "eval_loss") == ([10, 20], [4.8, 4.1])
    assert metric_series(LOG_HISTORY, "absent") == ([], [])


def test_metrics_file_is_strict_json_with_history(tmp_path):
    path = write_metrics_file(tmp_path / "run", {"eval_loss": 2.0, "perplexity": math.inf}, LOG_HISTORY,
                              {"expert_load": {"tokens_per_expert": [[1, 2]]}})
    content = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert content["final"] == {"eval_loss": 2.0, "perplexity": "inf"}
    assert content["log_history"] == LOG_HISTORY
    assert content["expert_load"] == {"tokens_per_expert": [[1, 2]]}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_write_pngs(tmp_path):
    curves = plot_curves({"train": metric_series(LOG_HISTORY, "loss"), "empty": ([], [])}, tmp_path / "a" / "loss.png",
                         title="Loss")
    assert _png_size(curves) == (640, 400)
    # Two runs side by side: the figure is wider than one.
    one = plot_expert_load({"a": [[1, 3], [2, 2]]}, tmp_path / "one.png")
    two = plot_expert_load({"a": [[1, 3], [2, 2]], "b": [[5, 5], [9, 1]]}, tmp_path / "two.png")
    assert _png_size(two)[0] > _png_size(one)[0]


def test_plot_inputs_are_validated(tmp_path):
    with pytest.raises(ValueError, match="every series is empty"):
        plot_curves({"x": ([], [])}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="2 x values but 1 y values"):
        plot_curves({"x": ([1, 2], [1.0])}, tmp_path / "x.png", title="t")
    with pytest.raises(ValueError, match="rectangular"):
        plot_expert_load({"a": [[1, 2], [3]]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="Layer 1 of 'a' routed no token"):
        plot_expert_load({"a": [[1, 2], [0, 0]]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same number of experts"):
        plot_expert_load({"a": [[1, 2]], "b": [[1, 2, 3]]}, tmp_path / "x.png")


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "hf-signopt\[plots\]"'):
        require_matplotlib()


CARD_ARGS = dict(
    model_name="tiny",
    recipe="pretrain_moe",
    dataset_label="tinyshakespeare",
    model_type="lossfree_moe",
    num_parameters=1234,
    optimizer_name="simba",
    optimizer_hyperparameters={"lr": 0.002, "window_size": 128, "threshold": 0.1},
    metrics={"eval_loss": 3.5, "perplexity": math.exp(3.5), "maxvio_global": 0.05, "step_seconds": 0.1},
    training={"max_steps": 500, "seed": 42},
    plots=[("Per-expert load", "expert_load.png")],
)
ROUTING = dict(balancing="loss-free", score_func="sigmoid", update_rule="rms", update_rate=0.001,
               aux_loss_coef=0.0, num_experts=8, top_k=2)


def test_model_card_metadata_and_prose(tmp_path):
    card = render_model_card(TEMPLATE, routing=ROUTING, **CARD_ARGS)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "transformers"
    assert loaded.data.tags == ["moe", "loss-free-balancing", "simba"]
    assert loaded.data.datasets == ["tinyshakespeare"]
    results = {r.metric_type: r.metric_value for r in loaded.data.eval_results}
    assert results == {"loss": 3.5, "perplexity": pytest.approx(math.exp(3.5)), "maxvio_global": 0.05}
    text = loaded.text
    assert "**sigmoid**" in text and "**rms** rule at rate `u = 0.001`" in text
    assert "(Q - F) / RMS(F - Q)" in text
    assert "| window_size | 128 |" in text
    assert "![Per-expert load](expert_load.png)" in text
    assert "Pre-trained from scratch" in text


def test_model_card_of_a_fine_tuned_dense_model(tmp_path):
    args = CARD_ARGS | {"model_type": "llama", "optimizer_name": "lion", "metrics": {"eval_loss": 2.0}}
    card = render_model_card(TEMPLATE, base_model="org/base", **args)
    assert card.data.base_model == "org/base"
    assert card.data.tags == ["lion"]
    assert "Fine-tuned from `org/base`" in card.text
    assert "e_score_correction_bias" not in card.text


def test_model_card_of_the_aux_loss_baseline():
    routing = ROUTING | {"balancing": "aux-loss", "aux_loss_coef": 0.001}
    card = render_model_card(TEMPLATE, routing=routing, **CARD_ARGS)
    assert "loss-free-balancing" not in card.data.tags
    assert "auxiliary load-balancing loss** with coefficient 0.001" in card.text


def test_optimizer_state_bytes_of_adamw():
    params = [torch.nn.Parameter(torch.randn(10, 3)), torch.nn.Parameter(torch.randn(7))]
    optimizer = torch.optim.AdamW(params)
    assert optimizer_state_bytes(optimizer) == 0
    sum(p.sum() for p in params).backward()
    optimizer.step()
    # exp_avg and exp_avg_sq in float32 per element, plus one float32 step tensor per parameter.
    assert optimizer_state_bytes(optimizer) == 2 * 4 * (30 + 7) + 2 * 4


def test_step_timer_drops_intervals_with_evaluation_or_save(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 10.0, 11.5, 20.0, 22.0])
    monkeypatch.setattr(measurements.time, "perf_counter", lambda: next(clock))
    timer = StepTimeCallback()
    timer.on_train_begin(None, None, None)
    for event in ["step", "step", "step", "evaluate", "step", "step", "save", "step", "step"]:
        getattr(timer, f"on_{event}" if event != "step" else "on_step_end")(None, None, None)
    # Steps at 0, 1, 3 | evaluate | 10, 11.5 | save | 20, 22.
    assert timer.intervals == [1.0, 2.0, 1.5, 2.0]
    assert timer.median_step_seconds == 1.75
