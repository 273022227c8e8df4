"""MinHash LSH over word shingles, as arrays: signatures from rensa (Rust), band hashes kept in one growing
uint64 matrix and bucketed by sorting, so a million records cost a few hundred bytes each and no Python
object per bucket entry."""

from __future__ import annotations

from array import array

import numpy as np

_WINDOW = 16      # in a bucket, each record is paired with this many records before it
_PER_RECORD = 8   # earlier partners checked per record, those sharing the most bands first


def band_hashes(shingle_sets: list[set[str]], num_perm: int, bands: int, seed: int) -> np.ndarray:
    """(len(shingle_sets), bands) uint64: one hash per LSH band of each set's MinHash signature."""
    try:
        import rensa
    except ImportError as err:
        raise ImportError("near-duplicate and conflict detection need rensa: pip install 'leanlm[clean]' "
                          "(or disable near_duplicates and conflicts in the clean config)") from err

    if not shingle_sets:
        return np.zeros((0, bands), dtype=np.uint64)
    digests = rensa.RMinHash.digest_matrix_from_token_sets([sorted(s) for s in shingle_sets], num_perm, seed)
    sig = np.array(digests.to_rows(), dtype=np.uint64)
    rows = num_perm // bands
    # a polynomial over the band's rows, wrapping mod 2^64 on purpose
    mult = (np.uint64(0x9E3779B97F4A7C15) ** np.arange(rows, dtype=np.uint64)).astype(np.uint64)
    with np.errstate(over="ignore"):
        return (sig.reshape(len(sig), bands, rows) * mult).sum(axis=2, dtype=np.uint64)


class BandIndex:
    """Band hashes of many records, kept as per-batch arrays; `pairs()` gives the (earlier, later) ids that share
    a band, one band at a time, so its working memory is a column, not the whole matrix."""

    def __init__(self, bands: int):
        self.bands = bands
        self.ids: list[np.ndarray] = []
        self.chunks: list[np.ndarray] = []

    def extend(self, ids: np.ndarray, hashes: np.ndarray) -> None:
        if len(ids):
            self.ids.append(np.asarray(ids, dtype=np.int64))
            self.chunks.append(hashes)

    def keep(self, alive: np.ndarray) -> None:
        """Drop the rows of records whose id is False in `alive` (removed by an earlier stage)."""
        masks = [alive[i] for i in self.ids]
        self.ids = [i[m] for i, m in zip(self.ids, masks)]
        self.chunks = [c[m] for c, m in zip(self.chunks, masks)]

    def __len__(self) -> int:
        return sum(len(i) for i in self.ids)

    def pairs(self, window: int = _WINDOW, per_record: int = _PER_RECORD) -> tuple[np.ndarray, np.ndarray]:
        """Candidate (earlier, later) id arrays, sorted by later then earlier id. Within a bucket each record
        is paired with the `window` records before it, and each record keeps the `per_record` earlier partners
        it shares the most bands with: a bucket of a thousand look-alikes costs thousands of pairs, not
        half a million, and the partner most likely to be a copy is checked first."""
        if not len(self):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids = np.concatenate(self.ids)
        found = []
        for band in range(self.bands):
            col = np.concatenate([c[:, band] for c in self.chunks])
            order = np.lexsort((ids, col))
            col, members = col[order], ids[order]
            for d in range(1, min(window, len(col) - 1) + 1):
                same = np.flatnonzero(col[d:] == col[:-d])
                if not len(same):
                    break  # no bucket holds more than d records
                found.append((members[same + d] << 32) | members[same])
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        keys, counts = np.unique(np.concatenate(found), return_counts=True)
        later, earlier = keys >> 32, keys & 0xFFFFFFFF
        order = np.lexsort((-counts, later))
        later, earlier = later[order], earlier[order]
        starts = np.flatnonzero(np.r_[True, later[1:] != later[:-1]])
        rank = np.arange(len(later)) - np.repeat(starts, np.diff(np.r_[starts, len(later)]))
        keep = rank < per_record
        later, earlier = later[keep], earlier[keep]
        order = np.lexsort((earlier, later))
        return earlier[order], later[order]


class TokenSets:
    """Each record's set of shingles as sorted 64-bit hashes in one flat array (CSR), for exact similarity of
    many pairs at once. Hashes come from Python's `hash`, salted per process: these sets live and die inside
    one process, so that is safe, and it is the fastest hash of a str there is."""

    def __init__(self):
        self._ids, self._lens, self._flat = array("q"), array("q"), array("q")

    def add(self, ident: int, shingles: set[str]) -> None:
        hashes = sorted({hash(s) for s in shingles})
        self._ids.append(ident)
        self._lens.append(len(hashes))
        self._flat.extend(hashes)

    def freeze(self) -> None:
        self.ids = np.frombuffer(self._ids, dtype=np.int64)
        lens = np.frombuffer(self._lens, dtype=np.int64)
        self.lens, self.offsets = lens, np.r_[0, np.cumsum(lens)[:-1]].astype(np.int64)
        self.flat = np.frombuffer(self._flat, dtype=np.int64)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, ids)

    def similarity(self, a: np.ndarray, b: np.ndarray, measure: str, chunk: int = 65536) -> np.ndarray:
        """Exact Jaccard (or containment) of the sets at rows a[i] and b[i], vectorized: the tokens of both sides
        tagged by pair, sorted, and counted where a (pair, token) occurs twice."""
        out = np.empty(len(a), dtype=np.float64)
        for s in range(0, len(a), chunk):
            ra, rb = a[s:s + chunk], b[s:s + chunk]
            la, lb = self.lens[ra], self.lens[rb]
            pair = np.r_[np.repeat(np.arange(len(ra)), la), np.repeat(np.arange(len(rb)), lb)]
            tokens = np.r_[self.flat[_ragged(self.offsets[ra], la)], self.flat[_ragged(self.offsets[rb], lb)]]
            order = np.lexsort((tokens, pair))
            pair, tokens = pair[order], tokens[order]
            twice = np.flatnonzero((pair[1:] == pair[:-1]) & (tokens[1:] == tokens[:-1]))
            inter = np.bincount(pair[twice], minlength=len(ra)).astype(np.float64)
            denom = np.minimum(la, lb) if measure == "containment" else la + lb - inter
            with np.errstate(invalid="ignore", divide="ignore"):
                out[s:s + chunk] = np.where(denom > 0, inter / np.maximum(denom, 1), 1.0)
        return out


def _ragged(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Indices starts[0]..starts[0]+lens[0]-1, starts[1].., concatenated."""
    total = int(lens.sum())
    steps = np.ones(total, dtype=np.int64)
    heads = np.r_[0, np.cumsum(lens)[:-1]]
    nonempty = lens > 0
    steps[heads[nonempty]] = starts[nonempty] - np.r_[0, (starts + lens - 1)[nonempty][:-1]]
    if total:
        steps[0] = starts[nonempty][0]
    return np.cumsum(steps)


def similarity(a: set[str], b: set[str], measure: str) -> float:
    if not a or not b:
        return 1.0 if a == b else 0.0
    inter = len(a & b)
    if measure == "containment":
        return inter / min(len(a), len(b))
    return inter / (len(a) + len(b) - inter)
