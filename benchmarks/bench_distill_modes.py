"""Distillation modes on the default model: the teacher live, its top-k logits cached on disk (the run
that builds the cache, then one that reuses it), and on-policy (GKD) batches. The student is the
default model with decoder blocks removed (`depth-6`'s choice on this model: blocks 13-18), healed
by forward KL from the full model for the same number of steps in every mode.

    python benchmarks/bench_distill_modes.py [--steps 12] [--out benchmarks/results/distill_modes.json]
Reported per mode: wall time of `distill_` (cache building included where it happens), training
tokens/s of the reference text, and eval-split perplexity of the student afterwards.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from leanlm.data.corpus import default_corpus
from leanlm.distill import DistillConfig, Teacher, distill_
from leanlm.measure.evaluate import eval_windows, score_windows
from leanlm.models.load import load_model
from leanlm.prune.depth import remove_blocks
from leanlm.train.trainer import TrainConfig

MODEL = "smollm2-135m"


def student(blocks: list[int]):
    loaded = load_model(MODEL, device="cpu")
    remove_blocks(loaded.model, blocks)
    return loaded


def run(mode: str, config: DistillConfig, args, teacher: Teacher) -> dict:
    loaded = student(args.blocks)
    torch.manual_seed(0)
    start = time.perf_counter()
    stats = distill_(loaded.model, loaded.tokenizer, teacher, config=config, text=default_corpus().train)
    seconds = time.perf_counter() - start
    windows = eval_windows(loaded.tokenizer, default_corpus().eval, 512)
    ppl = score_windows(loaded.model, windows, desc=f"eval ({mode})")["perplexity"]
    return {"mode": mode, "seconds": seconds, "train_seconds": stats["seconds"],
            "tokens_per_second": stats["tokens_per_second"], "steps": stats["steps"],
            "best_validation_loss": stats["best_validation_loss"], "eval_perplexity": ppl,
            "teacher_loaded": teacher.model is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--blocks", type=int, nargs="+", default=list(range(13, 19)))
    parser.add_argument("--on-policy", type=float, default=0.5)
    parser.add_argument("--out", default="benchmarks/results/distill_modes.json")
    args = parser.parse_args()

    def config(**kw) -> DistillConfig:
        train = TrainConfig(steps=args.steps, batch_size=8, micro_batch_size=4, seq_len=256, lr=1e-4,
                            warmup_steps=2, eval_every=args.steps, checkpoint_every=args.steps, patience=0)
        return DistillConfig(train=train, **kw)

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        rows.append(run("live teacher", config(), args, Teacher(source=MODEL)))
        rows.append(run("cache: build + train", config(teacher_cache=cache), args, Teacher(source=MODEL)))
        rows.append(run("cache: reuse", config(teacher_cache=cache), args, Teacher(source=MODEL)))
        cache_mb = sum(p.stat().st_size for p in Path(cache).iterdir()) / 2**20
    rows.append(run(f"on-policy {args.on_policy}", config(on_policy=args.on_policy), args, Teacher(source=MODEL)))
    print(f"{'mode':24s} {'wall s':>8s} {'train tok/s':>12s} {'eval ppl':>9s} {'teacher loaded':>15s}"
          f"   ({args.steps} steps of 8 x 256 tokens, student without blocks {args.blocks})")
    for r in rows:
        print(f"{r['mode']:24s} {r['seconds']:8.1f} {r['tokens_per_second']:12.1f} {r['eval_perplexity']:9.3f} "
              f"{str(r['teacher_loaded']):>15s}")
    print(f"cache size: {cache_mb:.1f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "cache_mib": cache_mb, "config": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
