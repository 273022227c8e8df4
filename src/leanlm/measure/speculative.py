"""What speculation buys on a workload: leanlm's loop with and without a drafter, on the same prompts.

Per prompt, the median of repeats after warm-up, for plain greedy decoding and speculative decoding;
decode time is generation time less the prompt's (median) prefill time. Reported: decode tokens/s of
each, the speedup, the acceptance rate, the mean accepted draft length, tokens per target pass, and the
break-even: how many tokens each speculative step must yield to match plain decoding, from the
measured cost of a step (draft + verify) relative to one plain decode step.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from leanlm.runtime.generate import generate, new_cache, prefill
from leanlm.speculate.loop import DraftLength, SpecStats, speculative_generate


def median_time(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, object]:
    """(median seconds of `repeats` calls after `warmup` untimed ones, the last call's result)."""
    times, result = [], None
    for i in range(warmup + repeats):
        start = time.perf_counter()
        result = fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_speculative(loaded, drafter, prompts: list[str], new_tokens: int = 128, repeats: int = 3,
                      warmup: int = 1, max_draft: int = 10) -> dict:
    """Plain vs speculative greedy decoding of every prompt; the outputs must be identical."""
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    rows, stats = [], SpecStats()
    for text in tqdm(prompts, desc="speculation", unit="prompt"):
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        t_prefill, _ = median_time(lambda: prefill(model, ids, new_cache(model)), repeats, warmup)
        t_plain, plain = median_time(lambda: generate(model, ids, new_tokens, tok.eos_token_id), repeats, warmup)
        run_stats: list[SpecStats] = []

        def spec():
            run_stats.append(SpecStats())
            return speculative_generate(model, ids, new_tokens, drafter, tok.eos_token_id,
                                        length=DraftLength(most=max_draft), stats=run_stats[-1])
        t_spec, fast = median_time(spec, repeats, warmup)
        s = run_stats[-1]
        for name in ("steps", "drafted", "accepted", "emitted", "step_tokens"):
            setattr(stats, name, getattr(stats, name) + getattr(s, name))
        stats.accepted_lengths += s.accepted_lengths
        n = plain.shape[1]
        plain_decode, spec_decode = max(t_plain - t_prefill, 1e-9), max(t_spec - t_prefill, 1e-9)
        per_token = plain_decode / max(1, n - 1)
        rows.append({"prompt_tokens": ids.shape[1], "new_tokens": n, "identical": bool(torch.equal(plain, fast)),
                     "plain_decode_tps": (n - 1) / plain_decode, "spec_decode_tps": (fast.shape[1] - 1) / spec_decode,
                     "speedup": plain_decode / spec_decode, "tokens_per_step": s.tokens_per_step,
                     "break_even_tokens_per_step": spec_decode / max(1, s.steps) / per_token})
    return summarize(rows, stats)


def summarize(rows: list[dict], stats: SpecStats) -> dict:
    plain = sum(r["new_tokens"] - 1 for r in rows) / sum((r["new_tokens"] - 1) / r["plain_decode_tps"] for r in rows)
    spec = sum(r["new_tokens"] - 1 for r in rows) / sum((r["new_tokens"] - 1) / r["spec_decode_tps"] for r in rows)
    kept = stats.accepted_lengths
    return {"plain_decode_tps": plain, "spec_decode_tps": spec, "speedup": spec / plain,
            "median_prompt_speedup": statistics.median(r["speedup"] for r in rows),
            "identical": all(r["identical"] for r in rows), "acceptance_rate": stats.acceptance_rate,
            "mean_accepted_length": sum(kept) / max(1, len(kept)), "tokens_per_step": stats.tokens_per_step,
            "break_even_tokens_per_step": statistics.median(r["break_even_tokens_per_step"] for r in rows),
            "prompts": rows}
