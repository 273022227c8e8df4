"""Budgets and objectives: what a searched model must keep (constraints on what `leanlm eval` measures)
and what the search makes as good as it can (a speed, a size or a cost measured on the chosen runtime).

    kld<=0.05   top1>=0.9   ppl_increase<=5%   perplexity<=11   task_acc>=0.45
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from leanlm.errors import ConfigError

# budget metric -> (what it reads from a quality dict, and what it means)
METRICS = {
    "kld": "mean KL divergence from the original model's next-token distributions",
    "top1": "share of positions where the top token matches the original's",
    "ppl_increase": "perplexity increase over the original, as a fraction (5% = 0.05)",
    "perplexity": "perplexity on the evaluation text",
    "task_acc": "accuracy on the --tasks file (multiple choice)",
}
GRAMMAR = ("a budget is METRIC OP NUMBER[%]: METRIC one of " + ", ".join(METRICS) +
           "; OP one of <=, >=, <, >; e.g. kld<=0.05, top1>=0.9, ppl_increase<=5%, task_acc>=0.45")
_PATTERN = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>|=<|=>)\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(%?)\s*$")

# objective -> (direction, the speed/size key it reads, unit for reports)
OBJECTIVES = {
    "decode_tps": ("maximize", "decode_tps", "tokens/s"),
    "prefill_tps": ("maximize", "prefill_tps", "tokens/s"),
    "size": ("minimize", "disk_bytes", "MiB"),
    "peak_mem": ("minimize", "peak_mem_bytes", "MiB"),
    "cost": ("minimize", "decode_tps_batch", "$ per 1M tokens"),
}


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str
    value: float
    text: str

    @property
    def upper(self) -> bool:
        return self.op in ("<=", "<")

    def read(self, quality: dict, baseline: dict) -> float | None:
        """The metric's value in a quality dict, or None when it was not measured."""
        if self.metric == "ppl_increase":
            ppl, base = quality.get("perplexity"), baseline.get("perplexity")
            return None if ppl is None or not base else ppl / base - 1
        key = {"task_acc": "task_accuracy"}.get(self.metric, self.metric)
        return quality.get(key)

    def violation(self, quality: dict, baseline: dict) -> float:
        """How far the budget is missed (<= 0: met), in the metric's units; unmeasured counts as missed."""
        value = self.read(quality, baseline)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return math.inf
        return value - self.value if self.upper else self.value - value


def parse_budget(texts: list[str] | tuple[str, ...] | str) -> list[Constraint]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ConfigError(f"give at least one budget; {GRAMMAR}")
    out = []
    for text in texts:
        for part in str(text).split(","):
            out.append(_parse_one(part, text))
    metrics = [c.metric for c in out]
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"budget {', '.join(texts)}: each metric at most once")
    return out


def _parse_one(part: str, text: str) -> Constraint:
    match = _PATTERN.match(part.strip().lower())
    if not match:
        raise ConfigError(f"budget {text!r} does not parse; {GRAMMAR}")
    metric, op, number, percent = match.groups()
    op = {"=<": "<=", "=>": ">="}.get(op, op)
    if metric not in METRICS:
        raise ConfigError(f"budget {text!r}: unknown metric {metric!r}; {GRAMMAR}")
    value = float(number) / (100 if percent else 1)
    if percent and metric not in ("ppl_increase", "top1", "task_acc"):
        raise ConfigError(f"budget {text!r}: {metric} is not a share, so it takes no %")
    upper = op in ("<=", "<")
    if metric in ("top1", "task_acc") and upper or metric in ("kld", "ppl_increase", "perplexity") and not upper:
        better = "at least" if metric in ("top1", "task_acc") else "at most"
        raise ConfigError(f"budget {text!r}: a budget bounds how much quality may be lost, so {metric} is "
                          f"{better} a value (write {metric}{'>=' if better == 'at least' else '<='}{number}{percent})")
    return Constraint(metric, op, value, part.strip())


def check_objective(objective: str, price_per_hour: float | None) -> None:
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; objectives: {', '.join(OBJECTIVES)}")
    if objective == "cost" and (price_per_hour is None or price_per_hour <= 0):
        raise ConfigError("objective cost is $ per million generated tokens: give the machine's price with "
                          "--price-per-hour DOLLARS (e.g. 0.10)")


def objective_value(objective: str, speed: dict, price_per_hour: float | None = None) -> float | None:
    """The objective in its reported unit (larger is better for speeds, smaller for size and cost)."""
    _, key, _ = OBJECTIVES[objective]
    raw = speed.get(key)
    if raw is None:
        return None
    if objective in ("size", "peak_mem"):
        return raw / 2**20
    if objective == "cost":
        # a machine serving batches: its throughput is the batched decode rate
        return price_per_hour / 3600 / raw * 1e6 if raw > 0 else math.inf
    return raw


def better(objective: str, a: float, b: float) -> bool:
    return a > b if OBJECTIVES[objective][0] == "maximize" else a < b
