"""Which recipes work on which model families: tiny random models of each family through `leanlm optimize`.

leanlm finds blocks, FFNs and attention projections from the module graph, never from a table per
architecture; this checks that claim. Each family gets a 4-block model (hidden 128, FFN 256, 4 heads
in 2 KV groups where the family has groups) with the tests' small BPE tokenizer, saved as an HF
directory, and each recipe runs in its own process (a crash is recorded as one, not lost), evaluated
on the first 40,000 characters of the eval split with a private cache. An outcome
is `ok` (with the KLD to the unchanged model), `refused` (leanlm's error, which must name why) or
`CRASH` (a traceback or a signal: a bug). Quality numbers of random models mean little; the point is
that every cell is `ok` or a clear refusal.
Run from the repository root (the tokenizer comes from tests/conftest.py):
    python benchmarks/families.py [--families qwen2 phi3] [--recipes wanda-50 width] [--out ...json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

LLAMA_LIKE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024)
FAMILIES = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": dict(LLAMA_LIKE, head_dim=32),
    "gemma": dict(LLAMA_LIKE, head_dim=32), "gemma2": dict(LLAMA_LIKE, head_dim=32), "granite": LLAMA_LIKE,
    "olmo2": LLAMA_LIKE, "stablelm": LLAMA_LIKE, "phi3": LLAMA_LIKE,
    "gpt_neox": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
    "opt": dict(hidden_size=128, ffn_dim=256, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=128),
    "gpt2": dict(n_embd=128, n_layer=4, n_head=4, n_positions=1024),
}
SMALL = {"samples": 32, "length": 256, "seed": 0}
# shipped recipes as they are; structural ones sized for 4 blocks and an FFN of 256
RECIPES = {name: name for name in ("magnitude-50", "wanda-50", "sparsegpt-50", "sparsegpt-2of4", "act-sparse-50",
                                   "w4-g64-gptq", "w4-g64-awq", "w8a8-smoothquant", "w8-rtn", "w4-mixed", "bf16")}
RECIPES.update({
    "depth": {"calibration": SMALL, "steps": [{"type": "depth", "blocks": 1}]},
    "width": {"calibration": SMALL, "steps": [{"type": "width", "ffn_keep": 0.75, "multiple_of": 32}]},
    "heads": {"calibration": SMALL, "steps": [{"type": "heads", "heads_per_group": 1}]},
    "kv-heads": {"calibration": SMALL, "steps": [{"type": "heads", "kv_groups": 1}]},
    "moefy": {"calibration": SMALL, "steps": [{"type": "moefy", "experts": 4, "shared": 0, "top_k": 2}]},
})


def build(family: str, root: Path, tokenizer) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **ids, **FAMILIES[family])).eval()
    path = root / family
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(model: Path, recipe, root: Path) -> dict:
    eval_text = root / "eval.txt"
    if not eval_text.exists():
        from leanlm.data.corpus import default_corpus

        eval_text.write_text(default_corpus().eval[:40_000])
    if isinstance(recipe, dict):
        path = root / f"recipe-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        recipe = str(path)
    out = root / f"out-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "leanlm", "-q", "optimize", str(model), "--recipe", recipe, "--out", str(out),
           "--eval-data", str(eval_text), "--no-bench", "--device", "cpu"]
    start = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1", "LEANLM_CACHE": str(root / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = round(time.perf_counter() - start, 1)
    error = next((line for line in proc.stderr.splitlines() if line.startswith("leanlm optimize: error:")), None)
    if proc.returncode == 0:
        quality = json.loads((out / "report.json").read_text())["result"]["quality"]
        return {"outcome": "ok", "kld": quality["kld"], "seconds": seconds}
    if proc.returncode == 2 and error:
        return {"outcome": "refused", "error": error.removeprefix("leanlm optimize: error: "), "seconds": seconds}
    return {"outcome": "CRASH", "returncode": proc.returncode, "tail": proc.stderr[-1500:], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", default="benchmarks/results/families.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            model = build(family, Path(tmp), tokenizer)
            results[family] = {}
            for name in args.recipes:
                cell = results[family][name] = run(model, RECIPES[name], Path(tmp))
                ok = cell["outcome"] == "ok"
                detail = f"KLD {cell['kld']:.4f}" if ok else cell.get("error") or cell["tail"][-160:]
                print(f"{family:9} {name:17} {cell['outcome']:8} {cell['seconds']:6.1f}s  {detail}", flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results, args.recipes)


def print_table(results: dict, recipes: list[str]) -> None:
    mark = {"ok": "ok", "refused": "no", "CRASH": "CRASH"}
    print("\n| family | " + " | ".join(recipes) + " |")
    print("|---" * (len(recipes) + 1) + "|")
    for family, cells in results.items():
        print(f"| {family} | " + " | ".join(mark[cells[r]["outcome"]] for r in recipes) + " |")


if __name__ == "__main__":
    main()
