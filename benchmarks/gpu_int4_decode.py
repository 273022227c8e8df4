"""GPU: int4 weight-only decode of a Llama-1B-shaped model (random weights) vs bfloat16, same loop.

Run on a machine with an NVIDIA GPU (sm80+; tinygemm's int4 kernel):
    python benchmarks/gpu_int4_decode.py [--out benchmarks/results/gpu_int4.json]
Both models are timed by leanlm's own generation loop (core.bench), batch 1, median of repeats after
warm-up, in this one process, twice: the eager loop (dynamic cache, one Python forward per token) and
core.compiled_decode (static cache, torch.compile, CUDA graphs), where launch overhead no longer hides
the matmuls. The int4 models are round-to-nearest, asymmetric: groups of 64 with the LM head kept
bf16, the same with the LM head int4 too (as gpt-fast quantizes it), and groups of 128 (random weights:
only speed is measured, after checking each int4 kernel against the dequantized weight).
`--device cpu --layers 1` smoke-tests the script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from leanlm.measure.bench import BenchConfig, benchmark
from leanlm.models.load import LoadedModel
from leanlm.quantize import RTNConfig, quantize_
from leanlm.quantize.int4_linear import Int4Linear

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                tie_word_embeddings=True)


def build(device: torch.device, layers: int) -> LoadedModel:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers})).to(torch.bfloat16).eval()
    return LoadedModel(model=model, tokenizer=None, source="llama-1b-random", path=Path("."), disk_bytes=0)


def check_kernel(model) -> float:
    """Relative error of one int4 layer's kernel output against its dequantized weight's matmul."""
    layer = next(m for m in model.modules() if isinstance(m, Int4Linear))
    x = torch.randn(4, layer.in_features, device=layer.qweight.device, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = layer(x).float(), F.linear(x.float(), layer.dequantized_weight(torch.float32))
    err = ((got - want).norm() / want.norm()).item()
    if err > 0.02:
        raise SystemExit(f"int4 kernel disagrees with the dequantized weight: relative error {err:.4f}")
    return err


def run_both(loaded, args) -> dict:
    rows = {}
    for compiled in (False, True):
        cfg = BenchConfig(prompt_tokens=512, decode_prompt_tokens=64, new_tokens=args.new_tokens, batch=1,
                          repeats=args.repeats, warmup=2 if compiled else 1, compile=compiled)
        start = time.perf_counter()
        loop = "compiled" if compiled else "eager"
        try:
            rows[loop] = benchmark(loaded, cfg)
        except Exception:  # a compile failure must not lose the eager rows already measured
            if not compiled:
                raise
            traceback.print_exc()
            continue
        print(f"  {loop} loop: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def release() -> None:
    """Drop the last model: dynamo's caches and CUDA graph pools hold it, and would inflate the next peak."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


VARIANTS = {  # name: (group size, LM head quantized too)
    "int4-g64": (64, False),
    "int4-g64+head": (64, True),
    "int4-g128": (128, False),
}


def quantized(args, device, group_size: int, head: bool) -> tuple[LoadedModel, dict, float]:
    loaded = build(device, args.layers)
    stats = quantize_(loaded.model, RTNConfig(bits=4, group_size=group_size, symmetric=False,
                                              skip=[] if head else ["lm_head"]))
    return loaded, stats, check_kernel(loaded.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_int4.json")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=LLAMA_1B["num_hidden_layers"])
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print("bfloat16:", flush=True)
    models = {"bfloat16": run_both(build(device, args.layers), args)}
    details = {}
    for variant in args.variants:
        release()
        loaded, stats, err = quantized(args, device, *VARIANTS[variant])
        print(f"{variant} (kernel relative error {err:.2e}):", flush=True)
        models[variant] = run_both(loaded, args)
        details[variant] = {"kernel_rel_error": err, "fraction_of_bf16": stats["fraction_of_bf16"]}
        del loaded
    report(models, details, name, args)


def report(models: dict, details: dict, name: str, args) -> None:
    print(f"{name}  (Llama-1B shape, {args.layers} layers, random weights, batch-1 decode)")
    print(f"{'model':14s} {'loop':9s} {'decode tok/s':>13s} {'vs bf16':>8s} {'prefill tok/s':>14s} {'peak MiB':>9s}")
    base = models["bfloat16"]
    ratios = {}
    for model_name, rows in models.items():
        for loop, r in rows.items():
            ratio = r["decode_tps"] / base[loop]["decode_tps"] if loop in base else float("nan")
            ratios[f"{model_name}/{loop}"] = ratio
            print(f"{model_name:14s} {loop:9s} {r['decode_tps']:13.1f} {ratio:7.2f}x {r['prefill_tps']:14.1f} "
                  f"{r['peak_mem_bytes'] / 2**20:9.0f}")
    for variant, d in details.items():
        print(f"{variant}: quantized layers take {d['fraction_of_bf16']:.3f} of their bf16 bytes")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__,
                                          "layers": args.layers, "models": models, "details": details,
                                          "decode_ratio": ratios}, indent=2))


if __name__ == "__main__":
    main()
