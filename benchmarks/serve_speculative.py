"""`leanlm serve --speculative` against plain `leanlm serve`, one request at a time, on two workloads built
from the default corpus's held-out split: grounded (summarize / extract / quote a passage: answers that
repeat the prompt) and chat (open-ended questions: little to copy). Each (server, workload) pair starts
its own server, so the speed gate decides per workload. Greedy, the same requests to every server; the
answers are checked identical. Prints a table and writes JSON.

    python benchmarks/serve_speculative.py --out benchmarks/results/serve_speculative.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serve_load import Proc, leanlm_cmd  # noqa: E402
from leanlm.data.corpus import default_corpus  # noqa: E402
from leanlm.speculate.workload import prompt_contents  # noqa: E402
from tests.serve_helpers import free_port  # noqa: E402


def run(label: str, extra: list[str], contents: list[str], tokens: int, rounds: int, work: Path) -> dict:
    port = free_port()
    server = Proc(label, leanlm_cmd("smollm2-135m", port, "m", extra), f"http://127.0.0.1:{port}",
                  work / f"{label.replace(' ', '_')}.log")
    try:
        answers, seconds, generated = [], 0.0, 0
        with httpx.Client(timeout=600) as client:
            for r in range(rounds):
                for content in contents:
                    start = time.perf_counter()
                    reply = client.post(server.url + "/v1/chat/completions", json={
                        "model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
                        "temperature": 0}).json()
                    if r > 0:  # the first round warms up (and, with --speculative, runs the gate's first phases)
                        seconds += time.perf_counter() - start
                        generated += reply["usage"]["completion_tokens"]
                    answers.append(reply["choices"][0]["message"]["content"])
            stats = client.get(server.url + "/stats").json()
    finally:
        server.stop()
    return {"tokens_per_s": generated / seconds, "answers": answers, "speculative": stats.get("speculative")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the prompts; the first is a warm-up")
    ap.add_argument("--modes", default="lookup", help="comma-separated --speculative modes")
    ap.add_argument("--out", default="benchmarks/results/serve_speculative.json")
    args = ap.parse_args()
    text = default_corpus().eval
    work = Path(tempfile.mkdtemp(prefix="serve-spec-"))
    result = {"date": time.strftime("%Y-%m-%d"), "settings": vars(args), "rows": []}
    print(f"{'workload':9} {'server':32} {'tokens/s':>9} {'x plain':>8} {'gate':>6}  identical  accepted/drafted")
    for workload in ("grounded", "chat"):
        contents = prompt_contents(workload, text, args.prompts)
        plain = run("plain", [], contents, args.max_tokens, args.rounds, work)
        rows = [("leanlm serve", plain)]
        for mode in args.modes.split(","):
            rows.append((f"leanlm serve --speculative {mode}",
                         run(f"spec-{mode}", ["--speculative", mode], contents, args.max_tokens, args.rounds, work)))
        for name, r in rows:
            spec = r["speculative"] or {}
            gate = "on" if spec.get("enabled") else "off" if spec else "-"
            ratio = r["tokens_per_s"] / plain["tokens_per_s"]
            same = r["answers"] == plain["answers"]
            counts = f"{spec.get('accepted', 0)}/{spec.get('drafted', 0)}" if spec else "-"
            print(f"{workload:9} {name:32} {r['tokens_per_s']:9.2f} {ratio:7.2f}x {gate:>6}  {str(same):9}  {counts}")
            result["rows"].append({"workload": workload, "server": name, "tokens_per_s": r["tokens_per_s"],
                                   "vs_plain": ratio, "identical": same, "speculative": spec})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
