"""CPU speed of a MoE-fied model against its dense original: prompts, batched and batch-1 decode, interleaved.

    leanlm optimize --recipe moefy --out moefy-out        # makes the MoE checkpoint (about 10 minutes)
    python benchmarks/bench_moe_dispatch.py moefy-out/model [--rounds 7] [--dtype bfloat16]
                                            [--out benchmarks/results/moe_dispatch.json]
The MoE model is timed twice: as it runs (many rows: each routed expert on the rows that chose it, as
one batched product; one row: the chosen experts' slices) and with every path forced to the masked
full FFN (all experts computed, unchosen ones zeroed), which is what a compiled graph runs. Every round
times every variant in turn, so the machine's drift hits all alike; medians over rounds, ratios to the
dense model of the same round set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from leanlm.models.builtin import DEFAULT_MODEL
from leanlm.models.load import load_model
from leanlm.runtime.generate import decode_one_token, new_cache, prefill
from leanlm.sparsify import MoEFFN

SHAPES = {"prefill 512": (1, 512, 0), "prefill 64": (1, 64, 0), "decode x1": (1, 32, 32), "decode x8": (8, 32, 32)}


@contextlib.contextmanager
def masked_everywhere():
    """Route as usual, then compute every expert and zero the unchosen ones, whatever the row count."""
    default = MoEFFN.forward
    MoEFFN.forward = lambda self, x: self.run_masked(x.reshape(-1, self.hidden),
                                                     self.route(x.reshape(-1, self.hidden))).reshape(x.shape)
    try:
        yield
    finally:
        MoEFFN.forward = default


@torch.inference_mode()
def tokens_per_second(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Prompt tokens/s when `new_tokens` is 0, else decode tokens/s (all rows) after an untimed prefill."""
    cache = new_cache(model)
    start = time.perf_counter()
    token = prefill(model, ids, cache).argmax(-1, keepdim=True)
    if not new_tokens:
        return ids.numel() / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = decode_one_token(model, token, cache).argmax(-1, keepdim=True)
    return ids.shape[0] * new_tokens / (time.perf_counter() - start)


def time_round(variants: dict, prompts: dict) -> dict:
    out = {}
    for name, (model, context) in variants.items():
        with context():
            for shape, ids in prompts.items():
                out[(name, shape)] = tokens_per_second(model, ids, SHAPES[shape][2])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("moe", help="a MoE-fied leanlm checkpoint (the model/ of `leanlm optimize --recipe moefy`)")
    parser.add_argument("--dense", default=DEFAULT_MODEL, help="the model it was made from")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="both models cast to this after loading (a checkpoint loads as saved)")
    parser.add_argument("--out", default="benchmarks/results/moe_dispatch.json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    moe = load_model(args.moe, "cpu").model.to(dtype)
    if not any(isinstance(m, MoEFFN) for m in moe.modules()):
        raise SystemExit(f"{args.moe} has no MoE-fied FFN; make one with `leanlm optimize --recipe moefy`")
    variants = {"dense": (load_model(args.dense, "cpu").model.to(dtype), contextlib.nullcontext),
                "moe": (moe, contextlib.nullcontext), "moe, masked": (moe, masked_everywhere)}
    gen = torch.Generator().manual_seed(0)
    prompts = {shape: torch.randint(100, 20000, (rows, length), generator=gen)
               for shape, (rows, length, _) in SHAPES.items()}
    time_round(variants, prompts)  # warm-up
    rounds = [time_round(variants, prompts) for _ in range(args.rounds)]
    table = {}
    print(f"{'shape':12s} {'variant':12s} {'tokens/s':>9s} {'vs dense':>9s}   ({torch.get_num_threads()} threads)")
    for shape in SHAPES:
        dense = statistics.median(r[("dense", shape)] for r in rounds)
        for name in variants:
            values = [r[(name, shape)] for r in rounds]
            median = statistics.median(values)
            table[f"{shape} / {name}"] = {"median_tps": median, "rounds": values, "ratio": median / dense}
            print(f"{shape:12s} {name:12s} {median:9.1f} {median / dense:8.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "moe": args.moe, "dense": args.dense,
                                          "threads": torch.get_num_threads(), "rounds": args.rounds,
                                          "dtype": args.dtype, "results": table}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
