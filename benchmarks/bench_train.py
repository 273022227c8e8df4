"""CPU (or GPU) training throughput of the default model through leanlm's trainer: LoRA r=16 on every
projection vs full fine-tuning, same batches.

    python benchmarks/bench_train.py [--steps 4] [--out benchmarks/results/train.json]
Each mode runs one untimed warm-up step, then `--steps` timed optimizer steps of batch x seq_len
tokens on the built-in corpus's train split; tokens/s is the median over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from leanlm.data.corpus import default_corpus
from leanlm.finetune.finetune import causal_lm_loss
from leanlm.finetune.lora import add_lora, lora_targets
from leanlm.models.load import load_model
from leanlm.train.examples import text_examples
from leanlm.train.trainer import TrainConfig, Trainer


def measure(mode: str, args) -> dict:
    loaded = load_model("smollm2-135m", device="auto")
    model = loaded.model
    if mode == "lora":
        model = add_lora(model, lora_targets(model, ["*proj"])[0], rank=16, alpha=32, dropout=0.05)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    data = text_examples(loaded.tokenizer, default_corpus().train, args.seq_len)
    config = TrainConfig(steps=args.steps + 1, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                         seq_len=args.seq_len, lr=1e-4, warmup_steps=1, patience=0)
    trainer = Trainer(model, causal_lm_loss, data, data.split(0.05)[1], config, desc=mode)
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        trainer.train_step(step)
        times.append(time.perf_counter() - start)
    tokens = args.batch_size * args.seq_len
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"mode": mode, "tokens_per_second": tokens / statistics.median(times[1:]), "step_seconds": times[1:],
            "trainable_params": trainable, "device": str(trainer.acc.device), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/train.json")
    args = parser.parse_args()
    rows = [measure(mode, args) for mode in ("lora", "full")]
    print(f"{'mode':6s} {'trainable':>12s} {'tokens/s':>10s}   ({args.batch_size} x {args.seq_len} tokens per step, "
          f"median of {args.steps} steps after 1 warm-up, {rows[0]['device']}, {rows[0]['threads']} threads)")
    for r in rows:
        print(f"{r['mode']:6s} {r['trainable_params'] / 1e6:11.2f}M {r['tokens_per_second']:10.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "config": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
