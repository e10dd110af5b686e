"""`Trainer` end to end with every hf_signopt optimizer name on a tiny char-level Llama (CPU, offline)."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import hf_signopt  # noqa: F401  (registers the optim names with TrainingArguments)
from hf_signopt.optim import Lion, SignMomentum, Signum, Simba


pytestmark = pytest.mark.e2e

# transformers 5.23 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns).
_CHECKPOINTING = next(
    name
    for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in TrainingArguments.__dataclass_fields__
)
NAMES = {"lion": Lion, "signum": Signum, "signsgd": Signum, "signmomentum": SignMomentum, "simba": Simba}
SEQ_LEN = 32
_CORPUS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "tinyshakespeare.txt"
_TEXT = _CORPUS.read_text(encoding="utf-8")[:20_000]
_VOCAB = {char: index for index, char in enumerate(sorted(set(_TEXT)))}
_TOKENS = torch.tensor([_VOCAB[char] for char in _TEXT])


class _CharBlocks(Dataset):
    """Consecutive `SEQ_LEN`-character blocks of Tiny Shakespeare as causal-LM examples."""

    def __init__(self, first: int, count: int):
        self.blocks = _TOKENS[first * SEQ_LEN : (first + count) * SEQ_LEN].view(count, SEQ_LEN)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, index):
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


_TRAIN = _CharBlocks(0, 256)
_HELD_OUT = _CharBlocks(400, 16).blocks


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(_VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _args(output_dir, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no",
        logging_strategy="no", per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
        weight_decay=0.01, seed=0, dataloader_num_workers=0,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def _unwrapped_optimizer(trainer) -> torch.optim.Optimizer:
    """The optimizer the Trainer built, without accelerate's `AcceleratedOptimizer` wrapper."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


@torch.no_grad()
def _held_out_loss(model) -> float:
    model.eval()
    return model(input_ids=_HELD_OUT, labels=_HELD_OUT).loss.float().item()


@pytest.mark.parametrize("name", NAMES)
def test_loss_goes_down(tmp_path, name):
    model = _tiny_llama()
    before = _held_out_loss(model)
    trainer = Trainer(model=model, args=_args(tmp_path, optim=name, max_steps=30), train_dataset=_TRAIN)
    trainer.train()
    assert type(_unwrapped_optimizer(trainer)) is NAMES[name]
    after = _held_out_loss(model)
    assert after < before - 0.5, (before, after)


@pytest.mark.parametrize(
    ("name", "optim_args"),
    [("lion", "beta1=0.95,beta2=0.98"), ("signum", None), ("signsgd", None), ("signmomentum", None),
     ("simba", "window_size=64,threshold=0.2,momentum=ema")],
)
def test_accumulation_clipping_checkpointing_bf16(tmp_path, name, optim_args):
    model = _tiny_llama()
    before = _held_out_loss(model)
    args = _args(
        tmp_path, optim=name, optim_args=optim_args, max_steps=15, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_grad_norm=0.5, bf16=True, **{_CHECKPOINTING: True},
    )
    trainer = Trainer(model=model, args=args, train_dataset=_TRAIN)
    trainer.train()
    assert trainer.state.global_step == 15
    assert trainer.accelerator.mixed_precision == "bf16" and getattr(model, f"is_{_CHECKPOINTING}")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _held_out_loss(model) < before


def _optimizer_state(trainer):
    return _unwrapped_optimizer(trainer).state_dict()


def _assert_same_state(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        if isinstance(expected[key], dict):
            _assert_same_state(actual[key], expected[key])
        elif isinstance(expected[key], torch.Tensor):
            assert actual[key].dtype == expected[key].dtype, key
            assert torch.equal(actual[key], expected[key]), key
        else:
            assert actual[key] == expected[key], key


@pytest.mark.parametrize(
    ("name", "optim_args"),
    [("lion", None), ("signum", None), ("signsgd", None), ("signmomentum", None), ("simba", None),
     ("simba", "momentum=ema,window_size=16")],
)
def test_resume_matches_uninterrupted_run(tmp_path, name, optim_args):
    common = dict(optim=name, optim_args=optim_args, max_steps=8, save_strategy="steps", save_steps=4)
    uninterrupted = Trainer(model=_tiny_llama(), args=_args(tmp_path / "a", **common), train_dataset=_TRAIN)
    uninterrupted.train()
    checkpoint = tmp_path / "a" / "checkpoint-4"
    assert checkpoint.is_dir()

    resumed = Trainer(model=_tiny_llama(seed=1), args=_args(tmp_path / "b", **common), train_dataset=_TRAIN)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.state.global_step == uninterrupted.state.global_step == 8
    expected_params = dict(uninterrupted.model.named_parameters())
    for param_name, param in resumed.model.named_parameters():
        assert torch.equal(param, expected_params[param_name]), param_name
    expected_state = _optimizer_state(uninterrupted)
    if name != "signsgd":
        assert expected_state["state"], "the optimizer keeps state, so the comparison below is not vacuous"
    _assert_same_state(_optimizer_state(resumed), expected_state)
