"""Semantic duplicates as SemDeDup finds them: k-means over normalized sentence embeddings, then every pair
inside a cluster whose cosine clears a threshold. All pairs of n records cost n^2 dot products; clusters of
about `cluster_size` cost n * cluster_size. A record near a cluster border may have its copy in the
neighbouring cluster, so each record is also compared within its second-nearest cluster."""

from __future__ import annotations

import numpy as np
import torch


def kmeans(emb: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine): (k, d) unit centroids. Seeds are k distinct records drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    centroids = emb[torch.randperm(len(emb), generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = nearest(emb, centroids, 1)[:, 0]
        sums = torch.zeros_like(centroids).index_add_(0, assign, emb)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        sums[empty] = centroids[empty]  # an empty cluster keeps its centroid rather than collapsing to zero
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def nearest(emb: torch.Tensor, centroids: torch.Tensor, top: int, block: int = 8192) -> torch.Tensor:
    """(n, top) indices of each row's most similar centroids, computed in blocks of rows."""
    top = min(top, len(centroids))
    return torch.cat([(emb[i:i + block] @ centroids.T).topk(top, dim=1).indices for i in range(0, len(emb), block)])


def similar_pairs(emb: np.ndarray, threshold: float, cluster_size: int = 1000, seed: int = 0,
                  block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(earlier, later, cosine) row positions of the pairs of `emb` (unit rows, any float dtype) whose cosine
    is at least `threshold`, each pair once, sorted by later then earlier."""
    n = len(emb)
    if n < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    k = max(1, round(n / cluster_size))
    if k == 1:
        members = [torch.arange(n)]
        home = torch.zeros((n, 1), dtype=torch.long)
    else:
        home = nearest(x, kmeans(x, k, seed=seed), 2)
        members = [torch.nonzero(home[:, 0] == c).flatten() for c in range(k)]
    found_a, found_b, found_s = [], [], []
    for c, rows in enumerate(members):
        if not len(rows):
            continue
        # everyone whose first or second choice is this cluster, compared with its own members
        pool = torch.nonzero((home == c).any(dim=1)).flatten()
        for i in range(0, len(rows), block):
            q = rows[i:i + block]
            sims = x[q] @ x[pool].T
            qi, pj = torch.nonzero(sims >= threshold, as_tuple=True)
            a, b = q[qi], pool[pj]
            keep = a != b
            found_a.append(a[keep])
            found_b.append(b[keep])
            found_s.append(sims[qi[keep], pj[keep]])
    a, b, s = (torch.cat(t).numpy() for t in (found_a, found_b, found_s))
    earlier, later = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((earlier, later))
    earlier, later, s = earlier[order], later[order], s[order]
    first = np.r_[True, (earlier[1:] != earlier[:-1]) | (later[1:] != later[:-1])]
    return earlier[first], later[first], s[first]
