"""Federated LoRA against centralized LoRA on the union of the clients' text, same total training steps.

The built-in corpus' training topics dealt to 4 clients by topic (non-IID) and round-robin (IID). Each
federated run: `--rounds` rounds, every client `--local-steps` steps a round. Centralized: one adapter trained
on all clients' text together for rounds x clients x local-steps steps, same batch, learning rate and seed.
All are scored on the same pooled held-out windows. Reported: perplexity before and after, each run's gain as
a share of the centralized gain, bytes a client sends per round (float32, int8, top-k updates), minutes.
The `topic-qlora` run trains over an int4 base that `--qlora-recipe` makes (QLoRA) and reports the share of
its adapter's gain the merged, requantized model keeps.

A run is named SPLIT[-WIRE][@KEY=VALUE,...]: `topic-int8`, `iid`, `topic@server_step=2` (any federate
setting). Each split's runs are compared with the centralized run on that split's clients' text.

    python benchmarks/federated.py [--rounds 4 --local-steps 5 --seq-len 128 --batch-size 2]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path


def centralized(base: str, settings: dict) -> dict:
    from leanlm.federate import client as local
    from leanlm.federate.data import client_texts

    s = settings
    texts = client_texts(None, s["clients"], s["split"], s["holdout"])
    clients = [{"name": t.name, "train": t.train, "holdout": t.holdout} for t in texts]
    a = local.adapted(base, {**s, "freeze_a": False})
    pooled = local.pooled_holdout(a.tokenizer, clients, s["seq_len"], s["eval_windows"])
    before, _ = local.mean_loss(a, pooled)
    union = local.examples(a.tokenizer, "\n\n".join(c["train"] for c in clients), s["seq_len"])
    start = time.perf_counter()
    steps = s["rounds"] * s["clients"] * s["local_steps"]
    local.local_train(a, union, steps, s["batch_size"], s["lr"], 0.0, s["seed"])
    after, _ = local.mean_loss(a, pooled)
    local._MODELS.clear()
    return {"perplexity_before": math.exp(before), "perplexity_after": math.exp(after), "steps": steps,
            "minutes": (time.perf_counter() - start) / 60}


def int4_base(base: str, recipe: str, tmp: Path) -> str:
    """The int4 model QLoRA clients train over, made by a shipped recipe (no speed bench)."""
    from leanlm import optimize

    optimize(base, recipe, out=tmp / "int4", bench=False)
    return str(tmp / "int4" / "model")


def main() -> None:
    from leanlm.core.config import to_dict
    from leanlm.federate import FederateConfig, federate
    from leanlm.models.load import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--runs", nargs="+", default=["topic", "iid", "topic-int8", "topic-topk", "topic-qlora"])
    ap.add_argument("--qlora-recipe", default="w4-g64-gptq", help="recipe that makes the int4 base of topic-qlora")
    ap.add_argument("--eval-windows", type=int, default=0, help="pooled held-out windows scored (0: all)")
    ap.add_argument("--json", default="benchmarks/results/federated.json")
    args = ap.parse_args()
    base = str(load_model("smollm2-135m", "cpu").path)
    common = {"clients": 4, "rounds": args.rounds, "local_steps": args.local_steps, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "lr": args.lr, "rank": 16, "min_clients": 4,
              "eval_windows": args.eval_windows}
    rows, gains = [], {}
    for split in dict.fromkeys(name.partition("-")[0].partition("@")[0] for name in args.runs):
        central = centralized(base, to_dict(FederateConfig(**common, split=split)))
        gains[split] = central["perplexity_before"] - central["perplexity_after"]
        rows.append({"run": f"centralized ({split})", **central, "share_of_central_gain": 1.0})
        print(f"centralized on the {split} clients' text: {central['perplexity_before']:.3f} -> "
              f"{central['perplexity_after']:.3f} ({central['steps']} steps, {central['minutes']:.1f} min)", flush=True)
    for name in args.runs:
        head, _, extra = name.partition("@")
        split, _, wire = head.partition("-")
        gain = gains[split]
        qlora = wire == "qlora"
        cfg = {**common, "split": split, "compress": "none" if qlora else (wire or "none"), "topk": 0.1,
               **{k: json.loads(v) for k, v in (kv.split("=", 1) for kv in extra.split(",") if kv)}}
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            run_base = int4_base(base, args.qlora_recipe, Path(tmp)) if qlora else base
            r = federate(run_base, Path(tmp) / "out", config=cfg)
        row = {"run": name, "perplexity_before": r["perplexity_before"], "perplexity_after": r["perplexity_after"],
               "perplexity_adapter": r["perplexity_adapter"], "bytes_up_per_client_round": r["bytes_up_per_client_round"],
               "minutes": (time.perf_counter() - start) / 60,
               "share_of_central_gain": (r["perplexity_before"] - r["perplexity_adapter"]) / gain if gain > 0 else None,
               "curve": [math.exp(h["central_loss"]) for h in r["history"]]}
        if qlora:  # the base is the int4 model: its own gain, and the share the requantized merge keeps
            own = r["perplexity_before"] - r["perplexity_adapter"]
            row["qlora_recipe"] = args.qlora_recipe
            row["merged_share_of_adapter_gain"] = (r["perplexity_before"] - r["perplexity_after"]) / own if own else None
        rows.append(row)
        save(args.json, common, rows)
        print(f"{name}: {row['perplexity_before']:.3f} -> {row['perplexity_adapter']:.3f} (merged "
              f"{row['perplexity_after']:.3f}), {row['share_of_central_gain']:.1%} of the centralized gain, "
              f"{row['bytes_up_per_client_round'] / 1024:.0f} KiB up per client per round, {row['minutes']:.1f} min",
              flush=True)
    plain = next((r for r in rows if r["run"] == "topic"), None)
    if plain:
        for r in rows:
            if r["run"] in ("topic-int8", "topic-topk"):  # against the float federated run
                r["bytes_cut_vs_float"] = plain["bytes_up_per_client_round"] / r["bytes_up_per_client_round"]
                r["share_of_float_federated_gain"] = ((r["perplexity_before"] - r["perplexity_adapter"])
                                                      / (plain["perplexity_before"] - plain["perplexity_adapter"]))
    print(f"\n{'run':14} {'ppl after':>9} {'share of central gain':>22} {'KiB up/client/round':>20}")
    for r in rows:
        after = r.get("perplexity_adapter", r["perplexity_after"])
        kib = f"{r['bytes_up_per_client_round'] / 1024:.0f}" if "bytes_up_per_client_round" in r else "-"
        print(f"{r['run']:14} {after:9.3f} {r['share_of_central_gain']:22.1%} {kib:>20}")
    save(args.json, common, rows)


def save(path: str, settings: dict, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"settings": settings, "rows": rows, "date": time.strftime("%Y-%m-%d")},
                                     indent=2))


if __name__ == "__main__":
    main()
