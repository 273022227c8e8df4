"""Conflicting fine-tuning examples on planted data built from Python's documentation.

Each fact is a sentence of the built-in corpus turned into a chat example: the prompt asks to complete the
sentence's first half, the answer is its second half. A quarter of the facts get a planted conflict group:
one to three agreeing variants (prompt reformatted or with "please", answer reformatted, prefixed, extended
or cut short) and one corrupted answer (a content word or number substituted, or a negation added). Another
quarter get agreeing variants only: a detector that flags them makes false groups. Measured with
`leanlm data clean --conflicts flag`: the share of planted groups found (a flagged group holding the corrupted
record and one of its fact's others) and the share of flagged groups that are false (any member from another
fact, or no corrupted member); with `majority`: corrupted records removed, sound records lost. The baseline
is what a script would do: group by the normalized prompt and flag answers whose normalized text differs.

    python benchmarks/clean_conflicts.py [--json benchmarks/results/clean_conflicts.json]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from clean_dedup import chunks  # noqa: E402  (the same corpus split as the duplicate benchmark)

_VERB = re.compile(r"\b(is|are|can|must|will|does|should|may|was|has)\b")
_NUMBER = re.compile(r"\b\d+\b")


def facts(limit: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, answer) from sentences of 12-40 words, distinct by their first half."""
    seen, out = set(), []
    for chunk in chunks():
        for sent in re.split(r"(?<=[.!?])\s+", " ".join(chunk.split())):
            w = sent.split()
            if not 12 <= len(w) <= 40 or sum(any(c.isalpha() for c in t) for t in w) < 0.8 * len(w):
                continue
            head, tail = " ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2:])
            # the manual repeats some sentences with a different start: one fact per first and per second half
            if head.lower() not in seen and tail.lower() not in seen:
                seen |= {head.lower(), tail.lower()}
                out.append((f'Complete this sentence from the Python reference: "{head} ..."', " ".join(w[len(w) // 2:])))
    random.Random(seed).shuffle(out)
    return out[:limit]


def corrupt(answer: str, rng: random.Random, vocab: list[str]) -> tuple[str, str]:
    from leanlm.clean.text_ops import STOPWORDS

    numbers = list(_NUMBER.finditer(answer))
    kind = rng.choice(("substitute", "substitute", "negate", "number"))
    if kind == "number" and numbers:
        m = rng.choice(numbers)
        return answer[:m.start()] + str(int(m.group()) + rng.randrange(1, 9)) + answer[m.end():], kind
    verb = _VERB.search(answer)
    if kind == "negate" and verb and " not " not in answer:
        return answer[:verb.end()] + " not" + answer[verb.end():], kind
    words = answer.split()
    spots = [i for i, t in enumerate(words) if t.lower().strip(".,;:()\"'") not in STOPWORDS and t.isalpha()]
    i = rng.choice(spots or range(len(words)))
    words[i] = rng.choice([v for v in vocab if v.lower() != words[i].lower()])
    return " ".join(words), "substitute"


def agreeing(prompt: str, answer: str, rng: random.Random, extra: str) -> tuple[str, str]:
    p = rng.choice((prompt, "Please " + prompt[0].lower() + prompt[1:], prompt + " Thanks.", prompt.lower(),
                    "  ".join(prompt.split())))
    a = rng.choice((answer.upper(), "Sure: " + answer, answer + " " + extra,
                    " ".join(answer.split()[: max(3, int(len(answer.split()) * 0.7))]), "\n".join(answer.split(", "))))
    return p, a


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def planted(seed: int, limit: int = 1500):
    """Records, each with (fact id, role) where role is original | agree | corrupt."""
    rng = random.Random(seed)
    base = facts(limit, seed)
    vocab = sorted({w for _, a in base for w in a.split() if w.isalpha() and len(w) > 3})
    rows = []
    for f, (p, a) in enumerate(base):
        rows.append((chat(p, a), f, "original"))
        r = rng.random()
        if r < 0.5:
            extra = base[rng.randrange(len(base))][1]
            rows += [(chat(*agreeing(p, a, rng, extra)), f, "agree") for _ in range(rng.choice((1, 1, 2, 3)))]
        if r < 0.25:
            rows.append((chat(agreeing(p, a, rng, "")[0] if rng.random() < 0.5 else p, corrupt(a, rng, vocab)[0]),
                         f, "corrupt"))
    rng.shuffle(rows)
    return rows


def score(rows, groups: list[list[int]]) -> dict:
    """A flagged group is right when it holds a corrupted record and another record of the same fact (members
    from a fact with a near-same prompt make it mixed, not false); it is false otherwise."""
    planted_groups = {rows[i][1] for i in range(len(rows)) if rows[i][2] == "corrupt"}
    found, false, mixed = set(), 0, 0
    for grp in groups:
        hit = {rows[i][1] for i in grp if rows[i][2] == "corrupt"
               and any(rows[j][1] == rows[i][1] and j != i for j in grp)}
        found |= hit
        false += not hit
        mixed += bool(hit) and len({rows[i][1] for i in grp}) > 1
    return {"planted_groups": len(planted_groups), "flagged_groups": len(groups),
            "found": len(found & planted_groups) / len(planted_groups),
            "false_group_share": false / len(groups) if groups else 0.0, "mixed_groups": mixed}


def run_leanlm(rows, policy: str) -> tuple[dict, float]:
    from leanlm.clean import clean

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "chat.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r, _, _ in rows))
        t0 = time.perf_counter()
        clean([src], Path(tmp) / "out", {"conflicts": {"policy": policy}}, progress=False)
        seconds = time.perf_counter() - t0
        out = Path(tmp) / "out"
        groups = [[m["index"] for m in json.loads(line)]
                  for line in (out / "conflicts.jsonl").read_text().splitlines()] if policy == "flag" and (
                      out / "conflicts.jsonl").exists() else []
        removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    if policy == "flag":
        return score(rows, groups), seconds
    gone = {r["index"] for r in removed if r["reason"] == "conflict"}
    corrupted = [i for i, r in enumerate(rows) if r[2] == "corrupt"]
    sound = [i for i, r in enumerate(rows) if r[2] != "corrupt"]
    return {"corrupted_removed": sum(i in gone for i in corrupted) / len(corrupted),
            "sound_removed_as_conflict": sum(i in gone for i in sound) / len(sound),
            "corrupted_kept": sum(i not in {r["index"] for r in removed} for i in corrupted)}, seconds


def run_baseline(rows) -> dict:
    from leanlm.clean.text_ops import normalize

    by_prompt: dict[str, list[int]] = {}
    for i, (rec, _, _) in enumerate(rows):
        by_prompt.setdefault(normalize(rec["messages"][0]["content"]), []).append(i)
    groups = [g for g in by_prompt.values()
              if len({normalize(rows[i][0]["messages"][1]["content"]) for i in g}) > 1]
    return score(rows, groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="benchmarks/results/clean_conflicts.json")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    results = []
    for seed in range(args.seeds):
        rows = planted(seed)
        flag, seconds = run_leanlm(rows, "flag")
        majority, _ = run_leanlm(rows, "majority")
        results.append({"seed": seed, "records": len(rows), "leanlm": flag, "leanlm_majority": majority,
                        "baseline_same_prompt_different_text": run_baseline(rows), "seconds": seconds})
    print(f"{'tool':36} {'seed':>4} {'records':>7} {'planted':>7} {'flagged':>7} {'found':>6} {'false':>6}")
    for r in results:
        for name, key in (("leanlm (flag)", "leanlm"), ("same prompt, different text", "baseline_same_prompt_different_text")):
            m = r[key]
            print(f"{name:36} {r['seed']:4d} {r['records']:7d} {m['planted_groups']:7d} {m['flagged_groups']:7d} "
                  f"{m['found']:6.1%} {m['false_group_share']:6.1%}")
        m = r["leanlm_majority"]
        print(f"{'  majority: corrupted removed':36} {'':4} {'':7} {m['corrupted_removed']:.1%}; sound records removed "
              f"{m['sound_removed_as_conflict']:.2%}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"results": results, "date": time.strftime("%Y-%m-%d"),
                                           "python": sys.version.split()[0]}, indent=2))


if __name__ == "__main__":
    main()
