"""CPU batch-1 decode of float32 vs int8/int4 weight-only models, all in the compiled loop, interleaved.

    python benchmarks/bench_compiled_decode.py [--rounds 5] [--out benchmarks/results/compiled_decode.json]
Every model is compiled once (core.compiled_decode), then each round times every model in turn
(`--tokens` decode steps after a 32-token prompt), so the machine's drift hits all of them alike; the
table gives each model's median over the rounds and its ratio to float32's median. Weights are
round-to-nearest (speed only; see BENCHMARKS.md for their quality).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from leanlm.kernels import kernel_status
from leanlm.models.builtin import DEFAULT_MODEL
from leanlm.models.load import load_model
from leanlm.quantize import RTNConfig, quantize_
from leanlm.runtime.compiled_decode import CompiledDecoder

INT4 = RTNConfig(bits=4, group_size=64, symmetric=False)
VARIANTS = {  # name: the RTN configs applied in turn, none for the float32 baseline
    "float32": (),
    "int8, LM head float32": (RTNConfig(bits=8),),
    "int8, LM head int8": (RTNConfig(bits=8, skip=[]),),
    "int4 g64, LM head float32": (INT4,),
    "int4 g64, LM head int4": (RTNConfig(bits=4, group_size=64, symmetric=False, skip=[]),),
    # llama.cpp's Q4_0 files keep the output matrix at higher precision (Q6_K) the same way
    "int4 g64, LM head int8": (INT4, RTNConfig(bits=8, targets=["lm_head"], skip=[])),
}


def tokens_per_second(decoder: CompiledDecoder, prompt: torch.Tensor, tokens: int) -> float:
    cache = decoder.new_cache(1)
    token = decoder.prefill(prompt, cache).argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(tokens):
        token = decoder.decode_one_token(token, cache).argmax(-1, keepdim=True)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--out", default="benchmarks/results/compiled_decode.json")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="models to time (float32 always runs: it is the baseline)")
    args = parser.parse_args()
    base = load_model(args.model, "cpu", "float32").model
    prompt = torch.randint(100, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    decoders = {}
    chosen = {name: VARIANTS[name] for name in VARIANTS if name == "float32" or name in args.variants}
    for name, configs in chosen.items():
        model = copy.deepcopy(base) if configs else base
        for config in configs:
            quantize_(model, config)
        start = time.perf_counter()
        decoders[name] = CompiledDecoder(model, max_len=prompt.shape[1] + args.tokens + 1)
        for _ in range(2):  # the eager first step, then the compile
            tokens_per_second(decoders[name], prompt, 4)
        print(f"compiled {name} in {time.perf_counter() - start:.0f} s", flush=True)
    rounds = {name: [] for name in chosen}
    for _ in range(args.rounds):
        for name, decoder in decoders.items():
            rounds[name].append(tokens_per_second(decoder, prompt, args.tokens))
    base_tps = statistics.median(rounds["float32"])
    rows = {name: {"median_tps": statistics.median(v), "rounds": v, "ratio": statistics.median(v) / base_tps}
            for name, v in rounds.items()}
    print(f"{'model (compiled loop)':28s} {'decode tok/s':>12s} {'min-max':>13s} {'vs float32':>10s}"
          f"   ({torch.get_num_threads()} threads; quantized kernels: {kernel_status()})")
    for name, r in rows.items():
        print(f"{name:28s} {r['median_tps']:12.2f} {min(r['rounds']):6.1f}-{max(r['rounds']):<6.1f} {r['ratio']:9.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": args.model,
                                          "threads": torch.get_num_threads(), "tokens": args.tokens,
                                          "quant_kernels": kernel_status(),
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
