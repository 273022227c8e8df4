"""Self-speculation and early exit on SmolLM2-135M, after exit-aware distillation, in one run.

For each exit block K given: train the exit head (`leanlm distill --exit-layer K`'s code; kept in
--heads and reused when there), then
- self-speculation: plain greedy decoding against drafting with blocks [0, K) and the exit head and
  verifying with blocks [K, N), on the chat and grounded workloads (leanlm.speculate.workload), outputs
  checked identical;
- early exit: quality against the full model on the 22 held-out windows at each confidence threshold,
  the threshold a KL budget picks on training-text windows, and decode speed at the timed thresholds.
Every row runs on the prepacked float model (the fastest plain loop) in the same process.

    python benchmarks/self_speculative.py --layers 12 20 --out benchmarks/results/self_speculative.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leanlm.data.corpus import default_corpus  # noqa: E402
from leanlm.measure.bench import prepack  # noqa: E402
from leanlm.measure.early_exit import bench_early_exit  # noqa: E402
from leanlm.measure.evaluate import eval_windows  # noqa: E402
from leanlm.measure.speculative import bench_speculative  # noqa: E402
from leanlm.models.load import load_model  # noqa: E402
from leanlm.speculate.exit_head import load_exit_head, save_exit_head, train_exit_head  # noqa: E402
from leanlm.speculate.self_draft import SelfDraft  # noqa: E402
from leanlm.speculate.split import LayerSplit  # noqa: E402
from leanlm.speculate.workload import build_prompts  # noqa: E402


def head_for(loaded, corpus, layer: int, heads: Path, steps: int, width: int | None):
    path = heads / f"exit{layer}"
    if not path.exists():
        start = time.time()
        head, stats = train_exit_head(loaded.model, loaded.tokenizer, corpus.train, layer, steps=steps, width=width)
        stats["minutes"] = (time.time() - start) / 60
        save_exit_head(head, LayerSplit(loaded.model, layer), path, stats)
    return load_exit_head(path, loaded.model)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 20])
    ap.add_argument("--steps", type=int, default=300, help="exit head training steps")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--heads", default="/tmp/leanlm-exit-heads")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kld-budget", type=float, default=0.05)
    ap.add_argument("--stop-below", type=float, default=0.0, help="self-speculation: stop a draft below this confidence")
    ap.add_argument("--skip", default="", help="comma-separated: self, exit")
    ap.add_argument("--out", default="benchmarks/results/self_speculative.json")
    args = ap.parse_args()
    loaded = load_model("smollm2-135m", "cpu", "float32")
    corpus = default_corpus()
    heads = {k: head_for(loaded, corpus, k, Path(args.heads), args.steps, args.width) for k in args.layers}
    prepack(loaded.model)
    for head, _ in heads.values():
        if head.adapter is not None:
            prepack(head)
    result = {"date": time.strftime("%Y-%m-%d"), "settings": vars(args), "self": {}, "early_exit": {}}
    calibration = eval_windows(loaded.tokenizer, corpus.train[-400_000:], 512)[:8]
    held_out = eval_windows(loaded.tokenizer, corpus.eval, 512)
    for k, (head, split) in heads.items():
        if "self" not in args.skip:
            for workload in ("chat", "grounded"):
                prompts = build_prompts(workload, loaded.tokenizer, corpus.eval, args.prompts)
                r = bench_speculative(loaded, SelfDraft(split, head, args.stop_below), prompts, args.new_tokens,
                                      args.repeats, 1)
                result["self"][f"{k}/{workload}"] = r
                print(f"self:{k} {workload:9s} plain {r['plain_decode_tps']:6.2f} tok/s  self {r['spec_decode_tps']:6.2f}"
                      f" ({r['speedup']:.2f}x)  acceptance {r['acceptance_rate']:.1%}  tokens/pass "
                      f"{r['tokens_per_step']:.2f}  identical {r['identical']}", flush=True)
                write(args.out, result)
        if "exit" not in args.skip:
            prompts = build_prompts("chat", loaded.tokenizer, corpus.eval, args.prompts)
            r = bench_early_exit(loaded, head, split, prompts, calibration, held_out, args.kld_budget,
                                 args.new_tokens, args.repeats, 1)
            result["early_exit"][str(k)] = r
            print(f"early exit after block {k}: threshold picked for KLD <= {args.kld_budget}: {r['chosen_threshold']}")
            print(f"{'threshold':>9} {'exit share':>10} {'kld':>8} {'top1':>6} {'ppl':>7} {'tok/s':>7} {'x':>6} {'same':>6}")
            for row in r["timed"]:
                print(f"{row['threshold']:9.2f} {row['exit_share']:10.1%} {row['kld']:8.4f} {row['top1']:6.3f} "
                      f"{row['perplexity']:7.3f} {row['decode_tps']:7.2f} {row['speedup']:5.2f}x "
                      f"{row['same_prefix_share']:6.1%}", flush=True)
            write(args.out, result)
    return 0


def write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
