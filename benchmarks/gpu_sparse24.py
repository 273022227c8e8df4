"""GPU: 2:4 semi-structured sparse MLP matmuls of a Llama-1B-shaped model vs dense, float16.

Run on a machine with an NVIDIA GPU (sm80+, where torch's semi-structured sparse kernels exist):
    python benchmarks/gpu_sparse24.py [--out benchmarks/results/gpu_sparse24.json]
Weights are pruned to 2:4 with leanlm's N:M mask (magnitude) and converted with
torch.sparse.to_sparse_semi_structured, once per backend torch has (CUTLASS, and cuSPARSELt where
installed); each shape is timed with CUDA events, median of repeats after warm-up, dense and sparse in
the same process. "mlp" sums gate + up + down. Target: >= 1.2x on the MLP matmuls at 16+ tokens.
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
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 128, 512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    rows, unsupported = [], {}
    for backend in backends():
        try:
            timer = time_cslt_direct if backend == "cslt-direct" else time_backend
            rows += timer(backend, args.tokens, args.repeats)
        except (RuntimeError, TypeError, AttributeError) as err:  # CUTLASS's 2:4 kernels exist for sm8x only; Hopper needs cuSPARSELt
            unsupported[backend] = str(err).splitlines()[0]
            print(f"{backend}: not available on this GPU: {unsupported[backend]}")
    print(f"{'backend':10s} {'matmul':8s} {'tokens':>6s} {'dense ms':>9s} {'2:4 ms':>9s} {'speedup':>8s}"
          f"   ({torch.cuda.get_device_name()}, torch {torch.__version__})")
    for r in rows:
        print(f"{r['backend']:10s} {r['matmul']:8s} {r['tokens']:6d} {r['dense_ms']:9.4f} {r['sparse_ms']:9.4f} "
              f"{r['speedup']:7.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "rows": rows, "unsupported": unsupported}, indent=2))


def backends() -> list[str]:
    found = ["cutlass"]
    if torch.backends.cusparselt.is_available():
        found += ["cusparselt", "cslt-direct"]
    return found


def time_cslt_direct(backend: str, token_counts: list[int], repeats: int) -> list[dict]:
    """cuSPARSELt called directly, weights compressed once and the best algorithm searched once per
    shape, without the tensor subclass's per-call transposes and padding: what a runtime could get."""
    torch.manual_seed(0)
    rows = []
    for tokens in token_counts:
        total = {"dense_ms": 0.0, "sparse_ms": 0.0}
        for name, (out_f, in_f) in SHAPES.items():
            w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
            w = w.masked_fill(magnitude_mask(w, 0.5, (2, 4)), 0)
            packed = torch._cslt_compress(w)
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)
            xt = x.t()  # W @ x^T with transpose_result gives x @ W^T, the linear layer's output
            try:
                alg = torch._cslt_sparse_mm_search(packed, xt, transpose_result=True)
            except RuntimeError:  # the search itself failed inside cuSPARSELt on an H100 (torch 2.11, CUDA 13)
                alg = 0
            out = torch._cslt_sparse_mm(packed, xt, transpose_result=True, alg_id=alg)
            torch.testing.assert_close(out, F.linear(x, w), atol=0.5, rtol=1e-2)
            dense_ms = time_ms(lambda: F.linear(x, w), repeats, 10)
            sparse_ms = time_ms(lambda: torch._cslt_sparse_mm(packed, xt, transpose_result=True, alg_id=alg), repeats, 10)
            calls = 2 if name == "gate/up" else 1
            total["dense_ms"] += calls * dense_ms
            total["sparse_ms"] += calls * sparse_ms
            rows.append({"backend": backend, "matmul": name, "tokens": tokens, "dense_ms": dense_ms,
                         "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "alg_id": alg})
        rows.append({"backend": backend, "matmul": "mlp", "tokens": tokens, **total,
                     "speedup": total["dense_ms"] / total["sparse_ms"]})
    return rows


def time_backend(backend: str, token_counts: list[int], repeats: int) -> list[dict]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    torch.manual_seed(0)
    weights = {}
    for name, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)
        w = w.masked_fill(magnitude_mask(w, 0.5, (2, 4)), 0)
        weights[name] = (w, to_sparse_semi_structured(w))
    rows = []
    for tokens in token_counts:
        total = {"dense_ms": 0.0, "sparse_ms": 0.0}
        for name, (w, sparse) in weights.items():
            x = torch.randn(tokens, w.shape[1], device="cuda", dtype=torch.float16)
            torch.testing.assert_close(F.linear(x, sparse), F.linear(x, w), atol=0.5, rtol=1e-2)
            dense_ms = time_ms(lambda: F.linear(x, w), repeats, 10)
            sparse_ms = time_ms(lambda: F.linear(x, sparse), repeats, 10)
            calls = 2 if name == "gate/up" else 1
            total["dense_ms"] += calls * dense_ms
            total["sparse_ms"] += calls * sparse_ms
            rows.append({"backend": backend, "matmul": name, "tokens": tokens, "dense_ms": dense_ms,
                         "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms})
        rows.append({"backend": backend, "matmul": "mlp", "tokens": tokens, **total,
                     "speedup": total["dense_ms"] / total["sparse_ms"]})
    return rows


if __name__ == "__main__":
    main()
