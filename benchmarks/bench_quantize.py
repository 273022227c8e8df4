"""Quantization recipes on the default model: quality, calibration time, size and speed vs float32.

Run alone on an idle machine:
    python benchmarks/bench_quantize.py [--recipes w8-rtn w4-g64-rtn w4-g64-gptq] [--out benchmarks/results/quantize.json]
Each recipe runs through `leanlm optimize` in a fresh process; its baseline is measured in that same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

DEFAULT = ["w8-rtn", "w4-g64-rtn", "w4-g64-gptq", "w4-g64-awq", "w8a8-smoothquant", "w4-mixed"]


def run(recipe: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run(["leanlm", "optimize", "--recipe", recipe, "--out", f"{tmp}/out"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{recipe} failed:\n{proc.stderr[-3000:]}")
        report = json.loads(Path(f"{tmp}/out/report.json").read_text())
        report["wall_seconds"] = time.perf_counter() - start
        return report


def row(recipe: str, r: dict) -> dict:
    base, res, step = r["baseline"], r["result"], r["steps"][0]
    return {
        "recipe": recipe,
        "perplexity": res["quality"]["perplexity"],
        "baseline_perplexity": base["quality"]["perplexity"],
        "kld": res["quality"]["kld"],
        "top1": res["quality"]["top1"],
        "step_seconds": step["seconds"],
        "fraction_of_bf16": step["stats"].get("fraction_of_bf16"),
        "disk_ratio": res["speed"]["disk_bytes"] / base["speed"]["disk_bytes"],
        "decode_ratio": res["speed"]["decode_tps"] / base["speed"]["decode_tps"],
        "prefill_ratio": res["speed"]["prefill_tps"] / base["speed"]["prefill_tps"],
        "decode_tps": res["speed"]["decode_tps"],
        "baseline_decode_tps": base["speed"]["decode_tps"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT)
    parser.add_argument("--out", default="benchmarks/results/quantize.json")
    args = parser.parse_args()
    rows = [row(name, run(name)) for name in args.recipes]
    print(f"{'recipe':14s} {'ppl':>7s} {'KLD':>8s} {'top-1':>7s} {'step s':>7s} {'of bf16':>8s} {'disk':>6s} "
          f"{'decode':>7s} {'prefill':>7s}")
    for r in rows:
        frac = f"{r['fraction_of_bf16']:.3f}" if r["fraction_of_bf16"] is not None else "-"
        print(f"{r['recipe']:14s} {r['perplexity']:7.3f} {r['kld']:8.5f} {r['top1']:7.2%} {r['step_seconds']:7.1f} "
              f"{frac:>8s} {r['disk_ratio']:6.3f} {r['decode_ratio']:6.2f}x {r['prefill_ratio']:6.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
