"""The recipes end to end on tiny settings: outputs, load-back, a safe output directory, resuming, comparisons."""

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import compare_balancing
import compare_optimizers
import finetune
import hf_signopt
import pretrain_moe
from recipe_utils import CORPUS


pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = [
    "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "2",
    "--num_key_value_heads", "1", "--num_local_experts", "4", "--num_experts_per_tok", "2",
    "--tokenizer_vocab_size", "300",
]
TINY_TRAINING = [
    "--block_size", "32", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
    "--logging_steps", "1", "--disable_tqdm", "true", "--sample_max_new_tokens", "4", "--warmup_steps", "0",
]
QUICK = ["--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no", "--no_make_plots",
         "--sample_prompt", ""]
"""The shortest run: two steps, nothing but the final model and metrics."""
BLOCK_SIZE = 32
BIAS_RATE = 0.01
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """`load_dataset` caches in a tmp dir, in this process and in the recipes run as commands."""
    cache = tmp_path_factory.mktemp("datasets_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        patch.setenv("HF_DATASETS_CACHE", str(cache))
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small train/validation pair cut from the shipped corpus."""
    text = CORPUS.read_text(encoding="utf-8")
    directory = tmp_path_factory.mktemp("corpus")
    (directory / "train.txt").write_text(text[:40_000], encoding="utf-8")
    (directory / "valid.txt").write_text(text[-6_000:], encoding="utf-8")
    return ["--train_file", str(directory / "train.txt"), "--validation_file", str(directory / "valid.txt")]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus):
    """The main job, tiny, from a YAML config: 6 steps, checkpoints at 3 and 6 (all kept), evaluated at 3 and 6."""
    directory = tmp_path_factory.mktemp("pretrain")
    config = directory / "tiny.yaml"
    config.write_text(f"save_total_limit: null\nrouter_bias_update_rate: {BIAS_RATE}\n", encoding="utf-8")
    output = directory / "tiny_moe"
    args = [str(config), *corpus, *TINY_MODEL, *TINY_TRAINING, "--max_steps", str(STEPS), "--save_steps", "3",
            "--eval_steps", "3", "--output_dir", str(output)]
    run = pretrain_moe.main(args)
    return output, args, run


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with the hash of its bytes."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def checkpoints(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("checkpoint-*"))


def biases(directory: Path) -> dict[str, torch.Tensor]:
    weights = load_file(directory / "model.safetensors")
    return {name: tensor for name, tensor in weights.items() if name.endswith("e_score_correction_bias")}


def layer_of(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


def blocks_of(text_file: str, directory: Path) -> torch.Tensor:
    """The text of `text_file` in the recipes' blocks, tokenized by the tokenizer saved in `directory`."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer(Path(text_file).read_text(encoding="utf-8"))["input_ids"]
    count = len(ids) // BLOCK_SIZE
    return torch.tensor(ids[:count * BLOCK_SIZE]).view(count, BLOCK_SIZE)


def check_expert_load(tokens_per_expert: list, maxvio_per_layer: list, eval_tokens: int, top_k: int) -> None:
    """Each evaluation token is routed to top_k experts in every layer; MaxVio from the counts."""
    assert len(tokens_per_expert) == len(maxvio_per_layer) == 2  # layers
    for counts, maxvio in zip(tokens_per_expert, maxvio_per_layer):
        assert len(counts) == 4  # experts
        assert sum(counts) == eval_tokens * top_k
        mean = sum(counts) / len(counts)
        assert maxvio == pytest.approx((max(counts) - mean) / mean, rel=1e-5)


def language_modeling_loss(directory: Path, valid_file: str, batch_size: int = 16) -> float:
    """The mean next-token loss of the saved model over the validation blocks (no auxiliary loss)."""
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    blocks = blocks_of(valid_file, directory)
    total = 0.0
    with torch.no_grad():
        for batch in blocks.split(batch_size):
            total += model(input_ids=batch, labels=batch, output_router_logits=False).loss.item() * len(batch)
    return total / len(blocks)


# ------------------------------------------------------------------------------------------------------------------
# Recipe 1, the main job.

def test_main_job_output_directory_loads_back(pretrained, corpus, capsys):
    output, _, run = pretrained
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "all_results.json",
                 "train_results.json", "eval_results.json", "trainer_state.json", "loss.png", "maxvio.png",
                 "expert_load.png"):
        assert (output / name).is_file(), name
    assert not (output / "metrics.json").exists()
    assert checkpoints(output) == ["checkpoint-3", "checkpoint-6"]
    model = AutoModelForCausalLM.from_pretrained(output)
    assert isinstance(model, hf_signopt.LossFreeMoeForCausalLM)
    saved = biases(output)
    assert len(saved) == 2
    for name, bias in saved.items():
        assert bias.dtype == torch.float32
        # Sign rule: each step moves each bias by -rate, 0 or +rate.
        steps = bias / BIAS_RATE
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= STEPS
    # The loaded model holds exactly the saved biases, layer by layer.
    loaded = {layer_of(n): b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert {layer_of(n): b for n, b in saved.items()}.keys() == loaded.keys()
    for name, bias in saved.items():
        torch.testing.assert_close(loaded[layer_of(name)], bias, rtol=0, atol=0)
    assert any(bias.abs().sum() > 0 for bias in saved.values())

    # The Trainer's own files hold the metrics the run returned.
    results, evaluation = read_json(output / "all_results.json"), read_json(output / "eval_results.json")
    assert evaluation == pytest.approx(run["eval"])
    assert read_json(output / "train_results.json") == pytest.approx(run["train"])
    assert results == pytest.approx(run["train"] | run["eval"])
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert results["num_parameters"] == sum(p.numel() for p in model.parameters())
    state = read_json(output / "trainer_state.json")
    assert state["global_step"] == STEPS
    assert [entry["step"] for entry in state["log_history"] if "eval_loss" in entry] == [3, 6]
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == list(range(1, STEPS + 1))
    valid_file = corpus[3]
    assert results["eval_loss"] == pytest.approx(language_modeling_loss(output, valid_file), rel=1e-4)

    eval_tokens = blocks_of(valid_file, output).numel()
    check_expert_load(run["tokens_per_expert"], run["maxvio_per_layer"], eval_tokens, top_k=2)
    per_layer = run["maxvio_per_layer"]
    assert results["eval_moe/maxvio_global"] == pytest.approx(sum(per_layer) / len(per_layer))
    assert results["eval_moe/maxvio_global_max"] == pytest.approx(max(per_layer))

    card = ModelCard.load(output / "README.md")
    assert card.data.tags == ["moe", "loss-free-balancing", "simba"]
    assert card.data.library_name == "transformers" and card.data.model_name == "tiny_moe"
    assert card.data.base_model is None
    assert "![Per-expert load per layer on the evaluation set](expert_load.png)" in card.text
    assert f"rate `u = {BIAS_RATE}`" in card.text
    assert "4 experts per layer,\n2 chosen per token" in card.text


def test_a_second_run_into_a_finished_output_dir_is_refused_and_changes_nothing(pretrained):
    output, args, _ = pretrained
    before = snapshot(output)
    with pytest.raises(FileExistsError) as error:
        pretrain_moe.main(args)
    message = str(error.value)
    assert str(output) in message and "--overwrite_output_dir" in message and "trained model" in message
    assert snapshot(output) == before


def test_overwrite_output_dir_trains_into_a_used_dir(pretrained, tmp_path):
    output, args, _ = pretrained
    used = tmp_path / "used"
    shutil.copytree(output, used)
    old_weights = load_file(used / "model.safetensors")
    rerun = [a if a != str(output) else str(used) for a in args] + [*QUICK, "--overwrite_output_dir"]
    result = pretrain_moe.main(rerun)
    assert read_json(used / "trainer_state.json")["global_step"] == 2
    assert read_json(used / "all_results.json")["eval_loss"] == pytest.approx(result["eval"]["eval_loss"])
    new_weights = load_file(used / "model.safetensors")
    assert any(not torch.equal(new_weights[name], old_weights[name]) for name in old_weights)


def test_overwrite_output_dir_leaves_no_checkpoint_of_the_replaced_run(pretrained, tmp_path):
    output, args, _ = pretrained
    used = tmp_path / "used"
    shutil.copytree(output, used)
    rerun = [a if a != str(output) else str(used) for a in args] + [*QUICK, "--overwrite_output_dir"]
    pretrain_moe.main(rerun)
    assert checkpoints(used) == []  # this run saved none (--save_strategy no)


def test_resuming_the_main_job_from_its_last_checkpoint_matches_the_uninterrupted_run(pretrained, tmp_path):
    output, args, _ = pretrained
    interrupted = tmp_path / "interrupted"
    shutil.copytree(output / "checkpoint-3", interrupted / "checkpoint-3")
    resumed_args = [a if a != str(output) else str(interrupted) for a in args]
    with pytest.raises(FileExistsError, match="already holds files.*--resume_from_checkpoint last"):
        pretrain_moe.main(resumed_args)
    result = pretrain_moe.main(resumed_args + ["--resume_from_checkpoint", "last"])
    assert read_json(interrupted / "trainer_state.json")["global_step"] == STEPS
    assert checkpoints(interrupted) == ["checkpoint-3", "checkpoint-6"]
    uninterrupted, resumed = load_file(output / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-6, msg=name)
    # Resuming loads the checkpoint's tokenizer: the evaluation sees the same blocks.
    assert result["eval"]["eval_loss"] == pytest.approx(read_json(output / "eval_results.json")["eval_loss"], abs=1e-5)


def check_run_fails_and_leaves_no_trace(recipe, flags: list[str], error: type, message: str, output: Path,
                                        existing: bool) -> None:
    if existing:
        output.mkdir()
    with pytest.raises(error, match=message):
        recipe([*flags, "--output_dir", str(output)])
    if existing:
        assert output.is_dir() and list(output.iterdir()) == []
    else:
        assert not output.exists()


@pytest.mark.parametrize("existing", [False, True], ids=["absent", "empty"])
@pytest.mark.parametrize(("flags", "error", "message"), [
    # Fails in the Trainer's create_optimizer, at the start of training.
    (["--optim", "simba", "--optim_args", "window_size=0"], ValueError, "window_size"),
    # Fails when the config is built, after the tokenizer was trained.
    (["--router_score_func", "bogus"], Exception, "router_score_func"),
], ids=["optimizer", "config"])
def test_a_run_that_fails_before_training_leaves_no_output_dir(corpus, tmp_path, flags, error, message, existing):
    check_run_fails_and_leaves_no_trace(pretrain_moe.main, [*corpus, *TINY_MODEL, *TINY_TRAINING, *QUICK, *flags],
                                        error, message, tmp_path / "run", existing)


@pytest.mark.parametrize("existing", [False, True], ids=["absent", "empty"])
def test_a_comparison_that_fails_before_training_leaves_no_output_dir(corpus, tmp_path, existing):
    flags = [*corpus, *TINY_MODEL, *TINY_TRAINING, *QUICK, "--optimizers", "simba", "--optim_args", "window_size=0"]
    check_run_fails_and_leaves_no_trace(compare_optimizers.main, flags, ValueError, "window_size", tmp_path / "cmp",
                                        existing)


def test_bad_arguments_fail_before_training(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="'/no/such/file.txt' does not exist"):
        pretrain_moe.main(["--train_file", "/no/such/file.txt", "--output_dir", str(tmp_path / "a")])
    with pytest.raises(FileNotFoundError, match="is not a model directory.*pretrain_moe.py"):
        finetune.main([*corpus, "--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="no_such_optim is not a valid OptimizerNames"):
        compare_optimizers.main(["--optimizers", "simba", "no_such_optim", "--output_dir", str(tmp_path / "c")])
    with pytest.raises(ValueError, match="learning_rates has 1 values for 2 optimizers"):
        compare_optimizers.main(["--optimizers", "simba", "lion", "--learning_rates", "0.1",
                                 "--output_dir", str(tmp_path / "d")])
    with pytest.raises(ValueError, match="modes must be distinct names"):
        compare_balancing.main(["--modes", "loss-free", "aux_loss", "--output_dir", str(tmp_path / "e")])
    with pytest.raises(FileNotFoundError, match="no checkpoint-"):
        pretrain_moe.main([*corpus, "--resume_from_checkpoint", "last", "--output_dir", str(tmp_path / "f")])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------------
# Recipe 2, fine-tuning.

def test_finetune_the_main_job_output_with_lion(pretrained, corpus, tmp_path, capsys):
    output, _, _ = pretrained
    target = tmp_path / "ft"
    final = finetune.main([*corpus, *TINY_TRAINING, "--model_name_or_path", str(output), "--optim", "lion",
                           "--learning_rate", "1e-3", "--max_steps", "3", "--eval_strategy", "no",
                           "--save_steps", "3", "--output_dir", str(target)])
    assert final["perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    assert final["perplexity_before"] == pytest.approx(math.exp(final["eval_loss_before"]))
    assert final["eval_loss"] < final["eval_loss_before"]
    # Before fine-tuning the model is the pre-trained one: its own final evaluation.
    assert final["eval_loss_before"] == pytest.approx(read_json(output / "eval_results.json")["eval_loss"], abs=1e-5)
    assert read_json(target / "eval_results.json") == pytest.approx(final)
    assert read_json(target / "trainer_state.json")["global_step"] == 3
    assert checkpoints(target) == ["checkpoint-3"]
    card_file = (target / "README.md").read_text(encoding="utf-8")
    card = ModelCard.load(target / "README.md")
    # A local base model: no machine-local path in the hub metadata, its directory's name in the text.
    assert card.data.base_model is None
    assert "base_model" not in card_file.split("---")[1] and str(output) not in card_file
    assert "Fine-tuned from `tiny_moe` on **train.txt** with the `lion` optimizer" in card.text
    assert card.data.tags == ["moe", "loss-free-balancing", "lion"]
    assert "maxvio_global" in {r.metric_type for r in card.data.eval_results}
    # Fine-tuning keeps balancing: the biases moved on from the pre-trained ones.
    assert any(not torch.equal(biases(target)[n], b) for n, b in biases(output).items())
    assert "Sample:" in capsys.readouterr().out


def test_finetune_a_dense_causal_lm_with_signum(pretrained, corpus, tmp_path):
    output, _, _ = pretrained
    tokenizer = AutoTokenizer.from_pretrained(output)
    base = tmp_path / "llama_base"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    target = tmp_path / "ft"
    final = finetune.main([*corpus, *TINY_TRAINING, *QUICK, "--model_name_or_path", str(base), "--optim", "signum",
                           "--learning_rate", "1e-2", "--output_dir", str(target)])
    assert "eval_moe/maxvio_global" not in final
    card = ModelCard.load(target / "README.md")
    assert card.data.tags == ["signum"] and card.data.base_model is None
    assert "Fine-tuned from `llama_base`" in card.text
    assert "e_score_correction_bias" not in card.text
    assert isinstance(AutoModelForCausalLM.from_pretrained(target), LlamaForCausalLM)
    assert checkpoints(target) == []


def test_finetune_refuses_to_write_into_the_model_it_fine_tunes(pretrained, corpus):
    output, _, _ = pretrained
    before = snapshot(output)
    with pytest.raises(ValueError, match="is the model being fine-tuned"):
        finetune.main([*corpus, *TINY_TRAINING, *QUICK, "--model_name_or_path", str(output),
                       "--output_dir", str(output), "--overwrite_output_dir"])
    assert snapshot(output) == before


# ------------------------------------------------------------------------------------------------------------------
# Recipes 3 and 4, the comparisons: their own defaults (no checkpoints, one evaluation at the end).

def test_compare_optimizers_table(corpus, tmp_path):
    target = tmp_path / "cmp"
    rows = compare_optimizers.main([*corpus, *TINY_MODEL, *TINY_TRAINING, "--optimizers", "adamw_torch", "simba",
                                    "--learning_rates", "1e-3", "2e-3", "--max_steps", "2",
                                    "--output_dir", str(target)])
    assert [(row["optimizer"], row["learning_rate"]) for row in rows] == [("adamw_torch", 1e-3), ("simba", 2e-3)]
    adamw, simba = rows
    # AdamW: two float32 moments per parameter plus one float32 step per tensor.
    assert 8.0 < adamw["state_bytes_per_param"] < 8.1
    # Simba at its tuned setting, the ema variant: an int8 counter (the default window, 127) and a float32 EMA.
    assert "momentum" not in adamw["optim_args"] and "momentum=ema" in simba["optim_args"].split(",")
    assert simba["state_bytes_per_param"] == pytest.approx(1.0 + 4.0)
    assert adamw["step_time_vs_first"] == 1.0
    assert simba["step_time_vs_first"] == pytest.approx(simba["step_seconds"] / adamw["step_seconds"])
    for name in ("comparison.md", "comparison.json", "loss_curves.png", "adamw_torch/README.md", "simba/README.md"):
        assert (target / name).is_file(), name
    assert json.loads((target / "comparison.json").read_text()) == rows
    assert "| simba | 0.0020 |" in (target / "comparison.md").read_text()
    for row in rows:
        run_dir = target / row["optimizer"]
        state = read_json(run_dir / "trainer_state.json")
        assert state["global_step"] == 2
        assert not any("eval_loss" in entry for entry in state["log_history"])  # evaluated only after training
        assert row["eval_loss"] == read_json(run_dir / "eval_results.json")["eval_loss"]
    assert checkpoints(target) == []
    # Same initial weights, data and order: the two runs' first losses are equal.
    first = [read_json(target / r["optimizer"] / "trainer_state.json")["log_history"][0]["loss"] for r in rows]
    assert first[0] == pytest.approx(first[1])


def test_compare_balancing_table(corpus, tmp_path):
    target = tmp_path / "cmp"
    rows = compare_balancing.main([*corpus, *TINY_MODEL, *TINY_TRAINING, "--max_steps", "3",
                                   "--router_bias_update_rate", str(BIAS_RATE), "--output_dir", str(target)])
    assert [(row["mode"], row["aux_loss_coef"]) for row in rows] == [
        ("none", 0.0), ("aux-loss", 0.02), ("loss-free", 0.0)]
    moved = {row["mode"]: any(b.abs().sum() > 0 for b in biases(target / row["mode"]).values()) for row in rows}
    assert moved == {"none": False, "aux-loss": False, "loss-free": True}
    configs = {row["mode"]: read_json(target / row["mode"] / "config.json") for row in rows}
    assert {mode: (c["router_bias_update_rate"], c["router_aux_loss_coef"], c["output_router_logits"])
            for mode, c in configs.items()} == {"none": (0.0, 0.0, False), "aux-loss": (0.0, 0.02, True),
                                                "loss-free": (BIAS_RATE, 0.0, False)}
    for row in rows:
        evaluation = read_json(target / row["mode"] / "eval_results.json")
        per_layer = row["maxvio_per_layer"]
        assert len(per_layer) == 2
        assert evaluation["eval_moe/maxvio_global"] == row["maxvio_global"] == pytest.approx(
            sum(per_layer) / len(per_layer))
        assert row["maxvio_global_max"] == pytest.approx(max(per_layer))
        assert row["eval_loss"] == evaluation["eval_loss"]
    # The aux-loss run's eval loss is its language modelling loss alone, comparable with the others'.
    aux = target / "aux-loss"
    assert rows[1]["eval_loss"] == pytest.approx(language_modeling_loss(aux, corpus[3]), rel=1e-4)
    assert json.loads((target / "comparison.json").read_text()) == rows
    assert (target / "expert_load.png").is_file() and (target / "comparison.md").is_file()
    assert checkpoints(target) == []


# ------------------------------------------------------------------------------------------------------------------
# As commands.

def run_command(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `command` in its own process group; on a timeout every process of the group is killed, workers too."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command[:4]} ran past {timeout}s; killed its process group. stderr:\n{stderr[-3000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing of the group may outlive the test
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_main_job_script_runs_as_a_command(corpus, tmp_path):
    """What CI's smoke step does: run the script in a fresh interpreter, then load its output back."""
    output = tmp_path / "smoke"
    result = run_command(
        [sys.executable, str(REPO / "recipes" / "pretrain_moe.py"), *corpus, *TINY_MODEL, *TINY_TRAINING,
         "--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no", "--output_dir", str(output)],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sample from the saved model:\nROMEO:" in result.stdout
    assert isinstance(AutoModelForCausalLM.from_pretrained(output), hf_signopt.LossFreeMoeForCausalLM)
    assert AutoTokenizer.from_pretrained(output).eos_token == "<|endoftext|>"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.multiprocess
def test_main_job_under_accelerate_launch_with_two_cpu_processes(corpus, tmp_path):
    """recipes/accelerate/ddp_cpu.yaml: two gloo ranks share the data; only rank 0 writes; both end cleanly."""
    output = tmp_path / "ddp"
    steps, batch = 3, 4
    result = run_command(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "recipes" / "accelerate" / "ddp_cpu.yaml"), "--main_process_port", str(free_port()),
         str(REPO / "recipes" / "pretrain_moe.py"), "--use_cpu", "true", *corpus, *TINY_MODEL, *TINY_TRAINING,
         "--max_steps", str(steps), "--save_strategy", "no", "--eval_strategy", "no",
         "--router_bias_update_rate", str(BIAS_RATE), "--output_dir", str(output)],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("Sample from the saved model:") == 1
    assert "| processes | 2 |" in (output / "README.md").read_text()
    # Each step took a batch on each rank: 2 x 4 blocks of the training split.
    train_blocks = len(blocks_of(corpus[1], output))
    state = read_json(output / "trainer_state.json")
    assert state["global_step"] == steps
    assert state["epoch"] == pytest.approx(steps / math.ceil(train_blocks / (2 * batch)))
    results = read_json(output / "all_results.json")
    assert 0 <= results["eval_moe/maxvio_global"] <= results["eval_moe/maxvio_global_max"] <= 4 - 1
    assert any(bias.abs().sum() > 0 for bias in biases(output).values())
    assert checkpoints(output) == []
