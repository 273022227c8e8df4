"""The semantic-duplicate stage: records that say the same thing in other words (a paraphrase, a reordered
or shortened copy) which word-level MinHash cannot see. Each record still kept after the exact and
near-duplicate stages is embedded with all-MiniLM-L6-v2; semantic_ops finds the pairs whose cosine clears
the threshold. Embeddings are kept as float16, 768 bytes a record."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from tqdm import tqdm

from leanlm.clean import semantic_ops, text_ops
from leanlm.clean.records import Record
from leanlm.models.embedding import load_sentence_model

_CHUNK = 1024  # records embedded per call: enough to keep the model busy, little text held at once


def similar_records(records: Iterable[tuple[int, Record]], cfg, total: int, progress: bool) -> tuple:
    """(earlier gids, later gids, cosines) of the pairs of `records` (in gid order) that are semantic
    duplicates at `cfg.threshold`; records shorter than `cfg.min_words` are not embedded."""
    model = load_sentence_model("the semantic-duplicate stage of leanlm data clean", "embed")
    ids, parts, texts, batch_ids = [], [], [], []

    def flush():
        if texts:
            vectors = model.encode(texts, batch_size=cfg.batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
            parts.append(vectors.astype(np.float16))
            ids.extend(batch_ids)
            texts.clear()
            batch_ids.clear()
            bar.update(len(vectors))

    with tqdm(total=total, desc="embedding", unit=" rec", disable=not progress, leave=False) as bar:
        for gid, rec in records:
            if len(text_ops.words(rec.text)) < cfg.min_words:
                bar.update(1)
                continue
            texts.append(rec.text)
            batch_ids.append(gid)
            if len(texts) == _CHUNK:
                flush()
        flush()
    if not ids:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    gids = np.asarray(ids, dtype=np.int64)
    earlier, later, cos = semantic_ops.similar_pairs(np.concatenate(parts), cfg.threshold, cfg.cluster_size, cfg.seed)
    return gids[earlier], gids[later], cos
