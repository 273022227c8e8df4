"""GPU: 2:4 sparse MLP matmuls of a Llama-1B-shaped model vs dense, and a whole 2:4 model's decode.

Run on a machine with an NVIDIA GPU and triton (CUDA builds of torch bring it):
    python benchmarks/gpu_sparse24.py [--out benchmarks/results/gpu_sparse24.json] [--decode]
Weights are pruned to 2:4 with leanlm's N:M mask (magnitude) and run through leanlm's Triton kernel
(`leanlm/kernels/sparse24.py`, tile sizes tuned once per shape before timing); `--torch-backends` adds
torch's semi-structured tensors (CUTLASS, cuSPARSELt). Each matmul cycles through several copies of its
weight, more bytes than the L2 cache holds, as a model's layers do, and is timed two ways, dense and
sparse in the same process: CUDA events around single calls (launch cost included) and CUDA-graph
replays (launch cost removed). "mlp" sums gate + up + down. Target: >= 1.2x on the MLP matmuls at 16+
tokens. `--decode` also times a 16-layer Llama-1B-shaped model (random weights, every linear but the
LM head 2:4) through leanlm's compiled decode loop at batch 1 and 16, against the same model dense.
`TRITON_INTERPRET=1 ... --smoke` runs every step on CPU at toy sizes (a test does), timings meaningless.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from leanlm.kernels.sparse24_ops import compress_24
from leanlm.prune.prune_ops import magnitude_mask

CALLS = {"gate/up": 2, "down": 1}


@dataclass
class Setup:
    device: str
    model: dict  # LlamaConfig arguments; the MLP shapes come from it
    l2_bytes: int  # weights are cycled through enough copies to exceed this
    bench: dict  # BenchConfig arguments for the whole-model decode

    def shapes(self) -> dict[str, tuple[int, int]]:
        hidden, inter = self.model["hidden_size"], self.model["intermediate_size"]
        return {"gate/up": (inter, hidden), "down": (hidden, inter)}


LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
GPU = Setup("cuda", LLAMA_1B, 50 * 2**20,  # H100 L2; more copies than needed are harmless
            dict(prompt_tokens=512, decode_prompt_tokens=64, new_tokens=64, batch=16, repeats=3, warmup=2, compile=True))
# --smoke: the same code paths on CPU under TRITON_INTERPRET=1 (tiny shapes, wall-clock timing), so a
# GPU session's short time is not lost to a bug in this script
SMOKE = Setup("cpu", dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
              0, dict(prompt_tokens=16, decode_prompt_tokens=8, new_tokens=2, batch=16, repeats=1, warmup=1))


def wall_ms(fns: list, repeats: int) -> float:
    for fn in fns:
        fn()
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fns[i % len(fns)]()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def events_ms(fns: list, repeats: int) -> float:
    """Median of single calls timed with CUDA events, cycling through `fns` (one per weight copy)."""
    if not torch.cuda.is_available():
        return wall_ms(fns, repeats)
    for fn in fns:
        fn()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fns[i % len(fns)]()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fns: list, repeats: int) -> float:
    """Per-call time of a CUDA graph that makes every call once, median over replays."""
    if not torch.cuda.is_available():
        return wall_ms(fns, repeats)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    times = []
    for _ in range(max(5, repeats // 5)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return statistics.median(times)


def pruned_copies(out_f: int, in_f: int, dtype: torch.dtype, setup: Setup) -> list[torch.Tensor]:
    copies = max(2, -(-2 * setup.l2_bytes // (out_f * in_f * 2)))
    weights = []
    for _ in range(copies):
        w = torch.randn(out_f, in_f, device=setup.device, dtype=dtype)
        weights.append(w.masked_fill(magnitude_mask(w, 0.5, (2, 4)), 0))
    return weights


def time_matmuls(backend: str, convert, multiply, token_counts: list[int], repeats: int, dtype: torch.dtype,
                 setup: Setup, prepare=None) -> list[dict]:
    """Dense vs `multiply(x, convert(w))` for each MLP shape and token count, after checking they agree."""
    torch.manual_seed(0)
    rows = []
    for name, (out_f, in_f) in setup.shapes().items():
        dense = pruned_copies(out_f, in_f, dtype, setup)
        sparse = [convert(w) for w in dense]
        for tokens in token_counts:
            x = torch.randn(tokens, in_f, device=setup.device, dtype=dtype)
            extra = prepare(x, sparse[0]) if prepare else {}
            got, want = multiply(x, sparse[0]).float(), F.linear(x, dense[0]).float()
            err = ((got - want).norm() / want.norm()).item()
            if err > 1e-2:
                raise SystemExit(f"{backend} disagrees with the dense matmul: {name}, {tokens} tokens, error {err:.2e}")
            dense_fns = [lambda w=w: F.linear(x, w) for w in dense]
            sparse_fns = [lambda s=s: multiply(x, s) for s in sparse]
            rows.append(with_speedups({
                "backend": backend, "matmul": name, "tokens": tokens, "rel_error": err, **extra,
                "dense_ms": events_ms(dense_fns, repeats), "sparse_ms": events_ms(sparse_fns, repeats),
                "dense_graph_ms": graph_ms(dense_fns, repeats), "sparse_graph_ms": graph_ms(sparse_fns, repeats)}))
            print_rows(rows[-1:], header=len(rows) == 1)
        del dense, sparse
    totals = mlp_totals(rows)
    print_rows(totals, header=False)
    return rows + totals


def time_leanlm(token_counts: list[int], repeats: int, dtype: torch.dtype, setup: Setup) -> list[dict]:
    from leanlm.kernels.sparse24 import choose, sparse24_mm

    def tune(x, packed):  # once per shape, before any timing
        return {"config": str(choose(x.shape[0], *packed))}

    return time_matmuls("leanlm-triton", compress_24, lambda x, packed: sparse24_mm(x, *packed), token_counts, repeats,
                        dtype, setup, prepare=tune)


def time_torch(backend: str, token_counts: list[int], repeats: int, dtype: torch.dtype, setup: Setup) -> list[dict]:
    """torch's semi-structured tensors (the baseline that missed on an H100, see BENCHMARKS.md)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    return time_matmuls(backend, to_sparse_semi_structured, F.linear, token_counts, repeats, dtype, setup)


def mlp_totals(rows: list[dict]) -> list[dict]:
    totals = []
    for tokens in sorted({r["tokens"] for r in rows}):
        parts = [r for r in rows if r["tokens"] == tokens]
        total = {key: sum(CALLS[r["matmul"]] * r[key] for r in parts)
                 for key in ("dense_ms", "sparse_ms", "dense_graph_ms", "sparse_graph_ms")}
        totals.append(with_speedups({"backend": parts[0]["backend"], "matmul": "mlp", "tokens": tokens, **total}))
    return totals


def with_speedups(row: dict) -> dict:
    return {**row, "speedup": row["dense_ms"] / row["sparse_ms"],
            "speedup_graph": row["dense_graph_ms"] / row["sparse_graph_ms"]}


def time_decode(setup: Setup, layers: int, dtype: torch.dtype) -> dict:
    """A Llama-1B-shaped model with random weights, dense vs 2:4, through leanlm's compiled loop (CUDA graphs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from leanlm.measure.bench import BenchConfig, benchmark
    from leanlm.models.load import LoadedModel
    from leanlm.prune import MagnitudeConfig, prune_
    from leanlm.sparsify import sparse24_

    config = LlamaConfig(**{**setup.model, "num_hidden_layers": layers})
    bench = BenchConfig(**setup.bench)
    results = {}
    for variant in ("dense", "2:4"):
        torch.manual_seed(0)
        with torch.device(setup.device):
            model = LlamaForCausalLM(config).to(dtype).eval()
        prune_(model, MagnitudeConfig(pattern="2:4"))
        if variant == "2:4":
            results["conversion"] = sparse24_(model)
        start = time.perf_counter()
        results[variant] = benchmark(LoadedModel(model=model, tokenizer=None, source="llama-random", path=Path("."),
                                                 disk_bytes=0), bench)
        print(f"  {variant}: {time.perf_counter() - start:.0f} s", flush=True)
        del model
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_sparse24.json")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--torch-backends", action="store_true", help="also time torch's semi-structured tensors")
    parser.add_argument("--decode", action="store_true", help="also time a whole 2:4 model's compiled decode")
    parser.add_argument("--layers", type=int, default=16, help="decoder blocks of the --decode model")
    parser.add_argument("--smoke", action="store_true", help="check this script on CPU: run it with TRITON_INTERPRET=1")
    args = parser.parse_args()
    setup = SMOKE if args.smoke else GPU
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke runs the kernel under Triton's interpreter: set TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke to check the script on CPU)")
    dtype = getattr(torch, args.dtype)
    result = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "torch": torch.__version__,
              "dtype": args.dtype, "rows": [], "unsupported": {}, "decode": None}
    # written after each part, so a run cut short by a time limit still leaves what it measured
    result["rows"] = time_leanlm(args.tokens, args.repeats, dtype, setup)
    save(args.out, result)
    for backend in (["cutlass", "cusparselt"] if args.torch_backends else []):
        try:
            result["rows"] += time_torch(backend, args.tokens, args.repeats, dtype, setup)
        except (RuntimeError, TypeError, AttributeError) as err:  # CUTLASS's 2:4 kernels exist for sm8x only
            result["unsupported"][backend] = str(err).splitlines()[0]
            print(f"{backend}: not available on this GPU: {result['unsupported'][backend]}")
        save(args.out, result)
    if args.decode:
        result["decode"] = time_decode(setup, args.layers, dtype)
        print_decode(result["decode"])
        save(args.out, result)


def save(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"


def print_rows(rows: list[dict], header: bool = True) -> None:
    if header:
        print(f"{'backend':14s} {'matmul':8s} {'tokens':>6s} {'dense ms':>9s} {'2:4 ms':>9s} {'speedup':>8s} "
              f"{'graph dense':>11s} {'graph 2:4':>10s} {'speedup':>8s}  tile   ({device_name()}, torch {torch.__version__})")
    for r in rows:
        print(f"{r['backend']:14s} {r['matmul']:8s} {r['tokens']:6d} {r['dense_ms']:9.4f} {r['sparse_ms']:9.4f} "
              f"{r['speedup']:7.2f}x {r['dense_graph_ms']:11.4f} {r['sparse_graph_ms']:10.4f} {r['speedup_graph']:7.2f}x  "
              f"{r.get('config', '')}", flush=True)


def print_decode(decode: dict) -> None:
    base = decode["dense"]
    for variant, r in ((v, decode[v]) for v in ("dense", "2:4")):
        print(f"decode {variant:6s} batch 1: {r['decode_tps']:8.1f} tok/s ({r['decode_tps'] / base['decode_tps']:.2f}x)  "
              f"batch 16: {r['decode_tps_batch']:8.1f} tok/s ({r['decode_tps_batch'] / base['decode_tps_batch']:.2f}x)  "
              f"prefill {r['prefill_tps']:8.0f} tok/s  peak {r['peak_mem_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
