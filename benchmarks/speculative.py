"""Speculative decoding on SmolLM2-135M, against transformers' own, same prompts, same machine, one run.

Two workloads built from the default corpus's held-out split (leanlm.speculate.workload):
- grounded (summarize / extract from / quote a passage), 128 new tokens, greedy: prompt lookup;
- chat (open-ended questions): a draft model leanlm makes from the target (int8 RTN, or int4 RTN g64).

Rows, each the median over repeats per prompt (after a warm-up on the first), summed over prompts:
  leanlm eager            leanlm's loop, stock nn.Linear (the loop before this issue)
  leanlm prepacked        the same loop, float32 linears through oneDNN with prepacked weights
  leanlm lookup/draft     speculation over the prepacked loop
  hf generate             transformers' greedy generate on the stock model
  hf lookup/assisted      generate(prompt_lookup_num_tokens=10) / generate(assistant_model=drafter)
  hf ... prepacked        the same on the prepacked model (the same kernels, transformers' loop)
Speculation runs over both loops ("... eager": the stock target). Speedups are against the faster of
"leanlm prepacked" and "leanlm eager" in the same run (which one wins depends on the CPU: prepacked was
1.43x on one VM, 0.88x on another); outputs are checked to be identical to plain greedy decoding.

    python benchmarks/speculative.py --out benchmarks/results/speculative.json
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
from leanlm.data.corpus import default_corpus  # noqa: E402
from leanlm.measure.speculative import median_time  # noqa: E402
from leanlm.models.load import load_model  # noqa: E402
from leanlm.quantize import quantize_  # noqa: E402
from leanlm.quantize.rtn import RTNConfig  # noqa: E402
from leanlm.runtime.generate import generate  # noqa: E402
from leanlm.runtime.onednn_linear import has_float_linears, pack_linears  # noqa: E402
from leanlm.speculate import DraftLength, DraftModel, PromptLookup, SpecStats, speculative_generate  # noqa: E402
from leanlm.speculate.workload import build_prompts  # noqa: E402


# the head is a fifth of SmolLM2-135M's weights and each drafted token pays for it: int8-head drafts fastest
DRAFTERS = {"int8": RTNConfig(bits=8), "int8-head": RTNConfig(bits=8, skip=[]),
            "int4": RTNConfig(bits=4, group_size=64)}


def hf_generate(model, ids, new, eos, **kw):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos, **kw)
    return out[:, ids.shape[1]:]


def run_workload(rows: dict, prompts, tok, modes: dict, new: int, repeats: int, warmup: int) -> dict:
    """modes: name -> fn(ids) returning tokens; 'reference' is plain greedy for the identity check."""
    totals = {name: 0.0 for name in modes}
    same = {name: 0 for name in modes}
    for i, text in enumerate(prompts):
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        reference = None
        for name, fn in modes.items():
            # every mode warms up on the first prompt (thread pools, kernel layouts), not again per prompt
            seconds, out = median_time(lambda: fn(ids), repeats, warmup if i == 0 else 0)
            reference = out if reference is None else reference
            totals[name] += seconds
            same[name] += int(torch.equal(out, reference))
            print(f"  prompt {i} ({ids.shape[1]} tokens)  {name:28s} {seconds:6.2f} s  {out.shape[1]} tokens",
                  flush=True)
    rows.update({name: {"seconds": totals[name], "identical_prompts": same[name], "prompts": len(prompts)}
                 for name in modes})
    return rows


def spec_mode(model, drafter, new, eos, stats: SpecStats):
    def fn(ids):
        return speculative_generate(model, ids, new, drafter, eos, length=DraftLength(), stats=stats)
    return fn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--drafter", default="int8-head", choices=list(DRAFTERS),
                    help="the target quantized by RTN: int8 (LM head kept float), int8-head (the head int8 too), "
                         "int4 (groups of 64)")
    ap.add_argument("--skip", default="", help="comma-separated workloads to skip: grounded,chat")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    target = load_model("smollm2-135m", "cpu", "float32")
    tok, eos, new = target.tokenizer, target.tokenizer.eos_token_id, args.new_tokens
    stock = target.model
    packed = copy.deepcopy(stock)
    pack_linears(packed)
    text = default_corpus().eval
    result = {"model": "smollm2-135m", "threads": torch.get_num_threads(), "new_tokens": new,
              "repeats": args.repeats, "warmup": args.warmup, "date": time.strftime("%Y-%m-%d")}
    r, w = args.repeats, args.warmup
    if "grounded" not in args.skip:
        lookup_stats = SpecStats()
        modes = {"leanlm prepacked": lambda ids: generate(packed, ids, new, eos),
                 "leanlm eager": lambda ids: generate(stock, ids, new, eos),
                 "leanlm lookup": spec_mode(packed, PromptLookup(), new, eos, lookup_stats),
                 "leanlm lookup eager": spec_mode(stock, PromptLookup(), new, eos, SpecStats()),
                 "hf generate": lambda ids: hf_generate(stock, ids, new, eos),
                 "hf lookup": lambda ids: hf_generate(stock, ids, new, eos, prompt_lookup_num_tokens=10),
                 "hf lookup prepacked": lambda ids: hf_generate(packed, ids, new, eos, prompt_lookup_num_tokens=10)}
        print("grounded workload, prompt lookup")
        rows = run_workload({}, build_prompts("grounded", tok, text, args.prompts), tok, modes, new, r, w)
        result["grounded"] = {"rows": rows, "lookup": lookup_stats.as_dict()}
    if "chat" not in args.skip:
        drafter_model = copy.deepcopy(stock)
        quantize_(drafter_model, DRAFTERS[args.drafter])
        if has_float_linears(drafter_model):
            pack_linears(drafter_model)
        draft_stats = SpecStats()
        modes = {"leanlm prepacked": lambda ids: generate(packed, ids, new, eos),
                 "leanlm eager": lambda ids: generate(stock, ids, new, eos),
                 f"leanlm drafter {args.drafter} alone": lambda ids: generate(drafter_model, ids, new, eos),
                 "leanlm draft": spec_mode(packed, DraftModel(drafter_model), new, eos, draft_stats),
                 "leanlm draft eager": spec_mode(stock, DraftModel(drafter_model), new, eos, SpecStats()),
                 "hf generate": lambda ids: hf_generate(stock, ids, new, eos),
                 "hf assisted": lambda ids: hf_generate(stock, ids, new, eos, assistant_model=drafter_model),
                 "hf assisted prepacked": lambda ids: hf_generate(packed, ids, new, eos, assistant_model=drafter_model)}
        print(f"chat workload, {args.drafter} drafter")
        rows = run_workload({}, build_prompts("chat", tok, text, args.prompts), tok, modes, new, r, w)
        result["chat"] = {"rows": rows, "draft": draft_stats.as_dict(), "drafter": args.drafter}
    report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


def report(result: dict) -> None:
    for workload in ("grounded", "chat"):
        if workload not in result:
            continue
        rows = result[workload]["rows"]
        plain = min(("leanlm prepacked", "leanlm eager"), key=lambda name: rows[name]["seconds"])
        base = rows[plain]["seconds"]
        result[workload]["baseline"] = plain
        print(f"\n{workload}: {result['new_tokens']} new tokens, greedy; time summed over prompts "
              f"(median of {result['repeats']} after {result['warmup']} warm-up each); baseline: {plain}, "
              "the faster loop without speculation")
        print(f"{'mode':30s} {'seconds':>8s} {'vs baseline':>12s} {'vs prepacked':>13s} {'identical':>10s}")
        for name, row in rows.items():
            row["speedup"] = base / row["seconds"]
            row["speedup_vs_prepacked"] = rows["leanlm prepacked"]["seconds"] / row["seconds"]
            print(f"{name:30s} {row['seconds']:8.1f} {row['speedup']:11.2f}x {row['speedup_vs_prepacked']:12.2f}x "
                  f"{row['identical_prompts']:>5d}/{row['prompts']}")
        stats = result[workload].get("lookup") or result[workload].get("draft")
        print(f"acceptance {stats['acceptance_rate']:.1%}, tokens per target pass {stats['tokens_per_step']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
