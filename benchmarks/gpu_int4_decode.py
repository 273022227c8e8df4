"""GPU: int4 weight-only decode of a Llama-1B-shaped model (random weights) vs bfloat16, same loop.

Run on a machine with an NVIDIA GPU (sm80+; tinygemm's int4 kernel):
    python benchmarks/gpu_int4_decode.py [--out benchmarks/results/gpu_int4.json]
Both models are timed by leanlm's own generation loop (core.bench: prefill, then decode_one_token
with a dynamic cache), batch 1, median of repeats after warm-up, in this one process. The int4
model is quantized with round-to-nearest, groups of 64 (random weights: only speed is measured).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from leanlm.core.bench import BenchConfig, benchmark
from leanlm.core.models import LoadedModel
from leanlm.quantize import RTNConfig, quantize_

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                tie_word_embeddings=True)


def build(device: torch.device) -> LoadedModel:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16).eval()
    return LoadedModel(model=model, tokenizer=None, source="llama-1b-random", path=Path("."), disk_bytes=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_int4.json")
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    cfg = BenchConfig(prompt_tokens=512, decode_prompt_tokens=64, new_tokens=128, batch=8, repeats=5, warmup=2)
    loaded = build(device)
    base = benchmark(loaded, cfg)
    stats = quantize_(loaded.model, RTNConfig(bits=4, group_size=args.group_size, symmetric=False))
    torch.cuda.empty_cache()
    int4 = benchmark(loaded, cfg)
    rows = {"bfloat16": base, f"int4-g{args.group_size}": int4}
    print(f"{torch.cuda.get_device_name()}  (Llama-1B shape, random weights, batch-1 decode)")
    print(f"{'model':12s} {'decode tok/s':>13s} {'prefill tok/s':>14s} {'peak MiB':>9s}")
    for name, r in rows.items():
        print(f"{name:12s} {r['decode_tps']:13.1f} {r['prefill_tps']:14.1f} {r['peak_mem_bytes'] / 2**20:9.0f}")
    ratio = int4["decode_tps"] / base["decode_tps"]
    print(f"int4 / bf16 decode: {ratio:.2f}x   (quantized layers: {stats['fraction_of_bf16']:.3f} of their bf16 bytes)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                                          "rows": rows, "decode_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
