"""Routers at a fraction of the learning rate: `router_param_groups` and `optim_args="router_lr_ratio=..."`."""

import pytest
import torch
from moe_tiny import TINY_MOE
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hf_signopt
from hf_signopt import LossFreeMoeConfig, LossFreeMoeForCausalLM
from hf_signopt.moe.balancer import router_parameters


def tiny_moe():
    torch.manual_seed(0)
    return LossFreeMoeForCausalLM(LossFreeMoeConfig(**TINY_MOE))


def test_groups_put_the_router_weights_apart_at_the_ratio():
    model = tiny_moe()
    routers = {id(p) for p in router_parameters(model)}
    assert len(routers) == TINY_MOE["num_hidden_layers"]  # one gate weight per layer, the bias is a buffer
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    groups = hf_signopt.router_param_groups(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], model, 0.1, lr=1e-3)
    assert [len(g["params"]) for g in groups] == [len(decay) - len(routers), len(routers), len(no_decay)]
    assert groups[1]["lr"] == pytest.approx(1e-4) and groups[1]["weight_decay"] == 0.1
    assert "lr" not in groups[0] and "lr" not in groups[2]
    assert {id(p) for p in groups[1]["params"]} == routers


def test_plain_loop_moves_routers_by_the_smaller_rate():
    model = tiny_moe()
    optimizer = hf_signopt.Signum(hf_signopt.router_param_groups(model.parameters(), model, 0.1, lr=1e-2), lr=1e-2,
                                  momentum=0.0, weight_decay=0.0)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    routers = {id(p) for p in router_parameters(model)}
    for p in model.parameters():
        step = (p.detach() - before[id(p)]).abs().max().item()
        if p.grad is not None and p.grad.abs().max() > 0:  # signSGD: every element with a gradient moves by lr
            assert step == pytest.approx(1e-3 if id(p) in routers else 1e-2, rel=1e-3)


@pytest.mark.e2e
def test_trainer_optim_args_router_lr_ratio_survives_the_schedule(tmp_path):
    model = tiny_moe()
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(1))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(str(tmp_path), optim="simba", optim_args="router_lr_ratio=0.25,window_size=64",
                             learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=1, max_steps=3,
                             per_device_train_batch_size=2, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    ratios = []

    class RecordRates(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            ratios.append([group["lr"] for group in optimizer.param_groups])

    trainer.add_callback(RecordRates())
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, hf_signopt.Simba) and optimizer.defaults["window_size"] == 64
    routers = {id(p) for p in router_parameters(model)}
    router_groups = [i for i, g in enumerate(optimizer.param_groups) if {id(p) for p in g["params"]} <= routers]
    assert len(router_groups) == 1
    for lrs in ratios:  # warm-up then linear decay, every step the routers at a quarter of the others' rate
        others = [lr for i, lr in enumerate(lrs) if i not in router_groups]
        assert lrs[router_groups[0]] == pytest.approx(0.25 * others[0]) and len(set(others)) == 1


@pytest.mark.parametrize(("optim", "optim_args", "settings"), [
    ("simba", "window_size=64,threshold=0.2,router_lr_ratio=0.25", {"window_size": 64, "threshold": 0.2}),
    ("adamw_torch", "router_lr_ratio=0.25", {"betas": (0.9, 0.999)}),  # one of transformers' own names
])
def test_router_groups_keep_the_trainer_s_grouping_and_the_schedule(tmp_path, optim, optim_args, settings):
    model = tiny_moe()
    routers = {id(p) for p in router_parameters(model)}
    names = {id(p): n for n, p in model.named_parameters()}
    args = TrainingArguments(str(tmp_path), optim=optim, optim_args=optim_args, learning_rate=2e-3,
                             weight_decay=0.1, use_cpu=True, report_to="none")
    trainer = Trainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    assert args.optim_args == optim_args  # the Trainer's arguments are left as they were
    by_routers = {all(id(p) in routers for p in g["params"]): g for g in optimizer.param_groups if g["params"]}
    router_group = by_routers[True]
    assert {id(p) for p in router_group["params"]} == routers
    assert (router_group["lr"], router_group["weight_decay"]) == (2e-3 * 0.25, 0.1)
    assert all(router_group[key] == value for key, value in settings.items())  # the optimizer's settings too
    # The Trainer's weight decay grouping is intact, less the routers: norms never decay.
    others = [g for g in optimizer.param_groups if g is not router_group]
    no_decay = {names[id(p)] for g in others if g["weight_decay"] == 0.0 for p in g["params"]}
    assert no_decay == {n for n in names.values() if "norm" in n or n.endswith(".bias")}
    every = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    assert sorted(every) == sorted(names.values())  # each parameter exactly once
    scheduler = trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        assert router_group["lr"] == pytest.approx(0.25 * others[0]["lr"], rel=1e-12) and others[0]["lr"] < 2e-3


@pytest.mark.parametrize("value", ["0", "-1", "abc", "inf"])
def test_bad_router_lr_ratio_is_refused(tmp_path, value):
    args = TrainingArguments(str(tmp_path), optim="lion", optim_args=f"router_lr_ratio={value}", report_to=[],
                             use_cpu=True)
    trainer = Trainer(model=tiny_moe(), args=args)
    with pytest.raises(ValueError, match="router_lr_ratio"):
        trainer.create_optimizer()


def test_router_lr_ratio_on_a_model_without_routers_is_refused(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    args = TrainingArguments(str(tmp_path), optim="simba", optim_args="router_lr_ratio=0.1", report_to=[],
                             use_cpu=True)
    with pytest.raises(ValueError, match="has no MoE router"):
        Trainer(model=model, args=args).create_optimizer()
