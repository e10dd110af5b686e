"""TRL loads a `lossfree_moe` checkpoint by path (`SFTTrainer(model="<dir>")` and the `trl.scripts.sft` CLI through
`python -m hf_signopt.run`), trains it with a sign optimizer, and balances it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moe_tiny import TINY_MOE
from safetensors.torch import load_file

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from hf_signopt import LossFreeMoeConfig, LossFreeMoeForCausalLM  # noqa: E402

RATE = 0.01
STEPS = 3
SRC = Path(__file__).resolve().parents[1] / "src"


def save_tiny_checkpoint(path):
    torch.manual_seed(0)
    config = LossFreeMoeConfig(**TINY_MOE, router_bias_update_rate=RATE, router_bias_update_rule="sign")
    LossFreeMoeForCausalLM(config).save_pretrained(path)
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .")} | {"<unk>": 28, "<eos>": 29}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>",
                                        pad_token="<eos>")
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.mark.e2e
def test_sft_trainer_by_path_trains_balances_and_logs(tmp_path):
    tokenizer = save_tiny_checkpoint(tmp_path / "model")
    dataset = datasets.Dataset.from_dict({"text": ["to be or not to be. that is the question."] * 16})
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=4,
                         report_to=[], use_cpu=True, optim="simba", learning_rate=1e-3, logging_steps=1,
                         save_strategy="no", max_length=32, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=str(tmp_path / "model"), args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    trainer.train()
    assert isinstance(trainer.model, LossFreeMoeForCausalLM)
    logged = [entry["moe/maxvio"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == STEPS and all(value >= 0 for value in logged)
    for router in (m for m in trainer.model.modules() if hasattr(m, "e_score_correction_bias")):
        bias = router.e_score_correction_bias
        # sign rule: each step moves every expert by exactly +-RATE (or 0 at the mean)
        assert 0 < bias.abs().max() <= STEPS * RATE + 1e-7


@pytest.mark.e2e
def test_trl_cli_through_the_launcher_trains_with_simba_and_balances(tmp_path):
    save_tiny_checkpoint(tmp_path / "model")
    (tmp_path / "data").mkdir()
    rows = [json.dumps({"text": "to be or not to be. that is the question."})] * 16
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(rows) + "\n")  # load_dataset(<dir>) reads it as JSON
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "hf_signopt.run", "-m", "trl.scripts.sft",
        "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "data"),
        "--max_steps", str(STEPS), "--optim", "simba", "--optim_args", "window_size=64,threshold=0.2",
        "--learning_rate", "1e-3", "--per_device_train_batch_size", "4", "--max_length", "32", "--use_cpu",
        "--report_to", "none", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", str(STEPS),
        "--disable_tqdm", "true", "--output_dir", str(out),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]

    # The optimizer state the Trainer saved is Simba's: its hyperparameters from --optim_args and its sign counters.
    checkpoint = out / f"checkpoint-{STEPS}"
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    group = optimizer["param_groups"][0]
    assert (group["window_size"], group["threshold"], group["initial_lr"]) == (64, 0.2, 1e-3)
    assert optimizer["state"] and all("sign_counts" in state for state in optimizer["state"].values())
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    logged = [entry["step"] for entry in history if "loss" in entry and "moe/maxvio" in entry]
    assert logged == list(range(1, STEPS + 1))  # MoE metrics with every training log, no callback added

    # The saved biases moved: the sign rule moves each expert by -RATE, 0 or +RATE per step.
    saved = load_file(out / "model.safetensors")
    saved_biases = [tensor for key, tensor in saved.items() if key.endswith("e_score_correction_bias")]
    assert len(saved_biases) == TINY_MOE["num_hidden_layers"]
    for bias in saved_biases:
        steps = bias.double() / RATE
        assert bias.dtype == torch.float32 and bias.abs().max() > 0
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= STEPS
