"""Adapter updates on the wire: each client sends the change to the global adapter (its delta), as float32,
as int8 with one scale per row or column (whichever is longer: a LoRA B matrix is tall and thin, and a
scale per 16-entry row would cost a fifth of the bytes), or as its top-k entries by magnitude with error feedback (what a round
leaves unsent is added to the next round's delta, so nothing is lost for good, only delayed). Pure array
math on numpy: Flower carries numpy arrays."""

from __future__ import annotations

import numpy as np

SUFFIXES = {"none": ("",), "int8": (".q", ".scale"), "topk": (".index", ".value")}


def encode(delta: dict[str, np.ndarray], how: str, topk: float = 0.1,
           residual: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the arrays to send, the new residual). `residual` (top-k's error feedback) is added before selecting."""
    out, left = {}, {}
    for name, d in delta.items():
        d = d.astype(np.float32)
        if how == "none":
            out[name] = d
        elif how == "int8":
            rows = _scaled_rows(d, d.shape)
            scale = np.abs(rows).max(axis=1, keepdims=True) / 127.0
            scale[scale == 0] = 1.0
            q = np.clip(np.rint(rows / scale), -127, 127).astype(np.int8)
            out[name + ".q"] = _unscaled_rows(q, d.shape)
            out[name + ".scale"] = scale.astype(np.float32).ravel()
        elif how == "topk":
            full = d + residual[name] if residual and name in residual else d
            flat = full.ravel()
            k = max(1, int(round(topk * flat.size)))
            index = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:].astype(np.int32)
            value = flat[index].astype(np.float16)
            sent = np.zeros_like(flat)
            sent[index] = value.astype(np.float32)
            left[name] = (flat - sent).reshape(d.shape)
            out[name + ".index"], out[name + ".value"] = np.sort(index), value[np.argsort(index)]
        else:
            raise ValueError(f"unknown compression {how!r}")
    return out, left


def decode(arrays: dict[str, np.ndarray], how: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The float32 deltas a client sent, checked against the global adapter's `shapes`: a missing, extra or
    misshapen tensor, or one that is not finite, raises ValueError naming it."""
    expected = {name + s for name in shapes for s in SUFFIXES[how]}
    if set(arrays) != expected:
        odd = sorted(set(arrays) ^ expected)
        raise ValueError(f"the update's tensors do not match the adapter's: {', '.join(odd[:4])}")
    out = {}
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        if how == "none":
            d = arrays[name]
            if tuple(d.shape) != tuple(shape):
                raise ValueError(f"{name} has shape {tuple(d.shape)}, the adapter's is {tuple(shape)}")
        elif how == "int8":
            q, scale = arrays[name + ".q"], arrays[name + ".scale"]
            rows = _scaled_rows(np.empty(shape, np.int8), shape).shape[0]
            if tuple(q.shape) != tuple(shape) or scale.shape != (rows,) or q.dtype != np.int8:
                raise ValueError(f"{name}: int8 update of shape {tuple(q.shape)} with {scale.size} scales does not "
                                 f"fit the adapter's {tuple(shape)}")
            d = _unscaled_rows(_scaled_rows(q, shape).astype(np.float32) * scale[:, None], shape)
        else:
            index, value = arrays[name + ".index"], arrays[name + ".value"]
            if index.shape != value.shape or index.ndim != 1 or (index.size and (index.min() < 0 or index.max() >= size)):
                raise ValueError(f"{name}: top-k update with indices outside the adapter's {size} entries")
            d = np.zeros(size, dtype=np.float32)
            d[index] = value.astype(np.float32)
            d = d.reshape(shape)
        if not np.isfinite(d).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        out[name] = d.astype(np.float32)
    return out


def _scaled_rows(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`a` as the 2-D array whose rows share one int8 scale: the rows of a wide matrix, the columns of a tall
    one, the whole of a vector."""
    if len(shape) < 2:
        return a.reshape(1, -1)
    wide = a.reshape(shape[0], -1)
    return wide if wide.shape[0] <= wide.shape[1] else wide.T


def _unscaled_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) < 2:
        return rows.reshape(shape)
    tall = shape[0] > int(np.prod(shape[1:]))
    return np.ascontiguousarray(rows.T if tall else rows).reshape(shape)


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


def weighted_mean(deltas: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    total = float(sum(weights))
    return {name: sum(w / total * d[name] for d, w in zip(deltas, weights)) for name in deltas[0]}


class ServerAdam:
    """FedAdam (Reddi et al., Adaptive Federated Optimization): the mean client delta is a pseudo-gradient
    that a server-side Adam (no bias correction, `tau` in the denominator) applies to the global adapter."""

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, mean_delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name, d in mean_delta.items():
            self.m[name] = self.beta1 * self.m.get(name, np.zeros_like(d)) + (1 - self.beta1) * d
            self.v[name] = self.beta2 * self.v.get(name, np.zeros_like(d)) + (1 - self.beta2) * d * d
            out[name] = self.lr * self.m[name] / (np.sqrt(self.v[name]) + self.tau)
        return out
