"""GPU: 2:4 semi-structured sparse MLP matmuls of a Llama-1B-shaped model vs dense, float16.

Run on a machine with an NVIDIA GPU (sm80+, where torch's semi-structured sparse kernels exist):
    python benchmarks/gpu_sparse24.py [--out benchmarks/results/gpu_sparse24.json]
Weights are pruned to 2:4 with leanlm's N:M mask (magnitude) and converted with
torch.sparse.to_sparse_semi_structured; each shape is timed with CUDA events, median of repeats after
warm-up, dense and sparse in the same process. Target: >= 1.2x on the MLP matmuls at 16+ tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from leanlm.prune.prune_ops import magnitude_mask

HIDDEN, INTERMEDIATE = 2048, 8192  # Llama-3.2-1B
SHAPES = {"gate/up": (INTERMEDIATE, HIDDEN), "down": (HIDDEN, INTERMEDIATE)}


def time_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_sparse24.json")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
        w = w.masked_fill(magnitude_mask(w, 0.5, (2, 4)), 0)
        sparse = to_sparse_semi_structured(w)
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
            torch.testing.assert_close(F.linear(x, sparse), F.linear(x, w), atol=0.5, rtol=1e-2)
            dense_ms = time_ms(lambda: F.linear(x, w), args.repeats, 10)
            sparse_ms = time_ms(lambda: F.linear(x, sparse), args.repeats, 10)
            rows.append({"matmul": name, "tokens": tokens, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                         "speedup": dense_ms / sparse_ms})
    print(f"{'matmul':8s} {'tokens':>6s} {'dense ms':>9s} {'2:4 ms':>9s} {'speedup':>8s}   ({torch.cuda.get_device_name()})")
    for r in rows:
        print(f"{r['matmul']:8s} {r['tokens']:6d} {r['dense_ms']:9.4f} {r['sparse_ms']:9.4f} {r['speedup']:7.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
