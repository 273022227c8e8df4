"""GGUF exports in llama.cpp: KLD against leanlm's float32 model on the eval windows, size and speed.

Needs llama-cpp-python (see the README for the build flags). Run alone on an idle machine:
    python benchmarks/bench_gguf.py [--rows q8_0 q4_k ...] [--reuse RECIPE=DIR ...] [--out benchmarks/results/gguf.json]
Rows: the float model written as Q8_0 and as Q4_0 by gguf's reference quantizers (llama.cpp's own
round-to-nearest); the `w4-g32-sym-gptq` recipe's output written as Q4_0 from its codes; the float
model as leanlm's K-quants (Q4_K, with and without an importance matrix from 128 x 512 tokens of the
train split, and Q6_K; rows that are not a multiple of 256 fall back to Q5_0 / Q8_0); the
structurally pruned recipes' outputs (depth-6, width-ffn-75, heads-6of9) as Q8_0, whose decode speed
is compared with the dense Q8_0 row of the same run.
`--reuse w4-g32-sym-gptq=DIR` takes an existing `leanlm optimize --recipe ...` output directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from leanlm.data.corpus import default_corpus
from leanlm.export import export
from leanlm.measure.evaluate import eval_windows, prepare_reference, score_windows
from leanlm.models.load import load_model
from leanlm.runtime.llamacpp import LlamaCppLM, bench_llamacpp

MODEL = "smollm2-135m"


def recipe_model(tmp: Path, recipe: str, reuse: dict[str, str]) -> Path:
    if recipe in reuse:
        return Path(reuse[recipe]) / "model"
    out = tmp / recipe
    if not out.exists():
        subprocess.run(["leanlm", "optimize", MODEL, "--recipe", recipe, "--out", str(out), "--no-bench"], check=True)
    return out / "model"


def measure(name: str, gguf: Path, windows, reference) -> dict:
    quality = score_windows(LlamaCppLM(gguf), windows, reference=reference, desc=name)
    speed = bench_llamacpp(gguf)
    return {"name": name, "kld": quality["kld"], "top1": quality["top1"], "perplexity": quality["perplexity"],
            "bytes": gguf.stat().st_size, "prefill_tps": speed["prefill_tps"], "decode_tps": speed["decode_tps"]}


ROWS = {  # name: (label, source (the model, or a recipe whose output it is), weight type, importance-matrix samples)
    "q8_0": ("float -> Q8_0 (gguf-py)", MODEL, "q8_0", 0),
    "q4_0": ("float -> Q4_0 (gguf-py RTN)", MODEL, "q4_0", 0),
    "gptq-q4_0": ("GPTQ g32 sym -> Q4_0 (leanlm codes)", "w4-g32-sym-gptq", "auto", 0),
    "q4_k": ("float -> Q4_K (leanlm)", MODEL, "q4_k", 0),
    "q4_k-imatrix": ("float -> Q4_K + imatrix (leanlm)", MODEL, "q4_k", 128),
    "q6_k": ("float -> Q6_K (leanlm)", MODEL, "q6_k", 0),
    "depth-6-q8_0": ("depth-6 (24 blocks) -> Q8_0", "depth-6", "q8_0", 0),
    "width-75-q8_0": ("width-ffn-75 (FFN 1152) -> Q8_0", "width-ffn-75", "q8_0", 0),
    "heads-6of9-q8_0": ("heads-6of9 (6 of 9 heads) -> Q8_0", "heads-6of9", "q8_0", 0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--reuse", nargs="+", default=[], metavar="RECIPE=DIR",
                        help="existing `leanlm optimize` output directories, by recipe")
    parser.add_argument("--out", default="benchmarks/results/gguf.json")
    args = parser.parse_args()
    reuse = dict(item.split("=", 1) for item in args.reuse)
    loaded = load_model(MODEL, device="cpu")
    windows = eval_windows(loaded.tokenizer, default_corpus().eval)
    reference = prepare_reference(loaded, windows)
    del loaded
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for key in args.rows:
            name, source, kind, imatrix = ROWS[key]
            if source != MODEL:
                source = str(recipe_model(tmp, source, reuse))
            path = tmp / f"{key}.gguf"
            info = export(source, path, "gguf", weight_type=kind, embeddings="q8_0", imatrix_samples=imatrix)
            rows.append({**measure(name, path, windows, reference), "tensor_types": info["tensor_types"]})
    dense = next((r for r in rows if r["name"] == ROWS["q8_0"][0]), None)
    print(f"{'export':38s} {'KLD':>8s} {'top-1':>7s} {'ppl':>7s} {'MiB':>6s} {'prefill':>8s} {'decode':>7s} "
          f"{'vs Q8_0':>7s}")
    for r in rows:
        if dense:
            r["decode_vs_q8_0"] = r["decode_tps"] / dense["decode_tps"]
        print(f"{r['name']:38s} {r['kld']:8.4f} {r['top1']:7.2%} {r['perplexity']:7.3f} {r['bytes'] / 2**20:6.1f} "
              f"{r['prefill_tps']:8.1f} {r['decode_tps']:7.2f} {r.get('decode_vs_q8_0', float('nan')):6.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
