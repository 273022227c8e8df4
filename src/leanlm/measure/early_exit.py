"""What early exit costs and buys, threshold by threshold: quality against the full model on held-out
windows (KL, top-1, perplexity, the share of tokens that leave early) next to decode speed and how much
of plain greedy decoding's output it reproduces on real prompts; a KL budget picks the threshold on
calibration windows (training text), and the pick is then checked on the held-out ones."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from leanlm.measure.speculative import median_time
from leanlm.runtime.generate import generate, new_cache, prefill
from leanlm.speculate.early_exit import THRESHOLDS, ExitStats, calibrate, early_exit_generate, exit_quality


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.shape[1], b.shape[1])
    differ = (a[0, :n] != b[0, :n]).nonzero()
    return int(differ[0]) if len(differ) else n


def bench_early_exit(loaded, head, split, prompts: list[str], calibration: torch.Tensor, held_out: torch.Tensor,
                     kld_budget: float, new_tokens: int = 128, repeats: int = 3, warmup: int = 1,
                     thresholds=THRESHOLDS) -> dict:
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    chosen, calib_rows = calibrate(model, head, split, calibration, kld_budget, thresholds)
    eval_rows = {r["threshold"]: r for r in exit_quality(model, head, split, held_out, thresholds)}
    timed = sorted({t for t in (thresholds[-1], chosen and chosen["threshold"]) if t is not None} |
                   {t for t in thresholds if 0.8 <= t < 1.0})
    plain_time, speed = 0.0, {t: {"seconds": 0.0, "tokens": 0, "prefix": 0, "same": 0, "stats": ExitStats()}
                              for t in timed}
    plain_tokens = 0
    for i, text in enumerate(tqdm(prompts, desc="early exit", unit="prompt")):
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        w = warmup if i == 0 else 0
        t_prefill, _ = median_time(lambda: prefill(model, ids, new_cache(model)), repeats, w)
        t_plain, plain = median_time(lambda: generate(model, ids, new_tokens, tok.eos_token_id), repeats, w)
        plain_time += max(t_plain - t_prefill, 1e-9)
        plain_tokens += plain.shape[1] - 1
        for t in timed:
            s = speed[t]
            runs: list[ExitStats] = []

            def run():
                runs.append(ExitStats())
                return early_exit_generate(model, head, split, ids, new_tokens, t, tok.eos_token_id, stats=runs[-1])
            t_run, out = median_time(run, repeats, w)
            for name in ("tokens", "exited", "deep_passes"):
                setattr(s["stats"], name, getattr(s["stats"], name) + getattr(runs[-1], name))
            s["seconds"] += max(t_run - t_prefill, 1e-9)
            s["tokens"] += out.shape[1] - 1
            s["prefix"] += _common_prefix(out, plain)
            s["same"] += int(torch.equal(out, plain))
    plain_tps = plain_tokens / plain_time
    rows = []
    for t in timed:
        s = speed[t]
        tps = s["tokens"] / s["seconds"]
        rows.append({**eval_rows[t], "decode_tps": tps, "speedup": tps / plain_tps,
                     "generated_exit_share": s["stats"].exit_share,
                     "same_prefix_share": s["prefix"] / max(1, plain_tokens + len(prompts)),
                     "identical_prompts": s["same"]})
    return {"plain_decode_tps": plain_tps, "kld_budget": kld_budget, "layer": split.layer, "blocks": split.depth,
            "chosen_threshold": chosen and chosen["threshold"], "calibration": calib_rows,
            "held_out": list(eval_rows.values()), "timed": rows, "prompts": len(prompts)}
