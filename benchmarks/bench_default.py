"""Trunk benchmark on the default model: load time, eval time, bench reproducibility, int8 RTN.

Run alone on an idle machine (other processes distort CPU timings):
    python benchmarks/bench_default.py [--out benchmarks/results/default.json]
Prints a table and writes JSON. Each figure comes from a fresh `leanlm` process, as a user runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from leanlm.core.paths import cache_dir
from leanlm.models.builtin import BUILTIN_MODELS, ensure_builtin

MODEL = "smollm2-135m"


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def load_seconds(repeats: int = 3) -> float:
    """In-process time of load_model from the cache (a second load), median over fresh processes."""
    code = ("import time,leanlm; t=time.perf_counter(); leanlm.load_model('%s', device='cpu'); "
            "print(time.perf_counter()-t)" % MODEL)
    return statistics.median(float(timed([sys.executable, "-c", code])[1].strip()) for _ in range(repeats))


def eval_cold_reference() -> tuple[float, dict]:
    """`leanlm eval --reference` with the reference logits not yet cached (the worst case)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models").symlink_to(cache_dir() / "models")
        env = {**os.environ, "LEANLM_CACHE": tmp}
        seconds, out = timed(["leanlm", "eval", MODEL, "--reference", MODEL, "--json"], env)
    return seconds, json.loads(out)


def bench_twice() -> list[dict]:
    return [json.loads(timed(["leanlm", "bench", MODEL, "--json"])[1]) for _ in range(2)]


def optimize(recipe: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        timed(["leanlm", "optimize", MODEL, "--recipe", recipe, "--out", f"{tmp}/out"])
        return json.loads(Path(f"{tmp}/out/report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/default.json")
    args = parser.parse_args()
    ensure_builtin(MODEL)
    results = {"date": time.strftime("%Y-%m-%d"), "model": MODEL, "cpu": os.cpu_count(),
               "cached_model": str(BUILTIN_MODELS[MODEL].cache_path)}
    results["load_from_cache_s"] = load_seconds()
    results["eval_seconds"], results["eval"] = eval_cold_reference()
    a, b = bench_twice()
    results["bench"] = [a, b]
    results["bench_decode_agreement"] = min(a["decode_tps"], b["decode_tps"]) / max(a["decode_tps"], b["decode_tps"])
    results["int8_rtn"] = rtn = optimize("int8-rtn")
    base, res = rtn["baseline"], rtn["result"]
    rows = [
        ("second load from cache (s)", f"{results['load_from_cache_s']:.2f}", "< 10"),
        ("eval + KLD vs itself, cold reference (s)", f"{results['eval_seconds']:.1f}", "< 180"),
        ("self KLD / top-1", f"{results['eval']['kld']:.2e} / {results['eval']['top1']:.4f}", "0 / 1.0"),
        ("perplexity (float32)", f"{results['eval']['perplexity']:.4f}", "9.93"),
        ("bench decode tok/s, run 1 / run 2", f"{a['decode_tps']:.2f} / {b['decode_tps']:.2f}", "within 10%"),
        ("int8 RTN perplexity (baseline)", f"{res['quality']['perplexity']:.4f} ({base['quality']['perplexity']:.4f})", "within 1%"),
        ("int8 RTN KLD / top-1", f"{res['quality']['kld']:.5f} / {res['quality']['top1']:.4f}", ""),
        ("int8 RTN decode tok/s ratio", f"{res['speed']['decode_tps'] / base['speed']['decode_tps']:.2f}x", ""),
        ("int8 RTN disk ratio", f"{res['speed']['disk_bytes'] / base['speed']['disk_bytes']:.3f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value, target in rows:
        print(f"{label:{width}s}  {value:>24s}  {target}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
