"""The semantic tier's verifier as pure math: the features of a question pair, a logistic regression over
them, and the threshold that keeps false hits under a target.

Why features and not a head on the raw 384-d embeddings: a few hundred labelled pairs fit a handful of
weights without memorizing the questions, so the verifier carries to pairs it never saw. The features say
what the retrieval cosine cannot: how much of each question the other one covers (content words, and for
the words only one side has, how close their nearest counterpart on the other side is: "ibuprofen"
against "acetaminophen" is far, "reset" against "change" is near)."""

from __future__ import annotations

import numpy as np

FEATURES = ("cosine", "word_overlap", "unmatched_words", "unmatched_nearest_min", "unmatched_nearest_mean",
            "length_ratio", "align_a_min", "align_b_min", "align_mean", "align_min")
# the sign each weight may take: more similarity never lowers the score, more unmatched words never raise it.
# Without this, a few hundred pairs teach quirks of how they were written (entity swaps share most words,
# so "more overlap" learned a negative weight, and two identical questions scored below a paraphrase).
SIGNS = np.array([1, 1, -1, 1, 1, 1, 1, 1, 1, 1], dtype=np.float64)


def alignment(tokens_a: np.ndarray, tokens_b: np.ndarray) -> list[float]:
    """BERTScore-style: each content token's best match (cosine of contextual token embeddings) on the other
    side; the weakest matches say what one question has that the other lacks."""
    if len(tokens_a) == 0 or len(tokens_b) == 0:
        return [1.0, 1.0, 1.0, 1.0]
    sims = tokens_a @ tokens_b.T
    best_a, best_b = sims.max(1), sims.max(0)
    return [float(best_a.min()), float(best_b.min()), float(best_a.mean() + best_b.mean()) / 2,
            float(min(best_a.min(), best_b.min()))]


def pair_features(cos: float, words_a: list[str], words_b: list[str], nearest: dict[str, float],
                  aligned: list[float]) -> np.ndarray:
    """`nearest[w]`: for a word on one side only, its highest similarity to a content word of the other side;
    `aligned`: alignment() of the two questions' content tokens."""
    a, b = set(words_a), set(words_b)
    union = a | b
    overlap = len(a & b) / len(union) if union else 1.0
    only = sorted(a ^ b)
    near = [nearest.get(w, 0.0) for w in only]
    ratio = min(len(a), len(b)) / max(len(a), len(b), 1)
    return np.array([cos, overlap, float(len(only)), min(near, default=1.0), float(np.mean(near)) if near else 1.0,
                     ratio, *aligned], dtype=np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 3000,
                 signs: np.ndarray | None = None) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """(weights, bias, feature mean, feature scale): logistic regression on standardized features by projected
    gradient descent, each weight kept to its sign in `signs` (0 or None: free)."""
    mean, scale = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / scale
    w, b = np.zeros(z.shape[1]), 0.0
    lr = 1.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
        grad_w = z.T @ (p - y) / len(y) + l2 * w
        grad_b = float(np.mean(p - y))
        w, b = w - lr * grad_w, b - lr * grad_b
        if signs is not None:
            w = np.where(signs * w < 0, 0.0, w)
        if np.abs(grad_w).max() < 1e-6:
            break
    return w, b, mean, scale


def predict(x: np.ndarray, weights, bias: float, mean, scale) -> np.ndarray:
    z = (np.atleast_2d(x) - np.asarray(mean)) / np.asarray(scale)
    return 1.0 / (1.0 + np.exp(-(z @ np.asarray(weights) + bias)))


def pick_threshold(scores: np.ndarray, same: np.ndarray, passed: np.ndarray, max_false_hits: float) -> dict:
    """The lowest threshold whose false-hit rate (different pairs that pass the guards and score above it,
    over all different pairs) is within `max_false_hits`; with the hit rate there."""
    different = max(1, int((~same).sum()))
    best = None
    for t in sorted(set(np.round(scores, 6))) + [1.0 + 1e-9]:
        hit = passed & (scores >= t)
        false_rate = (hit & ~same).sum() / different
        if false_rate <= max_false_hits:
            best = {"threshold": float(t), "false_hit_rate": float(false_rate),
                    "hit_rate": float((hit & same).sum() / max(1, int(same.sum())))}
            break
    return best
