"""Prompt compression on question answering built from the built-in corpus's eval split.

Each example: a context of ~600 tokens (consecutive paragraphs of one topic), and a fill-in-the-blank
question on one of its sentences (a lower-case content word of 5+ letters blanked out: not a number or name,
which compression protects by rule and would make the task easy), with the gold word and three distractors:
the words the reader itself finds likeliest in the blank *without* the context, so that only the context
tells them apart (the "none" row: accuracy with no context at all). The reader (smollm2-135m, float32) picks the option most likely to follow the
context and the quoted sentence up to the blank: multiple choice by log-likelihood, as lm-eval scores such
tasks (a 135M model cannot answer free-form here: 0% with the full context). Contexts: full, and compressed
to 0.5 and 0.33 of their tokens by leanlm (question-aware), by truncation (the first N tokens) and by dropping
random words, the same token count for all three, and (with --llmlingua-python) by LLMLingua 0.2.2 with
LongLLMLingua's question-aware ranking and SmolLM2 as its scorer, asked for that token count too (its own
environment: benchmarks/llmlingua_worker.py says how to make it and what was patched). Chance is 25%.

    python benchmarks/prompt_compress.py [--examples 60] [--llmlingua-python /tmp/llmlingua-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

_STOP = set("about above after again against along also among another because before being below between both "
            "called could define defined does during each either every first following further given however "
            "instead itself later least might other otherwise rather same second should since still their "
            "there these those through under until which while whose within without would".split())


def examples(tok, count: int, seed: int, context_tokens: int = 600) -> list[dict]:
    from pydoc_data import topics

    keys = sorted(topics.topics)
    eval_keys = keys[int(len(keys) * 0.9):]
    rng = random.Random(seed)
    out = []
    for key in eval_keys + keys[: int(len(keys) * 0.9)]:  # eval topics first; more from train if needed
        paras = [p.strip() for p in re.split(r"\n\s*\n", topics.topics[key]) if len(p.split()) > 5]
        start = 0
        while start < len(paras) and len(out) < count:
            ctx, n = [], 0
            while start < len(paras) and n < context_tokens:
                ctx.append(paras[start])
                n += len(tok(paras[start], add_special_tokens=False)["input_ids"])
                start += 1
            context = "\n\n".join(ctx)
            if n < context_tokens * 0.8:
                break
            item = _question(context, rng)
            if item:
                out.append({"topic": key, "context": context, **item})
        if len(out) >= count:
            break
    return out


def _question(context: str, rng: random.Random) -> dict | None:
    sents = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(context.split())) if 10 <= len(s.split()) <= 40]
    rng.shuffle(sents)
    for s in sents:
        words = s.split()
        cands = [i for i, w in enumerate(words) if re.fullmatch(r"[a-z]{5,}", w) and w not in _STOP
                 and sum(x == w for x in words) == 1]
        if cands:
            i = rng.choice(cands)
            blanked = " ".join(words[:i] + ["____"] + words[i + 1:])
            return {"question": f'Fill in the blank: "{blanked}"', "answer": words[i],
                    "before": " ".join(words[:i]), "after": " ".join(words[i + 1:])}
    return None


def truncate(tok, text: str, n: int) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids)


def random_drop(tok, text: str, n: int, rng: random.Random) -> str:
    words = text.split(" ")
    keep = list(range(len(words)))
    while keep and len(tok(" ".join(words[i] for i in keep), add_special_tokens=False)["input_ids"]) > n:
        drop = max(1, (len(keep) - n // 2) // 8)
        for i in sorted(rng.sample(keep, min(drop, len(keep))), reverse=True):
            keep.remove(i)
    return " ".join(words[i] for i in keep)


def distractors(loaded, ex: dict, k: int = 3) -> list[str]:
    """The k whole words the reader predicts likeliest for the blank with no context, the gold word excluded."""
    import torch

    tok, model = loaded.tokenizer, loaded.model
    ids = tok(f"Quote: {ex['before']}", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    out = []
    for t in logits.argsort(descending=True)[:400].tolist():
        w = tok.decode([t])
        if w.startswith(" ") and re.fullmatch(r"[a-z]{3,}", w[1:]) and w[1:] != ex["answer"] \
                and not ex["answer"].startswith(w[1:]) and w[1:] not in out:
            out.append(w[1:])
        if len(out) == k:
            break
    return out


def choose(loaded, context: str, ex: dict) -> str:
    """The option most likely after the context and "Quote: <the sentence up to the blank>" (sum of the
    option's token log-probs), the four options in one padded batch."""
    import torch

    tok, model = loaded.tokenizer, loaded.model
    head = f"{context}\n\n" if context else ""
    prefix = tok(f"{head}Quote: {ex['before']}", add_special_tokens=False)["input_ids"]
    # the option's tokens only: the rest of the sentence would tell the options apart without any context
    conts = [tok(" " + o, add_special_tokens=False)["input_ids"] for o in ex["options"]]
    width = len(prefix) + max(map(len, conts))
    pad = tok.eos_token_id
    ids = torch.tensor([prefix + c + [pad] * (width - len(prefix) - len(c)) for c in conts])
    mask = torch.tensor([[1] * (len(prefix) + len(c)) + [0] * (width - len(prefix) - len(c)) for c in conts])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    scores = []
    for row, c in enumerate(conts):
        pos = torch.arange(len(prefix) - 1, len(prefix) - 1 + len(c))
        scores.append(float(logp[row, pos, torch.tensor(c)].sum()))
    return ex["options"][max(range(len(scores)), key=scores.__getitem__)]


def run_llmlingua(python: str, model_dir: str, jobs: list[dict]) -> list[dict]:
    """LLMLingua in its own environment (benchmarks/llmlingua_worker.py); [] when no environment is given."""
    import subprocess

    worker = Path(__file__).with_name("llmlingua_worker.py")
    proc = subprocess.run([python, str(worker)], input=json.dumps({"model": model_dir, "jobs": jobs}),
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"LLMLingua's worker failed (exit {proc.returncode}); see its output above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from leanlm.models.load import load_model
    from leanlm.prompt import compress

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llmlingua-python", metavar="PYTHON",
                    help="the python of an environment with llmlingua==0.2.2 (see llmlingua_worker.py); "
                         "without it LLMLingua is left out")
    ap.add_argument("--json", default="benchmarks/results/prompt_compress.json")
    args = ap.parse_args()
    loaded = load_model("smollm2-135m", device="cpu")
    tok = loaded.tokenizer
    data = examples(tok, args.examples, args.seed)
    rng = random.Random(args.seed)
    seconds, seconds_all, budget_err, jobs = [], [], [], []
    compress(data[0]["context"], 0.5, data[0]["question"], loaded)  # warm-up
    for ex in data:  # every context first, then LLMLingua on the same token counts, then the reader
        ex["options"] = [ex["answer"], *distractors(loaded, ex)]
        ex["contexts"] = {"none": "", "full": ex["context"]}
        for budget in (0.5, 0.33):
            c = compress(ex["context"], budget, ex["question"], loaded)
            seconds.append(c.seconds / c.tokens_before * 600)  # per 600-token prompt
            budget_err.append(abs(c.tokens_after - c.target) / c.target)
            every = compress(ex["context"], budget, ex["question"], loaded, scorer_blocks=0)
            seconds_all.append(every.seconds / every.tokens_before * 600)
            ex["contexts"].update({f"leanlm@{budget}": c.text, f"leanlm-all-blocks@{budget}": every.text,
                                   f"truncate@{budget}": truncate(tok, ex["context"], c.tokens_after),
                                   f"random@{budget}": random_drop(tok, ex["context"], c.tokens_after, rng)})
            jobs.append({"context": ex["context"], "question": ex["question"], "target": c.tokens_after,
                         "key": (len(jobs), budget)})
        print(f"compressed {len(jobs) // 2}/{len(data)}", flush=True)
    lingua = {}
    if args.llmlingua_python:
        done = run_llmlingua(args.llmlingua_python, str(loaded.path), [{k: j[k] for k in ("context", "question", "target")}
                                                                        for j in jobs])
        for j, r in zip(jobs, done):
            lingua[j["key"]] = r
        for i, ex in enumerate(data):
            for k, budget in enumerate((0.5, 0.33)):
                r = lingua[(2 * i + k, budget)]
                ex["contexts"][f"llmlingua@{budget}"] = r["text"]
                r["tokens"] = len(tok(r["text"], add_special_tokens=False)["input_ids"])
                r["target"] = jobs[2 * i + k]["target"]
    hits: dict[str, int] = {}
    rows = []
    for ex in data:
        row = {"topic": ex["topic"], "answer": ex["answer"]}
        for name, ctx in ex["contexts"].items():
            row[name] = choose(loaded, ctx, ex) == ex["answer"]
            hits[name] = hits.get(name, 0) + row[name]
        rows.append(row)
        print(f"{len(rows):3d}/{len(data)} " + " ".join(f"{k} {v / len(rows):.2f}" for k, v in hits.items()), flush=True)
    n = len(rows)
    summary = {k: v / n for k, v in hits.items()}
    print(f"\n{'method':18} {'budget':>6} {'accuracy':>8}")
    print(f"{'none':18} {'0':>6} {summary['none']:8.1%}")
    print(f"{'full':18} {'1.0':>6} {summary['full']:8.1%}")
    for budget in (0.5, 0.33):
        for name in ("leanlm", "leanlm-all-blocks", "truncate", "random", "llmlingua"):
            if f"{name}@{budget}" in summary:
                print(f"{name:18} {budget:6} {summary[f'{name}@{budget}']:8.1%}")
    extra = {}
    if lingua:
        ratio = [r["tokens"] / r["target"] for r in lingua.values()]
        per600 = [r["seconds"] / (len(tok(j["context"], add_special_tokens=False)["input_ids"]) / 600)
                  for j, r in zip(jobs, done)]
        extra = {"llmlingua_tokens_over_target_median": statistics.median(ratio),
                 "llmlingua_tokens_over_target_range": [min(ratio), max(ratio)],
                 "llmlingua_seconds_per_600_tokens_median": statistics.median(per600)}
        print(f"LLMLingua: {statistics.median(per600):.2f} s per 600-token prompt (median); its output was "
              f"{statistics.median(ratio):.2f}x the requested tokens (median; {min(ratio):.2f}-{max(ratio):.2f})")
    print(f"\nleanlm: {statistics.median(seconds):.3f} s per 600-token prompt (median; "
          f"{statistics.median(seconds_all):.3f} s scoring with all blocks), budget error max "
          f"{max(budget_err):.1%}, {n} examples")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"examples": n, "accuracy": summary,
                                           "seconds_per_600_tokens_median": statistics.median(seconds),
                                           "seconds_all_blocks_median": statistics.median(seconds_all),
                                           "budget_error_max": max(budget_err), "rows": rows, **extra,
                                           "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]},
                                          indent=2))


if __name__ == "__main__":
    main()
