"""Low-rank factorization on SmolLM2-135M: SVD-LLM's whitening with per-layer ranks vs uniform ranks, plain
SVD and ASVD, at the same share of the targeted linears' parameters removed, in one run.

Quality: mean KL divergence, top-1 agreement and perplexity against the original on windows of the
default corpus's held-out split (calibration from the training split). Speed: batch-1 decode tokens/s of
the dense and the factorized model in leanlm's loop (eager, and with prepacked linears), medians.

    python benchmarks/lowrank.py --out benchmarks/results/lowrank.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leanlm.data.corpus import calibration_samples, default_corpus  # noqa: E402
from leanlm.lowrank.lowrank import LowRankConfig, factorize_lowrank, layer_costs, plan_ranks  # noqa: E402
from leanlm.measure.bench import BenchConfig, time_decode  # noqa: E402
from leanlm.measure.evaluate import eval_windows, prepare_reference, score_windows  # noqa: E402
from leanlm.models.load import load_model  # noqa: E402
from leanlm.runtime.decoder import make_decoder  # noqa: E402
from leanlm.runtime.onednn_linear import pack_linears  # noqa: E402

ROWS = [  # (share removed, method, allocation)
    (0.2, "svd_llm", "uniform"), (0.2, "svd_llm", "sensitivity"), (0.2, "svd_llm", "spectrum"),
    (0.2, "svd", "uniform"), (0.2, "asvd", "uniform"), (0.3, "svd_llm", "uniform"), (0.3, "svd_llm", "sensitivity"),
]


def decode_tps(model, prepacked: bool, cfg: BenchConfig) -> float:
    model = copy.deepcopy(model)
    if prepacked:
        pack_linears(model)
    ids = torch.randint(0, 40000, (1, cfg.decode_prompt_tokens), generator=torch.Generator().manual_seed(0))
    return cfg.new_tokens / time_decode(make_decoder(model), ids, cfg, torch.device("cpu"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--samples", type=int, default=64, help="calibration samples of 512 tokens")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m", "cpu", "float32")
    tok, corpus = loaded.tokenizer, default_corpus()
    windows = eval_windows(tok, corpus.eval, 512)[: args.windows]
    reference = prepare_reference(loaded, windows)
    calibration = calibration_samples(tok, corpus.train, args.samples, 512, 0)
    bench = BenchConfig(decode_prompt_tokens=64, new_tokens=64, repeats=5, warmup=1)
    dense = {"tps_eager": decode_tps(loaded.model, False, bench), "tps_prepacked": decode_tps(loaded.model, True, bench),
             "perplexity": reference.perplexity}
    print(f"dense: ppl {dense['perplexity']:.3f}, decode {dense['tps_eager']:.1f} tok/s eager, "
          f"{dense['tps_prepacked']:.1f} prepacked", flush=True)
    rows, costs, cost_seconds = [], {}, {}
    for removed, method, allocation in ROWS:
        model = copy.deepcopy(loaded.model)
        config = LowRankConfig(params_removed=removed, method=method, allocation=allocation)
        start = time.perf_counter()
        if allocation != "uniform" and (method, allocation) not in costs:
            # measured once per allocation and reused for every budget: it does not depend on the budget
            costs[method, allocation] = layer_costs(model, config, calibration)
            cost_seconds[method, allocation] = time.perf_counter() - start
            start = time.perf_counter()
        plan = plan_ranks(model, config, calibration, costs=costs.get((method, allocation)))
        stats = factorize_lowrank(model, config, calibration, plan=plan)
        seconds = time.perf_counter() - start + cost_seconds.get((method, allocation), 0.0)
        quality = score_windows(model, windows, reference)
        row = {"removed_target": removed, "method": method, "allocation": allocation, "seconds": seconds,
               "params_removed": stats["params_removed"], "layers_factorized": stats["layers_factorized"],
               **{k: quality[k] for k in ("kld", "top1", "perplexity")}}
        if removed == 0.3 or allocation == "sensitivity":
            row["tps_eager"] = decode_tps(model, False, bench)
            row["tps_prepacked"] = decode_tps(model, True, bench)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    report(dense, rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "model": "smollm2-135m",
                                        "windows": args.windows, "calibration_samples": args.samples,
                                        "dense": dense, "rows": rows}, indent=2))
    return 0


def report(dense: dict, rows: list[dict]) -> None:
    print(f"\n{'removed':>8s} {'method':8s} {'ranks':12s} {'KLD':>8s} {'top-1':>7s} {'ppl':>8s} "
          f"{'decode x (eager)':>17s} {'(prepacked)':>12s} {'seconds':>8s}")
    print(f"{'0':>8s} {'dense':8s} {'':12s} {0:8.4f} {1:7.3f} {dense['perplexity']:8.3f} {1:16.2f}x {1:11.2f}x")
    for r in rows:
        speed = (f"{r['tps_eager'] / dense['tps_eager']:16.2f}x {r['tps_prepacked'] / dense['tps_prepacked']:11.2f}x"
                 if "tps_eager" in r else f"{'':17s} {'':12s}")
        print(f"{r['params_removed']:8.1%} {r['method']:8s} {r['allocation']:12s} {r['kld']:8.4f} {r['top1']:7.3f} "
              f"{r['perplexity']:8.3f} {speed} {r['seconds']:8.1f}")
    for removed in (0.2, 0.3):
        uni = next(r for r in rows if r["removed_target"] == removed and r["method"] == "svd_llm"
                   and r["allocation"] == "uniform")
        sen = next(r for r in rows if r["removed_target"] == removed and r["allocation"] == "sensitivity")
        print(f"{removed:.0%} removed: per-layer ranks give {1 - sen['kld'] / uni['kld']:.1%} lower KLD than uniform "
              "SVD-LLM (target >= 20% at 20%)")


if __name__ == "__main__":
    raise SystemExit(main())
