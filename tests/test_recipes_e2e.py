"""The recipes end to end on tiny settings: outputs, load-back, resuming, comparisons, bad arguments."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_signopt
from hf_signopt.data import default_corpus_path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "recipes"))
import compare_balancing  # noqa: E402
import compare_optimizers  # noqa: E402
import finetune  # noqa: E402
import pretrain_moe  # noqa: E402


pytestmark = pytest.mark.e2e

TINY_MODEL = [
    "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "2",
    "--num_key_value_heads", "1", "--num_local_experts", "4", "--num_experts_per_tok", "2",
    "--tokenizer_vocab_size", "300",
]
TINY_TRAINING = [
    "--block_size", "32", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
    "--logging_steps", "1", "--disable_tqdm", "true", "--sample_max_new_tokens", "4", "--warmup_steps", "0",
]
BIAS_RATE = 0.01
STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small train/validation pair cut from the shipped corpus."""
    text = default_corpus_path().read_text(encoding="utf-8")
    directory = tmp_path_factory.mktemp("corpus")
    (directory / "train.txt").write_text(text[:40_000], encoding="utf-8")
    (directory / "valid.txt").write_text(text[-6_000:], encoding="utf-8")
    return ["--train_file", str(directory / "train.txt"), "--validation_file", str(directory / "valid.txt")]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus):
    """The main job, tiny, from a YAML config: 6 steps, checkpoints at 3 and 6 (all kept)."""
    directory = tmp_path_factory.mktemp("pretrain")
    config = directory / "tiny.yaml"
    config.write_text(f"save_total_limit: null\nrouter_bias_update_rate: {BIAS_RATE}\n", encoding="utf-8")
    output = directory / "out"
    args = [str(config), *corpus, *TINY_MODEL, *TINY_TRAINING, "--max_steps", str(STEPS), "--save_steps", "3",
            "--eval_steps", "3", "--output_dir", str(output)]
    run = pretrain_moe.main(args)
    return output, args, run


def biases(directory: Path) -> dict[str, torch.Tensor]:
    weights = load_file(directory / "model.safetensors")
    return {name: tensor for name, tensor in weights.items() if name.endswith("e_score_correction_bias")}


def layer_of(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


def check_expert_load(expert_load: dict, eval_tokens: int, top_k: int) -> None:
    """Each evaluation token is routed to top_k experts in every layer; MaxVio from the counts."""
    for counts, maxvio in zip(expert_load["tokens_per_expert"], expert_load["maxvio_per_layer"]):
        assert sum(counts) == eval_tokens * top_k
        mean = sum(counts) / len(counts)
        assert maxvio == pytest.approx((max(counts) - mean) / mean, rel=1e-5)
    per_layer = expert_load["maxvio_per_layer"]
    assert expert_load["maxvio_global"] == pytest.approx(sum(per_layer) / len(per_layer))


def eval_token_count(directory: Path, corpus: list[str]) -> int:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokens = len(tokenizer(Path(corpus[3]).read_text(encoding="utf-8"))["input_ids"])
    return tokens // 32 * 32


def test_main_job_output_directory_loads_back(pretrained, corpus, capsys):
    output, _, run = pretrained
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "metrics.json",
                 "loss.png", "maxvio.png", "expert_load.png"):
        assert (output / name).is_file(), name
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

    metrics = json.loads((output / "metrics.json").read_text())
    final = metrics["final"]
    assert final["perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    assert final["global_step"] == STEPS
    check_expert_load(metrics["expert_load"], eval_token_count(output, corpus), top_k=2)
    assert run.final_metrics["eval_loss"] == final["eval_loss"]

    card = ModelCard.load(output / "README.md")
    assert card.data.tags == ["moe", "loss-free-balancing", "simba"]
    assert card.data.library_name == "transformers"
    assert "![Per-expert load per layer on the evaluation set](expert_load.png)" in card.text
    assert f"rate `u = {BIAS_RATE}`" in card.text


def test_resuming_the_main_job_from_its_last_checkpoint_matches_the_uninterrupted_run(pretrained, tmp_path):
    output, args, _ = pretrained
    interrupted = tmp_path / "interrupted"
    shutil.copytree(output / "checkpoint-3", interrupted / "checkpoint-3")
    resumed_args = [a if a != str(output) else str(interrupted) for a in args] + ["--resume_from_checkpoint", "last"]
    pretrain_moe.main(resumed_args)
    uninterrupted, resumed = load_file(output / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-6, msg=name)


def test_finetune_the_main_job_output_with_lion(pretrained, corpus, tmp_path, capsys):
    output, _, _ = pretrained
    target = tmp_path / "ft"
    final = finetune.main([*corpus, *TINY_TRAINING, "--model_name_or_path", str(output), "--optim", "lion",
                           "--learning_rate", "1e-3", "--max_steps", "3", "--eval_strategy", "no",
                           "--save_steps", "3", "--output_dir", str(target)])
    assert final["perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    assert final["perplexity_before"] == pytest.approx(math.exp(final["eval_loss_before"]))
    assert final["eval_loss"] < final["eval_loss_before"]
    card = ModelCard.load(target / "README.md")
    assert card.data.base_model == str(output)
    assert card.data.tags == ["moe", "loss-free-balancing", "lion"]
    metrics = json.loads((target / "metrics.json").read_text())
    check_expert_load(metrics["expert_load"], eval_token_count(target, corpus), top_k=2)
    # Fine-tuning keeps balancing: the biases moved on from the pre-trained ones.
    assert any(not torch.equal(biases(target)[n], b) for n, b in biases(output).items())
    assert "Sample:" in capsys.readouterr().out


def test_finetune_a_dense_causal_lm_with_signum(pretrained, corpus, tmp_path):
    output, _, _ = pretrained
    tokenizer = AutoTokenizer.from_pretrained(output)
    base = tmp_path / "llama"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    target = tmp_path / "ft"
    final = finetune.main([*corpus, *TINY_TRAINING, "--model_name_or_path", str(base), "--optim", "signum",
                           "--learning_rate", "1e-2", "--max_steps", "2", "--eval_strategy", "no",
                           "--save_strategy", "no", "--no_make_plots", "--output_dir", str(target)])
    assert "maxvio_global" not in final
    card = ModelCard.load(target / "README.md")
    assert card.data.tags == ["signum"]
    assert "e_score_correction_bias" not in card.text
    assert isinstance(AutoModelForCausalLM.from_pretrained(target), LlamaForCausalLM)


def test_compare_optimizers_table(corpus, tmp_path):
    target = tmp_path / "cmp"
    rows = compare_optimizers.main([*corpus, *TINY_MODEL, *TINY_TRAINING, "--optimizers", "adamw_torch", "simba",
                                    "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no",
                                    "--output_dir", str(target)])
    assert [row["optimizer"] for row in rows] == ["adamw_torch", "simba"]
    adamw, simba = rows
    # AdamW: two float32 moments per parameter plus one float32 step per tensor.
    assert 8.0 < adamw["state_bytes_per_param"] < 8.1
    # Simba with its default window of 128 (> 127) keeps an int16 counter: 2 bytes per parameter.
    assert simba["state_bytes_per_param"] == pytest.approx(2.0)
    assert adamw["step_time_vs_first"] == 1.0
    for name in ("comparison.md", "comparison.json", "loss_curves.png", "adamw_torch/README.md", "simba/README.md"):
        assert (target / name).is_file(), name
    assert "| simba |" in (target / "comparison.md").read_text()


def test_compare_balancing_table(corpus, tmp_path):
    target = tmp_path / "cmp"
    rows = compare_balancing.main([*corpus, *TINY_MODEL, *TINY_TRAINING, "--max_steps", "3", "--eval_strategy", "no",
                                   "--save_strategy", "no", "--router_bias_update_rate", str(BIAS_RATE),
                                   "--output_dir", str(target)])
    assert [(row["mode"], row["aux_loss_coef"]) for row in rows] == [
        ("none", 0.0), ("aux-loss", 0.02), ("loss-free", 0.0)]
    moved = {mode: any(b.abs().sum() > 0 for b in biases(target / mode).values()) for mode, _ in
             [(r["mode"], None) for r in rows]}
    assert moved == {"none": False, "aux-loss": False, "loss-free": True}
    assert json.loads((target / "aux-loss" / "config.json").read_text())["output_router_logits"] is True
    for row in rows:
        metrics = json.loads((target / row["mode"] / "metrics.json").read_text())
        check_expert_load(metrics["expert_load"], eval_token_count(target / row["mode"], corpus), top_k=2)
        assert row["maxvio_per_layer"] == metrics["expert_load"]["maxvio_per_layer"]
    assert (target / "expert_load.png").is_file()


def test_bad_arguments_fail_before_training(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="--train_file '/no/such/file.txt' does not exist"):
        pretrain_moe.main(["--train_file", "/no/such/file.txt", "--output_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="is not a model directory.*pretrain_moe.py"):
        finetune.main([*corpus, "--model_name_or_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="no_such_optim is not a valid OptimizerNames"):
        compare_optimizers.main(["--optimizers", "simba", "no_such_optim", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="learning_rates has 1 values for 2 optimizers"):
        compare_optimizers.main(["--optimizers", "simba", "lion", "--learning_rates", "0.1",
                                 "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="modes must be distinct names"):
        compare_balancing.main(["--modes", "loss-free", "aux_loss", "--output_dir", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no checkpoint-"):
        pretrain_moe.main([*corpus, "--resume_from_checkpoint", "last", "--output_dir", str(tmp_path / "fresh")])


def test_main_job_script_runs_as_a_command(corpus, tmp_path):
    """What CI's smoke step does: run the script in a fresh interpreter, then load its output back."""
    output = tmp_path / "smoke"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pretrain_moe.py"), *corpus, *TINY_MODEL, *TINY_TRAINING,
         "--max_steps", "2", "--save_strategy", "no", "--eval_strategy", "no", "--output_dir", str(output)],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sample from the saved model:" in result.stdout
    assert isinstance(AutoModelForCausalLM.from_pretrained(output), hf_signopt.LossFreeMoeForCausalLM)
    assert AutoTokenizer.from_pretrained(output).eos_token == "<|endoftext|>"


@pytest.mark.multiprocess
def test_main_job_under_accelerate_launch_with_two_cpu_processes(corpus, tmp_path):
    """recipes/accelerate/ddp_cpu.yaml: two gloo ranks; every rank measures, only rank 0 writes."""
    output = tmp_path / "ddp"
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "recipes" / "accelerate" / "ddp_cpu.yaml"), str(REPO / "recipes" / "pretrain_moe.py"),
         "--use_cpu", "true", *corpus, *TINY_MODEL, *TINY_TRAINING, "--max_steps", "3", "--save_strategy", "no",
         "--eval_strategy", "no", "--router_bias_update_rate", str(BIAS_RATE), "--output_dir", str(output)],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Sample from the saved model:") == 1
    assert "| processes | 2 |" in (output / "README.md").read_text()
    metrics = json.loads((output / "metrics.json").read_text())
    # Both ranks' evaluation tokens are summed: at least the whole validation split is counted.
    for counts in metrics["expert_load"]["tokens_per_expert"]:
        assert sum(counts) >= 2 * eval_token_count(output, corpus)
    assert any(bias.abs().sum() > 0 for bias in biases(output).values())
