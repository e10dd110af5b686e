"""TRL's `SFTTrainer` loads a `lossfree_moe` checkpoint by path, trains it with a sign optimizer, and balances it."""

import pytest
import torch
from moe_tiny import TINY_MOE

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from hf_signopt import LossFreeMoeConfig, LossFreeMoeForCausalLM  # noqa: E402

RATE = 0.01
STEPS = 3


def save_tiny_checkpoint(path):
    torch.manual_seed(0)
    LossFreeMoeForCausalLM(LossFreeMoeConfig(**TINY_MOE, router_bias_update_rate=RATE)).save_pretrained(path)
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
