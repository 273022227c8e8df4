"""Batch-1 CPU decode of the dense model vs activation-sparse models (TEAL thresholds), interleaved.

    python benchmarks/bench_act_sparse_decode.py [--sparsity 0.4 0.5] [--rotation none int8] [--rounds 5]
                                                 [--out benchmarks/results/act_sparse_decode.json]
Thresholds are calibrated on `--samples` x 512 tokens of the default train split (uniform per layer,
every linear but the LM head), once per sparsity and `--rotation` (none: TEAL's own basis; int8 or
float32: the norm-fed inputs rotated first, the rotation stored in that precision). Each model is timed in the eager loop and in the compiled loop
(core.compiled_decode); every round times every model in turn, so the machine's drift hits all alike.
The table gives medians over rounds and ratios to the dense model in the same loop.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from bench_compiled_decode import (
    tokens_per_second,  # benchmarks/ is on sys.path when run as a script
)
from leanlm.runtime.decoder import EagerDecoder

from leanlm.data.corpus import calibration_samples, default_corpus
from leanlm.kernels import kernel_status
from leanlm.models.builtin import DEFAULT_MODEL
from leanlm.models.load import load_model
from leanlm.runtime.compiled_decode import CompiledDecoder
from leanlm.sparsify import ActSparsityConfig, sparsify_activations_


def build_models(args) -> dict:
    loaded = load_model(args.model, "cpu", "float32")
    calibration = calibration_samples(loaded.tokenizer, default_corpus().train, args.samples, 512)
    models = {"dense": loaded.model}
    for sparsity in args.sparsity:
        for rotation in args.rotation:
            model = copy.deepcopy(loaded.model)
            sparsify_activations_(model, ActSparsityConfig(sparsity=sparsity, rotation=rotation), calibration)
            label = "" if rotation == "none" else f", rotated {rotation}"
            models[f"act-sparse {sparsity:.0%}{label}"] = model
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.5])
    parser.add_argument("--rotation", nargs="+", choices=["none", "int8", "float32"], default=["none", "int8"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--out", default="benchmarks/results/act_sparse_decode.json")
    args = parser.parse_args()
    prompt = torch.randint(100, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    decoders = {}
    for name, model in build_models(args).items():
        decoders[(name, "eager")] = EagerDecoder(model)
        decoders[(name, "compiled")] = CompiledDecoder(model, max_len=prompt.shape[1] + args.tokens + 1)
        for _ in range(2):  # the compiled loop's eager first step, then its compile
            tokens_per_second(decoders[(name, "compiled")], prompt, 4)
        tokens_per_second(decoders[(name, "eager")], prompt, 4)
        print(f"ready: {name}", flush=True)
    rounds = {key: [] for key in decoders}
    for _ in range(args.rounds):
        for key, decoder in decoders.items():
            rounds[key].append(tokens_per_second(decoder, prompt, args.tokens))
    rows = {}
    print(f"{'model':32s} {'loop':9s} {'decode tok/s':>12s} {'min-max':>13s} {'vs dense':>9s}   "
          f"({torch.get_num_threads()} threads; kernels: {kernel_status()})")
    for (name, loop), values in rounds.items():
        median = statistics.median(values)
        ratio = median / statistics.median(rounds[("dense", loop)])
        rows[f"{name} / {loop}"] = {"median_tps": median, "rounds": values, "ratio": ratio}
        print(f"{name:32s} {loop:9s} {median:12.2f} {min(values):6.1f}-{max(values):<6.1f} {ratio:8.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": args.model,
                                          "threads": torch.get_num_threads(), "tokens": args.tokens,
                                          "samples": args.samples, "rotation": args.rotation, "quant_kernels": kernel_status(),
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
