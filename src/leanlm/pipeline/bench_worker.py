"""Benchmark a saved model in a fresh process, so its peak memory is its own and not the history of the
process that made it. The parent passes the typed BenchConfig as JSON on stdin (never as CLI flags) and
reads the result as JSON from the child's last line of stdout.

    echo '{"path": "out/model", "device": "cpu", "dtype": "auto", "config": {"repeats": 3}}' \\
        | python -m leanlm.pipeline.bench_worker
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.measure.bench import BenchConfig


def bench_in_subprocess(path: Path, cfg: BenchConfig, device: str, dtype: str, runtime: str = "leanlm") -> dict:
    """`runtime` llama.cpp benchmarks a GGUF file in llama.cpp (device and dtype are then its own)."""
    job = {"path": str(path), "device": device, "dtype": dtype, "config": dataclasses.asdict(cfg), "runtime": runtime}
    proc = subprocess.run([sys.executable, "-m", "leanlm.pipeline.bench_worker"], input=json.dumps(job),
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise LeanLMError(f"benchmarking {path} failed (exit {proc.returncode}); run `leanlm bench {path} "
                          f"--device {device} --dtype {dtype}` to see why")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    from leanlm.core.config import parse_config
    from leanlm.measure.bench import benchmark
    from leanlm.models.load import load_model

    job = json.loads(sys.stdin.read())
    cfg = parse_config(BenchConfig, job["config"], "bench worker config")
    if job.get("runtime", "leanlm") == "llama.cpp":
        from leanlm.runtime.llamacpp import bench_llamacpp

        result = bench_llamacpp(job["path"], cfg.prompt_tokens, cfg.decode_prompt_tokens, cfg.new_tokens,
                                cfg.repeats, cfg.warmup)
    else:
        result = benchmark(load_model(job["path"], job["device"], job["dtype"]), cfg)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
