"""GPU: LoRA training throughput of a SmolLM2-135M-shaped model through leanlm's trainer.

Run on a machine with an NVIDIA GPU:
    python benchmarks/gpu_lora_throughput.py [--out benchmarks/results/gpu_lora.json]
The model has SmolLM2-135M's exact architecture with random weights (a GPU machine without network
cannot fetch the real ones; throughput does not depend on the values). LoRA r=16 on every projection,
bf16 autocast, sequences of 512 tokens; tokens/s is measured over the timed steps after warm-up.
Target: >= 20k training tokens/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from leanlm.finetune.finetune import causal_lm_loss
from leanlm.finetune.lora import add_lora, lora_targets
from leanlm.train.examples import Examples
from leanlm.train.trainer import TrainConfig, Trainer

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    tie_word_embeddings=True, rope_theta=100000.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_lora.json")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(args.device)
    model = add_lora(model, lora_targets(model, ["*proj"])[0], rank=16, alpha=32, dropout=0.05)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch_size * 4, args.seq_len))
    data = Examples(ids, ids.clone(), torch.ones_like(ids))
    config = TrainConfig(steps=args.steps + args.warmup_steps, batch_size=args.batch_size,
                         micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, mixed_precision="bf16",
                         lr=2e-4, warmup_steps=1, patience=0, eval_every=10_000, checkpoint_every=10_000)
    trainer = Trainer(model, causal_lm_loss, data, data.split(0.05)[1], config, desc="LoRA throughput")
    for step in range(args.warmup_steps):
        trainer.train_step(step)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for step in range(args.warmup_steps, args.warmup_steps + args.steps):
        trainer.train_step(step)
    sync()
    seconds = time.perf_counter() - start
    tps = args.steps * args.batch_size * args.seq_len / seconds
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"device": device_name, "tokens_per_second": tps, "steps": args.steps,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "peak_mem_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else None}
    print(f"LoRA r=16, bf16, {args.batch_size} x {args.seq_len} tokens/step on {result['device']}: {tps:,.0f} tokens/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
