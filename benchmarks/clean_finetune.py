"""Fine-tuning on dirty against cleaned data: does `leanlm data clean` buy a better model?

The dirty set is clean_conflicts.py's planted chat facts (sentences of the built-in corpus's documentation
turned into "complete this sentence" examples, a quarter with a contradicting answer among agreeing
variants), with what a crawl adds: each corrupted record copied one to two more times, and a tenth of the
sound records copied once. The cleaned set is that file through `leanlm data clean` at its defaults
(conflicts resolved by the majority). SmolLM2-135M gets the same LoRA fine-tune on each (same steps, batch,
learning rate, seed), and each model is measured on:

- held-out perplexity: the answer tokens of facts no training record holds;
- wrong answers on the corrupted facts: the share of planted conflicts where the model gives the corrupted
  answer a higher mean token log-probability than the true one, asked the fact's original prompt.

The base model's numbers are in the same table. Prints a table and writes JSON.

    python benchmarks/clean_finetune.py [--facts 400] [--steps 150] [--json benchmarks/results/clean_finetune.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from clean_conflicts import facts, planted  # noqa: E402


def dirty_rows(seed: int, n_facts: int) -> list[tuple[dict, int, str]]:
    """clean_conflicts' planted records, with crawled copies: corrupted ones 1-2 more times, a tenth of the rest once."""
    rng = random.Random(seed + 1000)
    rows = planted(seed, n_facts)
    copies = []
    for row in rows:
        if row[2] == "corrupt":
            copies += [row] * rng.choice((1, 2))
        elif rng.random() < 0.1:
            copies.append(row)
    rows = rows + copies
    rng.shuffle(rows)
    return rows


def corrupted_pairs(rows) -> list[tuple[str, str, str]]:
    """(original prompt, true answer, corrupted answer) for each planted conflict."""
    originals = {f: r["messages"] for r, f, role in rows if role == "original"}
    out, done = [], set()
    for r, f, role in rows:
        if role == "corrupt" and f not in done:
            done.add(f)
            prompt, answer = originals[f][0]["content"], originals[f][1]["content"]
            out.append((prompt, answer, r["messages"][1]["content"]))
    return out


@torch.inference_mode()
def answer_logprob(model, tok, prompt: str, answer: str) -> tuple[float, int]:
    """Summed log-probability of the answer's tokens (and its end-of-turn) after the prompt, and their count."""
    head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                   tokenize=False)
    start = len(tok(head, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    target = ids[0, 1:]
    picked = logp[torch.arange(len(target)), target][start - 1:]
    return float(picked.sum()), len(picked)


def measure(model, tok, pairs, held_out) -> dict:
    wrong = 0
    for prompt, true, bad in pairs:
        (lt, nt), (lb, nb) = answer_logprob(model, tok, prompt, true), answer_logprob(model, tok, prompt, bad)
        wrong += lb / nb > lt / nt  # per token: a negation adds a token, which alone would favour the truth
    nll = tokens = 0
    for prompt, answer in held_out:
        lp, n = answer_logprob(model, tok, prompt, answer)
        nll, tokens = nll - lp, tokens + n
    return {"wrong_answers": wrong / len(pairs), "wrong": wrong, "corrupted_facts": len(pairs),
            "held_out_perplexity": math.exp(nll / tokens), "held_out_tokens": tokens}


def finetune_on(base, tok, path: Path, args) -> tuple[torch.nn.Module, dict]:
    from leanlm.finetune.finetune import FinetuneConfig, finetune_
    from leanlm.train.trainer import TrainConfig

    cfg = FinetuneConfig(method="lora", data=str(path), rank=16, train=TrainConfig(
        steps=args.steps, batch_size=8, micro_batch_size=8, seq_len=160, lr=args.lr, eval_every=25,
        patience=args.steps, checkpoint_every=10**6, seed=0))
    t0 = time.perf_counter()
    model, stats = finetune_(copy.deepcopy(base), tok, cfg)
    return model, {"examples": stats["examples"], "seconds": time.perf_counter() - t0,
                   "validation_perplexity_after": stats["validation_perplexity_after"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=400)
    ap.add_argument("--held-out", type=int, default=150)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/clean_finetune.json"))
    args = ap.parse_args()
    from leanlm.clean import clean
    from leanlm.models.load import load_model

    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m", "cpu", "float32")
    base, tok = loaded.model, loaded.tokenizer
    rows = dirty_rows(args.seed, args.facts)
    pairs = corrupted_pairs(rows)
    held_out = facts(args.facts + args.held_out, args.seed)[args.facts:]
    result = {"date": time.strftime("%Y-%m-%d"), "facts": args.facts, "steps": args.steps, "lr": args.lr,
              "seed": args.seed, "dirty_records": len(rows), "corrupted_records": sum(r[2] == "corrupt" for r in rows)}
    with tempfile.TemporaryDirectory() as tmp:
        dirty = Path(tmp) / "dirty.jsonl"
        dirty.write_text("".join(json.dumps(r) + "\n" for r, _, _ in rows))
        report = clean([dirty], Path(tmp) / "clean", progress=False)
        cleaned = Path(tmp) / "clean" / "dirty.jsonl"
        kept = [json.loads(line) for line in cleaned.read_text().splitlines()]
        bad_answers = {b for _, _, b in pairs}
        result["clean_records"] = len(kept)
        result["corrupted_records_kept"] = sum(r["messages"][1]["content"] in bad_answers for r in kept)
        result["clean_report"] = {k: report[k] for k in ("records", "kept", "counts")}
        rows_out = {"base (no fine-tune)": measure(base, tok, pairs, held_out)}
        print(f"base: {rows_out['base (no fine-tune)']}", flush=True)
        for name, path in (("fine-tuned on the dirty set", dirty), ("fine-tuned on the cleaned set", cleaned)):
            model, stats = finetune_on(base, tok, path, args)
            rows_out[name] = {**measure(model, tok, pairs, held_out), **stats}
            print(f"{name}: {rows_out[name]}", flush=True)
    result["rows"] = rows_out
    print(f"\n{result['dirty_records']} dirty records ({result['corrupted_records']} corrupted, copies included), "
          f"{result['clean_records']} after cleaning ({result['corrupted_records_kept']} corrupted kept); "
          f"{len(pairs)} corrupted facts, {len(held_out)} held-out facts; LoRA r16, {args.steps} steps of 8")
    print(f"{'model':32s} {'wrong answers':>14s} {'held-out ppl':>13s} {'train records':>14s}")
    for name, r in rows_out.items():
        print(f"{name:32s} {r['wrong_answers']:13.1%} {r['held_out_perplexity']:13.3f} {r.get('examples', '-'):>14}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
