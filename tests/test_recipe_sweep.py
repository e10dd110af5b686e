"""Recipe 3's sweep (recipes/compare_optimizers.py): grids, seeds, marks, best-of selection, a tiny sweep end to end."""

import json
import math
import shutil
from pathlib import Path

import datasets
import pytest
from transformers import HfArgumentParser, TrainingArguments

import compare_optimizers
from compare_optimizers import (
    DEFAULT_GRID,
    ComparisonArguments,
    best_settings,
    parse_grid,
    run_arguments,
    run_status,
    summarize_settings,
    sweep_plan,
)
from recipe_utils import CORPUS, plot_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------------------------
# The grid and the plan.

def test_parse_grid_types_each_value():
    optim, grid = parse_grid(" lion : learning_rate=1e-4, 3e-4 ;window_size=64;momentum=ema,none ")
    assert optim == "lion"
    assert grid == {"learning_rate": [0.0001, 0.0003], "window_size": [64], "momentum": ["ema", "none"]}
    assert [type(value) for values in grid.values() for value in values] == [float, float, int, str, str]


@pytest.mark.parametrize(("spec", "message"), [
    ("learning_rate=1e-3", "is not of the form 'optim:key=v1,v2"),
    ("lion:", "is not of the form 'optim:key=v1,v2"),
    ("lion:learning_rate", "'learning_rate' is not of the form 'key=v1,v2"),
    ("lion:learning_rate=1e-3,", "is not of the form 'key=v1,v2"),
    ("lion:=1e-3", "is not of the form 'key=v1,v2"),
    ("lion:learning_rate=1e-3;learning_rate=2e-3", "each key once"),
    ("lion:learning_rate=1e-3,0.001", "each of its values once"),
])
def test_parse_grid_rejects_malformed_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(spec)


def test_comparison_arguments_validate_the_sweep_flags():
    assert not ComparisonArguments().is_sweep
    assert ComparisonArguments(sweep=True).is_sweep and ComparisonArguments(seeds=[0]).is_sweep
    given = ComparisonArguments(optimizers=["lion", "simba"], grid=["simba:threshold=0.1,0.3"])
    assert given.is_sweep and given.grids == {"simba": {"threshold": [0.1, 0.3]}}
    with pytest.raises(ValueError, match=r"--grid adamw_torch: each grid names one of --optimizers \['lion'\]"):
        ComparisonArguments(optimizers=["lion"], grid=["adamw_torch:learning_rate=1e-3"])
    with pytest.raises(ValueError, match="--grid lion: each grid names one of --optimizers"):
        ComparisonArguments(optimizers=["lion"], grid=["lion:learning_rate=1e-3", "lion:weight_decay=1.0"])
    with pytest.raises(ValueError, match=r"--sweep has no default grid for \['adafactor'\]"):
        ComparisonArguments(optimizers=["lion", "adafactor"], sweep=True)
    assert ComparisonArguments(optimizers=["adafactor"], sweep=True, grid=["adafactor:learning_rate=1e-3"]).is_sweep
    with pytest.raises(ValueError, match=r"seeds must be distinct, got \[1, 1\]"):
        ComparisonArguments(seeds=[1, 1])
    with pytest.raises(ValueError, match="collapse_maxvio must be > 0, got 0"):
        ComparisonArguments(collapse_maxvio=0)


def test_the_default_grid_covers_the_default_optimizers_with_learning_rate_and_weight_decay():
    assert list(DEFAULT_GRID) == ComparisonArguments().optimizers
    for grid in DEFAULT_GRID.values():
        assert list(grid) == ["learning_rate", "weight_decay"]
    runs = sweep_plan(DEFAULT_GRID, {optim: {} for optim in DEFAULT_GRID}, seeds=[42])
    assert len(runs) == 48  # the run count the module docstring's duration estimate is for


def test_sweep_plan_expands_each_grid_times_the_seeds_in_order():
    grids = {"lion": {"learning_rate": [1e-4, 3e-4], "beta2": [0.98, 0.99]}, "adamw_torch": {}}
    base = {"lion": {"learning_rate": 2e-3, "weight_decay": 0.1}, "adamw_torch": {"learning_rate": 2e-3,
                                                                                   "weight_decay": 0.1}}
    plan = sweep_plan(grids, base, seeds=[0, 7])
    lion = [(run["setting"]["learning_rate"], run["setting"]["beta2"], run["seed"]) for run in plan[:8]]
    assert lion == [(1e-4, 0.98, 0), (1e-4, 0.98, 7), (1e-4, 0.99, 0), (1e-4, 0.99, 7),
                    (3e-4, 0.98, 0), (3e-4, 0.98, 7), (3e-4, 0.99, 0), (3e-4, 0.99, 7)]
    assert all(run["setting"]["weight_decay"] == 0.1 for run in plan)  # unswept keys keep the base value
    # An empty grid is one setting: the base one, once per seed.
    assert [(run["optimizer"], run["setting"], run["seed"]) for run in plan[8:]] == [
        ("adamw_torch", base["adamw_torch"], 0), ("adamw_torch", base["adamw_torch"], 7)]
    assert plan[0]["run"] == "lion/learning_rate=0.0001,weight_decay=0.1,beta2=0.98/seed0"
    assert plan[-1]["run"] == "adamw_torch/learning_rate=0.002,weight_decay=0.1/seed7"
    assert len({run["run"] for run in plan}) == len(plan)


def test_run_arguments_send_each_key_where_it_belongs():
    run = {"optimizer": "lion", "seed": 3, "setting": {"learning_rate": 3e-4, "weight_decay": 1.0, "beta2": 0.98,
                                                       "router_learning_rate_ratio": 0.5, "warmup_steps": 20}}
    training, model = run_arguments(run, "beta1=0.95")
    assert training == {"optim": "lion", "seed": 3, "learning_rate": 3e-4, "weight_decay": 1.0, "warmup_steps": 20,
                        "optim_args": "beta1=0.95,beta2=0.98"}
    assert model == {"router_learning_rate_ratio": 0.5}
    training, _ = run_arguments({"optimizer": "adamw_torch", "seed": 0, "setting": {"adam_beta2": 0.95}}, None)
    assert training == {"optim": "adamw_torch", "seed": 0, "adam_beta2": 0.95, "optim_args": None}
    # transformers' AdamW would silently ignore an optim_args key: refused.
    with pytest.raises(ValueError, match="'beta2' is no TrainingArguments or ModelArguments field"):
        run_arguments({"optimizer": "adamw_torch", "seed": 0, "setting": {"beta2": 0.95}}, None)


# ------------------------------------------------------------------------------------------------------------------
# Marks, averages over seeds, best-of selection.

@pytest.mark.parametrize(("eval_loss", "train_losses", "maxvio", "expected"), [
    (4.9, [7.5, 6.0, 5.1], 0.2, "ok"),
    (4.9, [5.1], 0.2, "ok"),  # one logged loss: nothing to compare it with
    (4.9, [], 0.2, "ok"),
    (math.nan, [7.5, 6.0], 0.2, "diverged"),
    (4.9, [7.5, math.inf, 6.0], 0.2, "diverged"),
    (9.0, [7.5, 6.0, 7.6], 0.2, "diverged"),  # ended above where it began
    (4.9, [7.5, 6.0, 5.1], 1.2, "collapsed"),
    (4.9, [7.5, 6.0, 5.1], 1.0, "ok"),  # at the threshold, not above it
    (9.0, [7.5, 8.0], 1.2, "diverged"),  # diverging comes first
])
def test_run_status(eval_loss, train_losses, maxvio, expected):
    assert run_status(eval_loss, train_losses, maxvio, collapse_maxvio=1.0) == expected


def run(optim, learning_rate, seed, eval_loss, status="ok", maxvio=0.2):
    return {"optimizer": optim, "setting": {"learning_rate": learning_rate, "weight_decay": 0.1}, "seed": seed,
            "eval_loss": eval_loss, "train_loss": eval_loss + 1, "step_seconds": 0.3 + seed / 10, "state_mib": 8.0,
            "state_bytes_per_param": 4.0, "maxvio_global": maxvio, "status": status}


def test_settings_average_their_seeds_and_keep_their_marks():
    runs = [run("lion", 1e-3, 0, 5.0), run("lion", 1e-3, 1, 5.3, maxvio=0.4), run("lion", 1e-2, 0, 5.5),
            run("lion", 1e-2, 1, math.nan, "diverged"), run("simba", 1e-3, 0, 5.1, "collapsed", maxvio=1.5)]
    settings = summarize_settings(runs)
    assert [(row["optimizer"], row["label"], row["seeds"]) for row in settings] == [
        ("lion", "learning_rate=0.001,weight_decay=0.1", 2), ("lion", "learning_rate=0.01,weight_decay=0.1", 2),
        ("simba", "learning_rate=0.001,weight_decay=0.1", 1)]
    first, diverged, simba = settings
    assert first["eval_loss"] == pytest.approx(5.15) and first["eval_loss_spread"] == pytest.approx(0.3)
    assert first["train_loss"] == pytest.approx(6.15) and first["step_seconds"] == pytest.approx(0.35)
    assert first["maxvio_global"] == pytest.approx(0.3) and first["state_bytes_per_param"] == 4.0
    assert first["setting"] == {"learning_rate": 1e-3, "weight_decay": 0.1} and first["status"] == "ok"
    assert math.isnan(diverged["eval_loss"]) and math.isnan(diverged["eval_loss_spread"])
    assert diverged["status"] == "diverged (seed 1)"
    assert simba["eval_loss_spread"] == 0.0 and simba["status"] == "collapsed (seed 0)"


def test_best_setting_is_the_lowest_mean_among_unmarked_settings():
    runs = [run("lion", 1e-3, 0, 5.2), run("lion", 1e-3, 1, 5.4),  # mean 5.3, both ok
            run("lion", 3e-3, 0, 5.1), run("lion", 3e-3, 1, 5.3),  # mean 5.2, the best
            run("lion", 1e-2, 0, 4.0, "collapsed"), run("lion", 1e-2, 1, 4.1),  # lower, but a run collapsed
            run("simba", 1e-3, 0, math.nan, "diverged"), run("simba", 3e-3, 0, 6.0, "collapsed"),
            run("adamw_torch", 1e-3, 0, math.nan, "diverged")]
    best = {row["optimizer"]: row for row in best_settings(summarize_settings(runs))}
    assert list(best) == ["lion", "simba", "adamw_torch"]
    assert best["lion"]["setting"]["learning_rate"] == 3e-3 and best["lion"]["eval_loss"] == pytest.approx(5.2)
    # No unmarked setting: the lowest finite one, still marked; a non-finite loss ranks last.
    assert (best["simba"]["setting"]["learning_rate"], best["simba"]["status"]) == (3e-3, "collapsed (seed 0)")
    assert best["adamw_torch"]["status"] == "diverged (seed 0)"


def test_plot_sweep_draws_marked_and_non_finite_points(tmp_path):
    def size(path):
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")

    one = {"lion": {"weight_decay=0.1": [(1e-3, 5.2, False), (1e-2, math.nan, True)],
                    "weight_decay=1": [(1e-3, 5.0, False), (1e-2, 900.0, True)]}}
    plot_sweep(one, tmp_path / "one.png", title="t", xlabel="lr", ylabel="eval loss")
    two = {**one, "simba": {"simba": [(1e-3, math.inf, True)]}}  # a panel with marked points only
    plot_sweep(two, tmp_path / "two.png", title="t", xlabel="lr", ylabel="eval loss")
    assert size(tmp_path / "two.png")[0] > size(tmp_path / "one.png")[0]


# ------------------------------------------------------------------------------------------------------------------
# A tiny sweep, end to end.

TINY = [
    "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "2",
    "--num_key_value_heads", "1", "--num_local_experts", "4", "--num_experts_per_tok", "2",
    "--tokenizer_vocab_size", "300", "--block_size", "32", "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "16", "--logging_steps", "1", "--disable_tqdm", "true", "--warmup_steps", "0",
]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    text = CORPUS.read_text(encoding="utf-8")
    (tmp_path / "train.txt").write_text(text[:40_000], encoding="utf-8")
    (tmp_path / "valid.txt").write_text(text[-1_500:], encoding="utf-8")
    return ["--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "valid.txt")]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.e2e
def test_a_tiny_sweep_reports_every_run_and_marks_the_diverged_one(corpus, tmp_path, monkeypatch):
    target = tmp_path / "sweep"
    report = compare_optimizers.main([
        *corpus, *TINY, "--max_steps", "3", "--optimizers", "lion", "signsgd", "--learning_rates", "1e-3", "1e-2",
        "--grid", "lion:learning_rate=1e-2,100;beta1=0.95", "--seeds", "1", "2", "--shared_settings",
        "--output_dir", str(target)])
    runs = report["runs"]
    assert [(r["optimizer"], r["setting"]["learning_rate"], r["seed"]) for r in runs] == [
        ("lion", 1e-2, 1), ("lion", 1e-2, 2), ("lion", 100, 1), ("lion", 100, 2), ("signsgd", 1e-2, 1),
        ("signsgd", 1e-2, 2)]
    for row in runs:
        run_dir = target / row["run"]
        history = read_json(run_dir / "trainer_state.json")["log_history"]
        losses = [entry["loss"] for entry in history if "loss" in entry]
        assert len(losses) == 3 and row["eval_loss"] == read_json(run_dir / "eval_results.json")["eval_loss"]
        # A sign step of 100 per weight blows the loss up; 1e-2 lowers it in three steps.
        blown_up = row["setting"]["learning_rate"] == 100
        assert (not math.isfinite(row["eval_loss"]) or losses[-1] > losses[0]) == blown_up
        assert row["status"] == ("diverged" if blown_up else "ok")
    # Lion keeps one float32 momentum (4 bytes per parameter), signSGD no state.
    assert {r["optimizer"]: r["state_bytes_per_param"] for r in runs} == {"lion": pytest.approx(4.0), "signsgd": 0.0}
    # The grid's optim_args key reached the optimizer (Lion's default betas are (0.9, 0.99)).
    assert "(0.95, 0.99)" in (target / runs[0]["run"] / "README.md").read_text(encoding="utf-8")
    # A seed sets the initial weights: each seed's first loss is the same for every optimizer, and differs by seed.
    first = {(r["optimizer"], r["seed"]): read_json(target / r["run"] / "trainer_state.json")["log_history"][0]["loss"]
             for r in runs}
    assert first[("lion", 1)] == pytest.approx(first[("signsgd", 1)])
    assert first[("lion", 2)] == pytest.approx(first[("signsgd", 2)]) and first[("lion", 1)] != first[("lion", 2)]

    # Stopped after its fourth run (the last two never finished), the sweep continues: the finished runs are read
    # back, not trained again (a stand-in for `pretrain` records what trains), and the report is the same.
    for row in runs[4:]:
        shutil.rmtree(target / row["run"])
    (target / runs[3]["run"] / compare_optimizers.FINISHED_RUN).unlink()  # killed after training, before its row
    trained = []
    pretrain = compare_optimizers.pretrain_moe.pretrain

    def recording(model_args, data_args, args, run_args):
        trained.append(Path(args.output_dir).relative_to(target).as_posix())
        return pretrain(model_args, data_args, args, run_args)

    monkeypatch.setattr(compare_optimizers.pretrain_moe, "pretrain", recording)
    resumed = compare_optimizers.main([
        *corpus, *TINY, "--max_steps", "3", "--optimizers", "lion", "signsgd", "--learning_rates", "1e-3", "1e-2",
        "--grid", "lion:learning_rate=1e-2,100;beta1=0.95", "--seeds", "1", "2", "--shared_settings",
        "--output_dir", str(target),
        "--resume_from_checkpoint", "last", "--overwrite_output_dir"])
    assert trained == [row["run"] for row in runs[3:]]
    assert json.dumps(resumed["runs"][:3]) == json.dumps(runs[:3])  # read back as written (NaN losses included)
    assert [r["status"] for r in resumed["runs"]] == [r["status"] for r in runs]
    assert [b["label"] for b in resumed["best"]] == [b["label"] for b in report["best"]]

    healthy, diverged, signsgd = report["settings"]
    assert healthy["eval_loss"] == pytest.approx((runs[0]["eval_loss"] + runs[1]["eval_loss"]) / 2)
    assert healthy["eval_loss_spread"] == pytest.approx(abs(runs[0]["eval_loss"] - runs[1]["eval_loss"]))
    assert diverged["status"] == "diverged (seed 1), diverged (seed 2)"
    assert [(b["optimizer"], b["label"]) for b in report["best"]] == [
        ("lion", "learning_rate=0.01,weight_decay=0.1,beta1=0.95"), ("signsgd", "learning_rate=0.01,weight_decay=0.1")]
    written = read_json(target / "sweep.json")
    assert [r["status"] for r in written["runs"]] == [r["status"] for r in runs]
    assert written["best"][0]["eval_loss"] == healthy["eval_loss"]
    table = (target / "sweep.md").read_text(encoding="utf-8")
    assert "| lion | learning_rate=100,weight_decay=0.1,beta1=0.95 | 2 |" in table
    assert "diverged (seed 1), diverged (seed 2) |" in table and "*collapsed* = MaxVio_global above 1." in table
    assert (target / "eval_loss_vs_lr.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (target / "comparison.md").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--optimizers", "simba", "--grid", "simba:windw=3"], "Unknown optim_args key 'windw' for optim='simba'"),
    (["--optimizers", "adamw_torch", "--grid", "adamw_torch:beta1=0.9"], "'beta1' is no TrainingArguments"),
], ids=["unknown-key", "adamw-optim-args"])
def test_a_bad_grid_fails_before_anything_trains(corpus, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        compare_optimizers.main([*corpus, *TINY, *flags, "--output_dir", str(tmp_path / "sweep")])
    assert not (tmp_path / "sweep").exists()


def test_each_optimizer_starts_from_its_tuned_settings(tmp_path):
    def settings(*flags):
        parser = HfArgumentParser((compare_optimizers.ComparisonArguments, TrainingArguments))
        comparison, training = parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--learning_rate", "7e-4", "--weight_decay", "0.3", *flags])
        return compare_optimizers.starting_settings(comparison, training)

    tuned = compare_optimizers.TUNED_SETTINGS
    both = ("--optimizers", "lion", "adamw_torch")
    assert settings(*both) == {"lion": tuned["lion"], "adamw_torch": tuned["adamw_torch"]}
    assert settings(*both, "--learning_rates", "1e-5", "2e-5") == {
        "lion": {**tuned["lion"], "learning_rate": 1e-5},
        "adamw_torch": {**tuned["adamw_torch"], "learning_rate": 2e-5},
    }
    shared = {"learning_rate": 7e-4, "weight_decay": 0.3}
    assert settings("--optimizers", "lion", "--shared_settings") == {"lion": shared}
    assert settings("--optimizers", "adafactor") == {"adafactor": shared}  # not tuned: the arguments' own
    assert tuned["lion"]["learning_rate"] != 7e-4  # the table is not the arguments
    # The 500-step sweep's winners (README), which hf_signopt's constructors default to (but signSGD's rate).
    assert tuned == {
        "adamw_torch": {"learning_rate": 2e-3, "weight_decay": 0.1},
        "lion": {"learning_rate": 1e-3, "weight_decay": 1.0},
        "signum": {"learning_rate": 2e-3, "weight_decay": 0.1},
        "signsgd": {"learning_rate": 1e-3, "weight_decay": 0.1},
        "signmomentum": {"learning_rate": 2e-3, "weight_decay": 0.1},
        "simba": {"learning_rate": 2e-3, "weight_decay": 0.1, "momentum": "ema"},
    }
    # A tuned optim_args key (Simba's ema variant) gives way to the same key in --optim_args.
    assert settings("--optimizers", "simba")["simba"]["momentum"] == "ema"
    assert settings("--optimizers", "simba", "--optim_args", "momentum=counts") == {
        "simba": {key: value for key, value in tuned["simba"].items() if key != "momentum"}}
