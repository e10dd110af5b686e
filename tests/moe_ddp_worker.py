"""Worker for test_moe_ddp.py: trains a tiny float64 LossFreeMoe with the balance callback, alone or as one DDP rank.

Usage: `python moe_ddp_worker.py OUT_DIR` (single process) or under `torchrun --nproc_per_node 2` (each rank
writes `OUT_DIR/rank{r}.pt`). Every micro-batch has 2 rows and every optimizer step 8: 4 accumulated micro-batches
alone, 2 per rank under DDP. The data order is sequential and the ranks take the micro-batches in turn, so each
DDP micro-batch is one of the single process's micro-batches, same rows, same shapes.
"""

import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

from hf_signopt import LossFreeBalanceCallback, LossFreeMoeConfig, LossFreeMoeForCausalLM

MICRO_BATCH = 2
MICRO_BATCHES_PER_STEP = 4


def main(out_dir: str) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    config = LossFreeMoeConfig(
        vocab_size=48, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        router_bias_update_rate=0.05,
    )
    # float64, so that the two runs' rounding differences cannot flip a top-k choice (see test_moe_ddp.py); the
    # router bias stays float32. The default grouped_mm experts kernel has no float64 version on CPU.
    model = LossFreeMoeForCausalLM(config).double()
    model.set_experts_implementation("eager")
    rows = torch.randint(0, 48, (40, 12), generator=torch.Generator().manual_seed(1))
    train = [{"input_ids": r, "labels": r} for r in rows[:32]]
    evaluation = [{"input_ids": r, "labels": r} for r in rows[32:]]
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=MICRO_BATCH, per_device_eval_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=MICRO_BATCHES_PER_STEP // world_size, max_steps=4, learning_rate=1e-2,
        optim="sgd",  # no momentum: a gradient difference becomes a parameter difference of lr times it
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=7,
        train_sampling_strategy="sequential", ddp_backend="gloo" if world_size > 1 else None,
        ddp_broadcast_buffers=False,  # so that equal biases on the ranks come from the count reduction alone
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                      callbacks=[LossFreeBalanceCallback()])
    trainer.train()
    metrics = trainer.evaluate()
    result = {
        "biases": torch.stack([layer.mlp.gate.e_score_correction_bias for layer in model.model.layers]),
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "maxvio": [e["moe/maxvio"] for e in trainer.state.log_history if "moe/maxvio" in e],
        "eval_maxvio_global": metrics["eval_moe/maxvio_global"],
    }
    torch.save(result, f"{out_dir}/rank{trainer.args.process_index}.pt")
    if dist.is_initialized():  # every collective above is synchronous; leave together, then free gloo's threads
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
