"""The prefix (KV) cache through real servers: a ~1,000-token system prompt shared by later requests.
Two `leanlm serve` processes, one with `--cache prefix`, one without, each sent the same requests: one
to warm the prefix, then `--repeats` questions under the same system prompt, streamed, TTFT measured by the
client. Checks that the answers are token-identical. Prints a table and writes JSON.

    python benchmarks/prefix_cache.py --out benchmarks/results/prefix-cache.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.serve_load import Proc, leanlm_cmd  # noqa: E402
from leanlm.data.corpus import default_corpus  # noqa: E402
from tests.serve_helpers import free_port  # noqa: E402

QUESTIONS = ["What is this text about?", "Give one example from it.", "Summarize it in a sentence.",
             "Which Python feature does it describe?", "Is anything in it deprecated?", "Who would read this?"]


def system_prompt(tokens: int, tokenizer) -> str:
    text = default_corpus().train
    words = text[5000:5000 + tokens * 8]
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:tokens]
    return "Answer questions about this documentation.\n\n" + tokenizer.decode(ids)


def run(url: str, system: str, repeats: int) -> tuple[list[float], list[str]]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    ttft, answers = [], []
    for q in ["Warm-up: what is this?"] + QUESTIONS[:repeats]:
        start = time.perf_counter()
        first, text = None, ""
        for chunk in client.chat.completions.create(model="m", max_tokens=16, temperature=0, stream=True, messages=[
                {"role": "system", "content": system}, {"role": "user", "content": q}]):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
        ttft.append((first or time.perf_counter()) - start)
        answers.append(text)
    return ttft[1:], answers[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/prefix-cache.json")
    args = ap.parse_args()
    from leanlm.models.load import load_model

    system = system_prompt(args.system_tokens, load_model(args.model, "cpu").tokenizer)
    work = Path(tempfile.mkdtemp(prefix="leanlm-prefix-"))
    results = {}
    for label, extra in (("without", []), ("with --cache prefix", ["--cache", "prefix"])):
        port = free_port()
        proc = Proc(label, leanlm_cmd(args.model, port, "m", extra), f"http://127.0.0.1:{port}",
                    work / f"{label.split()[0]}.log", ready_path="/health")
        try:
            results[label] = run(proc.url, system, args.repeats)
        finally:
            proc.stop()
    (t0, a0), (t1, a1) = results["without"], results["with --cache prefix"]
    report = {"date": time.strftime("%Y-%m-%d"), "system_tokens": args.system_tokens, "repeats": args.repeats,
              "ttft_without_s": statistics.median(t0), "ttft_with_s": statistics.median(t1),
              "speedup": statistics.median(t0) / statistics.median(t1), "identical": a0 == a1,
              "answers_without": a0, "answers_with": a1}
    print(f"{'':22} {'TTFT p50':>9}\nwithout prefix cache   {report['ttft_without_s'] * 1000:>7.0f}ms\n"
          f"with --cache prefix    {report['ttft_with_s'] * 1000:>7.0f}ms\nspeedup {report['speedup']:.1f}x; "
          f"answers token-identical: {report['identical']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
