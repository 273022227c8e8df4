"""`leanlm data clean`: three passes over the input, so memory holds per-record keys, never the records.

Pass 1 reads every record once: exact keys, quality and contamination verdicts, MinHash bands of texts and of
prompts. Pass 2 reads again only to verify candidates by their exact similarity and to compare the answers of
prompts that occur more than once. Pass 3 writes the kept records, each redacted of PII, into a temporary
directory that replaces OUT only when complete; every removed or changed record goes to removed.jsonl."""

from __future__ import annotations

import bisect
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from leanlm.clean import conflict_ops, near_ops, text_ops
from leanlm.clean.analyze import BATCH, RayWorkers, Workers, analyze, redact
from leanlm.clean.config import CleanConfig, load_config
from leanlm.clean.records import Writer, input_files, read_raw, read_records, to_record
from leanlm.clean.report import write_report
from leanlm.core.paths import atomic_dir, check_output
from leanlm.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class Verdicts:
    """What pass 1 and 2 decided, by global record number (gid: records of earlier files, then the index)."""
    removed: dict[int, tuple[str, int | None]] = field(default_factory=dict)  # gid -> (reason, of gid)
    flagged: list[list[int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # gid of each file's first record
    stats: dict = field(default_factory=dict)
    texts_index: near_ops.BandIndex | None = None
    prompt_index: near_ops.BandIndex | None = None
    prompt_groups: list[list[int]] = field(default_factory=list)  # alive records sharing a normalized prompt

    def place(self, gid: int) -> tuple[int, int]:
        """(file number, index in that file) of a record."""
        fileno = bisect.bisect_right(self.starts, gid) - 1
        return fileno, gid - self.starts[fileno]


def clean(inputs: list[str | Path], out: str | Path, config: CleanConfig | dict | str | None = None,
          overwrite: bool = False, progress: bool = True, workers: int = 1, engine: str = "local",
          ray_address: str = "local") -> dict:
    """Clean `inputs` into `out`; returns the report (also written as out/report.json and report.md).
    `workers` > 1 parses, hashes and redacts in that many processes; `engine="ray"` does that as Ray tasks on
    the cluster at `ray_address` instead. The result depends on neither."""
    cfg = config if isinstance(config, CleanConfig) else load_config(config)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if engine not in ("local", "ray"):
        raise ConfigError(f"engine {engine!r}: use local (this machine, --workers processes) or ray")
    files = input_files([Path(p) for p in inputs])
    check_output(out, overwrite)
    start = time.perf_counter()
    eval_grams = _eval_ngrams(cfg.contamination)
    pool = RayWorkers(ray_address, cfg, eval_grams) if engine == "ray" else Workers(workers, cfg, eval_grams)
    try:
        verdicts = _first_pass(files, cfg, pool, progress)
        _second_pass(files, cfg, verdicts, progress)
        with atomic_dir(out, overwrite) as tmp:
            report = _write(files, cfg, verdicts, pool, tmp, progress)
            report["seconds"] = time.perf_counter() - start
            report["workers"] = workers
            report["engine"] = engine
            write_report(report, tmp)
    finally:
        pool.close()
    return report


def _batches(files, progress: bool, desc: str, extra=None):
    """(tag, args) calls for `Workers.map`: a batch of raw items of one file at a time, tagged with
    (file number, gid of the batch's first record)."""
    gid = 0
    for fileno, (path, _) in enumerate(files):
        items: list = []
        for item in tqdm(read_raw(path), desc=f"{desc} {path.name}", unit=" rec", disable=not progress, leave=False):
            items.append(item)
            if len(items) == BATCH:
                yield (fileno, gid, items), (path.suffix, str(path), items, *(extra(gid, items) if extra else ()))
                gid += len(items)
                items = []
        if items:
            yield (fileno, gid, items), (path.suffix, str(path), items, *(extra(gid, items) if extra else ()))
            gid += len(items)


def _first_pass(files, cfg: CleanConfig, pool: Workers, progress: bool) -> Verdicts:
    """Per-record work in batches (possibly in workers); what needs every record (which copy came first, which
    prompts repeat) is decided once at the end, over arrays of digests rather than a dict of them."""
    v = Verdicts()
    v.texts_index = near_ops.BandIndex(cfg.near_duplicates.bands) if cfg.near_duplicates.enabled else None
    v.prompt_index = near_ops.BandIndex(cfg.near_duplicates.bands) if cfg.conflicts.enabled else None
    keys, prompt_keys, prompt_ids, reasons, total = [], [], [], {}, 0
    for (fileno, base, items), res in pool.map(analyze, _batches(files, progress, "reading")):
        while len(v.starts) <= fileno:  # a file with no records starts where the next one does
            v.starts.append(base)
        keys.append(res.keys)
        reasons.update((base + pos, r) for pos, r in res.reasons.items())
        if v.texts_index is not None:
            v.texts_index.extend(base + res.text_rows, res.text_bands)
        if v.prompt_index is not None:
            v.prompt_index.extend(base + res.prompt_rows, res.prompt_bands)
            prompt_keys.append(res.prompt_keys)
            prompt_ids.append(base + res.prompt_rows)
        total = base + len(items)
    while len(v.starts) < len(files):
        v.starts.append(total)
    if not total:
        raise DataError(f"the input ({', '.join(str(f) for f, _ in files)}) holds no records")
    v.stats["records"] = total
    if cfg.exact_duplicates.enabled:
        first = _first_of_each(np.concatenate(keys))
        for gid in np.flatnonzero(first != np.arange(total)).tolist():
            v.removed[gid] = ("exact-duplicate", int(first[gid]))
    for gid, reason in reasons.items():
        v.removed.setdefault(gid, (reason, None))
    alive = np.ones(total, dtype=bool)
    alive[list(v.removed)] = False
    for index in (v.texts_index, v.prompt_index):
        if index is not None:
            index.keep(alive)
    if prompt_ids:
        v.prompt_groups = _repeated(np.concatenate(prompt_keys), np.concatenate(prompt_ids), alive)
    return v


def _first_of_each(keys: np.ndarray) -> np.ndarray:
    """For each row of (n, 2) digests, the position of the first row equal to it."""
    n = len(keys)
    order = np.lexsort((np.arange(n), keys[:, 1], keys[:, 0]))
    k = keys[order]
    starts = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]).any(axis=1)])
    first = np.empty(n, dtype=np.int64)
    first[order] = np.repeat(order[starts], np.diff(np.r_[starts, n]))
    return first


def _repeated(keys: np.ndarray, ids: np.ndarray, alive: np.ndarray) -> list[list[int]]:
    """Groups (of two or more alive records) that share a normalized prompt."""
    keep = alive[ids]
    keys, ids = keys[keep], ids[keep]
    order = np.lexsort((ids, keys[:, 1], keys[:, 0]))
    k, ids = keys[order], ids[order]
    starts = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]).any(axis=1)])
    ends = np.r_[starts[1:], len(k)]
    return [ids[s:e].tolist() for s, e in zip(starts.tolist(), ends.tolist()) if e - s > 1]


def _eval_ngrams(cfg) -> set[str]:
    grams: set[str] = set()
    for f in cfg.eval_files:
        for path, _ in input_files([f]):
            for _, rec in read_records(path):
                grams |= text_ops.shingles(text_ops.words(rec.text), cfg.ngram)
    return grams


def _records(files, v: Verdicts, wanted: set[int], progress: bool, desc: str):
    """(gid, record) for the `wanted` records only; the others are framed but not parsed."""
    by_file: dict[int, set[int]] = {}
    for g in wanted:  # one pass over the wanted ids, not one per file
        fileno, index = v.place(g)
        by_file.setdefault(fileno, set()).add(index)
    for fileno, (path, _) in enumerate(files):
        local = by_file.get(fileno)
        if not local:
            continue
        base = v.starts[fileno]
        for index, rec in tqdm(read_records(path, local), desc=f"{desc} {path.name}", unit=" rec",
                               disable=not progress, leave=False):
            if rec is not None:
                yield base + index, rec


def _count(v: Verdicts, fileno: int) -> int:
    end = v.starts[fileno + 1] if fileno + 1 < len(v.starts) else v.stats["records"]
    return end - v.starts[fileno]


def _second_pass(files, cfg: CleanConfig, v: Verdicts, progress: bool) -> None:
    near = cfg.near_duplicates
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    ta, tb = v.texts_index.pairs() if v.texts_index is not None else none
    pa, pb = v.prompt_index.pairs() if v.prompt_index is not None else none
    v.stats["near_candidates"] = len(ta)
    wanted_text = set(np.r_[ta, tb].tolist())
    groups = v.prompt_groups
    wanted_prompt = set(np.r_[pa, pb].tolist()) | {g for grp in groups for g in grp}
    tokens, prompted, chat = near_ops.TokenSets(), {}, False
    if wanted_text or wanted_prompt:
        for gid, rec in _records(files, v, wanted_text | wanted_prompt, progress, "verifying"):
            if gid in wanted_text:
                tokens.add(gid, text_ops.shingles(text_ops.words(rec.text), near.ngram, near.drop_stopwords))
                chat = chat or rec.answer is not None
            if gid in wanted_prompt:
                prompted[gid] = (text_ops.shingles(text_ops.words(rec.prompt), 2),
                                 conflict_ops.answer_signature(rec.answer))
    tokens.freeze()
    hit = tokens.similarity(tokens.rows(ta), tokens.rows(tb), near.measure) >= near.threshold
    ha, hb = ta[hit], tb[hit]
    answers = {}
    if chat and len(ha):  # only the pairs that cleared the threshold need their answers compared
        for gid, rec in _records(files, v, set(np.r_[ha, hb].tolist()), progress, "comparing answers"):
            if rec.answer is not None:
                answers[gid] = conflict_ops.answer_signature(rec.answer)
    _decide_near(ha.tolist(), hb.tolist(), answers, v)
    if cfg.semantic_duplicates.enabled:
        _semantic(files, cfg, v, progress)
    if cfg.conflicts.enabled:
        _decide_conflicts(groups, zip(pa.tolist(), pb.tolist()), prompted, cfg.conflicts, v)


def _semantic(files, cfg: CleanConfig, v: Verdicts, progress: bool) -> None:
    from leanlm.clean.semantic import similar_records

    alive = set(range(v.stats["records"])) - set(v.removed)
    sa, sb, _ = similar_records(_records(files, v, alive, progress, "reading"), cfg.semantic_duplicates,
                                len(alive), progress)
    v.stats["semantic_pairs"] = len(sa)
    answers = {}
    for gid, rec in _records(files, v, set(np.r_[sa, sb].tolist()), progress, "comparing answers"):
        if rec.answer is not None:
            answers[gid] = conflict_ops.answer_signature(rec.answer)
    _decide_near(sa.tolist(), sb.tolist(), answers, v, "semantic-duplicate")


def _decide_near(earlier: list[int], later: list[int], answers: dict, v: Verdicts,
                 reason: str = "near-duplicate") -> None:
    """The pairs that cleared the threshold, sorted by later then earlier record; greedy in input order: a
    record goes as a copy of the first earlier record that stays, so a chain of small edits never removes a
    record for resembling something already removed. Two examples whose answers disagree are never
    near-duplicates, however alike their words ("is" / "is not"): they are left to the conflict stage."""
    verified = 0
    kin: dict[int, list[int]] = {}  # a kept record -> the records removed as its copies, with answers
    for a, b in zip(earlier, later):
        if b in v.removed or a in v.removed:
            continue
        if b in answers and any(g in answers and not conflict_ops.agree(answers[g], answers[b])
                                for g in (a, *kin.get(a, ()))):
            continue  # a cut-short copy agrees with both sides: b must agree with all of a's copies
        v.removed[b] = (reason, a)
        kin.setdefault(a, []).append(b)
        verified += 1
    v.stats[f"{reason.split('-')[0]}_verified"] = verified


def _decide_conflicts(groups, pairs, prompted, cfg, v: Verdicts) -> None:
    parent: dict[int, int] = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    for grp in groups:
        for g in grp[1:]:
            union(grp[0], g)
    for a, b in pairs:
        if text_ops.jaccard(prompted[a][0], prompted[b][0]) >= cfg.prompt_similarity:
            union(a, b)
    # near- and semantic duplicates removed by now still vote (their answers may be what shows a contradiction); records
    # removed for their quality or contamination do not
    members: dict[int, list[int]] = {}
    for g in prompted:
        if v.removed.get(g, ("near-duplicate",))[0] in ("near-duplicate", "semantic-duplicate"):
            members.setdefault(find(g), []).append(g)
    found = 0
    votes = _duplicate_votes(v)
    for grp in members.values():
        grp.sort()
        clusters = conflict_ops.answer_clusters([prompted[g][1] for g in grp])
        if len(clusters) < 2:
            continue
        found += _resolve(grp, clusters, [sum(votes.get(grp[i], 1) for i in c) for c in clusters], cfg.policy, v)
    v.stats["conflict_groups"] = found


def _duplicate_votes(v: Verdicts) -> dict[int, int]:
    """1 + the number of exact duplicates each record stood for: that stage runs first, and a fact stated five
    times must outvote one contradiction even after its copies are gone."""
    votes: dict[int, int] = {}
    for reason, of in v.removed.values():
        if of is None or reason != "exact-duplicate":  # near-duplicates are group members themselves
            continue
        while of in v.removed and v.removed[of][1] is not None and v.removed[of][0] != "conflict":
            of = v.removed[of][1]  # a copy of a copy votes for the record that stayed
        votes[of] = votes.get(of, 1) + 1
    return votes


def _resolve(grp: list[int], clusters: list[list[int]], weights: list[int], policy: str, v: Verdicts) -> bool:
    """Apply the policy to the group's records that are still kept (its near-duplicates are already gone);
    False when nothing kept takes part in the contradiction."""
    kept = [[grp[i] for i in c if grp[i] not in v.removed] for c in clusters]
    if sum(bool(k) for k in kept) < 2 and (policy == "flag" or not any(kept)):
        return False  # the contradiction is only among copies already removed: nothing kept disagrees
    sizes = sorted(weights, reverse=True)
    if policy == "flag":
        v.flagged.append([g for k in kept for g in k])
        return True
    if policy == "majority" and sizes[0] > sizes[1]:
        win = weights.index(sizes[0])
        of = kept[win][0] if kept[win] else v.removed[grp[clusters[win][0]]][1]
        for c, k in enumerate(kept):
            if c != win:
                for g in k:
                    v.removed[g] = ("conflict", of)
        return True
    for k in kept:  # `drop`, or a majority tie: no answer can be trusted over another
        for g in k:
            v.removed[g] = ("conflict", None)
    return True


def _write(files, cfg: CleanConfig, v: Verdicts, pool: Workers, tmp: Path, progress: bool) -> dict:
    writers = {n: Writer(tmp / rel, path) for n, (path, rel) in enumerate(files)}
    counts: dict[str, int] = {}
    examples: dict[str, list] = {}
    pii_kinds: dict[str, int] = {}
    kept = 0
    with open(tmp / "removed.jsonl", "w", encoding="utf-8") as removed:
        for (fileno, base, items), results in pool.map(_write_batch if cfg.pii.enabled else _raw_batch,
                                                       _batches(files, progress, "writing", _removed_of(v))):
            source = str(files[fileno][0])
            for (index, _, payload), (raw, changed, found) in zip(items, results):
                gid = v.starts[fileno] + index
                verdict = v.removed.get(gid)
                if verdict is None:
                    kept += 1
                    if changed is not None:
                        writers[fileno].write(changed)
                    else:  # unchanged: a JSONL line goes back byte for byte
                        writers[fileno].write(payload, payload if files[fileno][0].suffix == ".jsonl" else None)
                    if not found:
                        continue
                    verdict = ("pii-redacted", None)
                    for kind, n in found.items():
                        pii_kinds[kind] = pii_kinds.get(kind, 0) + n
                reason, of = verdict
                counts[reason] = counts.get(reason, 0) + 1
                row = {"source": source, "index": index, "reason": reason,
                       "of": None if of is None else v.place(of)[1], "record": raw}
                if of is not None and v.place(of)[0] != fileno:
                    row["of_source"] = str(files[v.place(of)[0]][0])
                removed.write(json.dumps(row, ensure_ascii=False) + "\n")
                if len(examples.setdefault(reason, [])) < 3:
                    examples[reason].append(row)
    for w in writers.values():
        w.close()
    flagged = [[{"source": str(files[v.place(g)[0]][0]), "index": v.place(g)[1]} for g in grp] for grp in v.flagged]
    if flagged:
        (tmp / "conflicts.jsonl").write_text("".join(json.dumps(g) + "\n" for g in flagged))
    return {"inputs": [str(p) for p, _ in files], "records": v.stats["records"], "kept": kept, "counts": counts,
            "pii": pii_kinds, "flagged_conflict_groups": len(flagged), "stats": v.stats, "examples": examples}


def _removed_of(v: Verdicts):
    """The extra argument of a write batch: the indices (in its file) of the batch's removed records."""
    def extra(gid: int, items: list) -> tuple:
        return ({index for pos, (index, _, _) in enumerate(items) if gid + pos in v.removed},)
    return extra


def _write_batch(suffix, source, items, removed):
    return redact(suffix, source, items, removed)


def _raw_batch(suffix, source, items, removed):
    """The write pass without PII redaction: only removed records are parsed (removed.jsonl holds them)."""
    return [(to_record(suffix, source, i, where, payload).raw if i in removed else None, None, {})
            for i, where, payload in items]
