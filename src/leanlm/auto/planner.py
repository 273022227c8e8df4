"""What the search runs next besides Optuna's own proposals: each step type alone at its defaults (the seeds),
and moves one field or one stage away from the best candidates measured so far (a local search around the
incumbents, the reference recipes included). The moves are how a search improves on a shipped recipe that
is one change from better, say the int8 recipe with its LM head quantized too, which a sampler over a
space of thousands of combinations may never draw. Optuna's TPE proposes the rest, and learns from every
result, these included.

The search's time is shared evenly: a move runs whenever the moves so far have taken no longer than the
other trials (seeds, then the sampler's choices), so one slow seed (AWQ's scale search, say) buys as much
time for cheap moves around the incumbent, and the search both refines what works and keeps covering
every family.

Besides the best results within the budget, the result that missed it by least while beating them on the
objective is a starting point too (a mixed-precision candidate half a bit short, say), and the starting
points take turns, so refining a near miss does not wait for every neighbour of the best. Once a near miss
and a neighbour differing in one numeric field are both measured, the next trial (ahead of the turns and of the
time sharing: it is the one move a measured trend says may win) goes from it where the line
through their losses crosses the budget (log loss against the field: quantization noise falls about 4x per
bit), so a walk from 4.5 bits toward a KLD budget skips the grid points the trend already rules out.
"""

from __future__ import annotations

import math
from collections import deque

from leanlm.auto.budget import OBJECTIVES, Constraint, better
from leanlm.auto.moves import field_range, neighbors, params_of, resolve
from leanlm.auto.space import canonical
from leanlm.core.search import Span

INCUMBENTS = 3  # the best candidates whose neighbours are tried, best first
TIE = 0.05  # objectives this close (relative) are the same to a quick in-process estimate
# a near miss is over its bound by at most this many times the bound (KLD <= 0.55 for kld<=0.05): a miss
# far beyond is no starting point; among those within, the smallest miss is taken
NEAR = 10.0
AIM = 0.9  # an extrapolated move aims at this share of the bound's loss: the trend is an estimate


class Planner:
    def __init__(self, space, objective: str, budget: list[Constraint] | None = None):
        self.space, self.objective, self.budget = space, objective, list(budget or [])
        self.seeds = deque(space.seeds())
        self.issued: set[str] = set()
        self._params: dict[int, dict | None] = {}
        self._turn = 0  # which starting point's neighbours come first next time (they take turns)

    def next(self, results: list[dict], seen: dict) -> tuple[dict, str] | None:
        """(Optuna parameters, where they came from) for the next trial, or None: let the sampler propose."""
        trend = self._trend_move(results, seen)
        if trend is not None:  # the one move a measured trend says may meet the budget ahead of the best: no waiting
            return trend
        searched = [r for r in results if r.get("number", -1) >= 0]
        on_moves = sum(r.get("seconds") or 0.0 for r in searched if str(r.get("origin", "")).startswith("move"))
        if on_moves <= sum(r.get("seconds") or 0.0 for r in searched) - on_moves:
            move = self._move(results, seen)
            if move is not None:
                return move
        while self.seeds:
            params = self.seeds.popleft()
            resolved = resolve(self.space, params)
            if resolved is None:
                continue
            key = canonical(resolved[1], resolved[2])
            if key not in seen and key not in self.issued:
                self.issued.add(key)
                return resolved[0], "seed: one step type at its defaults"
        return None

    def incumbents(self, results: list[dict]) -> list[dict]:
        """The best results within the budget that were scored on every search window, best first; those
        within TIE of the best are as good as a quick estimate can tell, and the cheapest of them comes first
        (its neighbours cost least to try: a move keeps the incumbent's costly steps)."""
        ok = [r for r in results if r.get("status") == "ok" and r.get("objective") is not None]
        full = max((r["fidelity"] for r in ok), default=0)
        within = [r for r in ok if r["fidelity"] == full and r["violation"] <= 0]
        sign = 1 if OBJECTIVES[self.objective][0] == "maximize" else -1
        within.sort(key=lambda r: sign * r["objective"], reverse=True)
        if not within:
            return []
        top = within[0]["objective"]
        tied = [r for r in within if abs(r["objective"] - top) <= TIE * abs(top)]
        tied.sort(key=lambda r: r.get("seconds") or 0.0)
        return (tied + [r for r in within if r not in tied])[:INCUMBENTS]

    def near_miss(self, results: list[dict], best: dict | None) -> dict | None:
        """The result closest to the budget among those that missed it but beat the best within it on the
        objective: one move (more bits in the layers that matter, say) may bring it within, ahead of the best."""
        missed = [r for r in results if r.get("status") == "ok" and r.get("objective") is not None
                  and 0 < r.get("violation", math.inf) <= NEAR]
        if best is not None:
            missed = [r for r in missed if better(self.objective, r["objective"], best["objective"])]
        return min(missed, key=lambda r: r["violation"], default=None)

    def _move(self, results: list[dict], seen: dict) -> tuple[dict, str] | None:
        starts = self.incumbents(results)
        miss = self.near_miss(results, starts[0] if starts else None)
        if miss is not None:
            starts.insert(1, miss)
        # the starting points take turns, so a near miss is refined while the best's neighbours are still many
        turn = self._turn % max(1, len(starts))
        self._turn += 1
        for best in starts[turn:] + starts[:turn]:
            params = self._params_of(best)
            if params is None:
                continue
            for moved, key, words in neighbors(self.space, params):
                if key not in seen and key not in self.issued:
                    self.issued.add(key)
                    over = " (over budget)" if best.get("violation", 0) > 0 else ""
                    return moved, f"move from #{best['number']} ({best['name']}){over}: {words}"
        return None

    def _trend_move(self, results: list[dict], seen: dict) -> tuple[dict, str] | None:
        starts = self.incumbents(results)
        miss = self.near_miss(results, starts[0] if starts else None)
        if miss is None:
            return None
        for moved, key, words in self._extrapolated(miss, results):
            if key not in seen and key not in self.issued:
                self.issued.add(key)
                return moved, f"move from #{miss['number']} ({miss['name']}) (over budget): {words}"
        return None

    def _params_of(self, result: dict) -> dict | None:
        number = result["number"]
        if number not in self._params:  # a recipe the space cannot express has no neighbours here
            self._params[number] = params_of(self.space, result["steps"], result.get("export") or {})
        return self._params[number]

    def _extrapolated(self, miss: dict, results: list[dict]) -> list[tuple[dict, str, str]]:
        """Moves from a near miss to where the budget's worst-missed constraint is predicted to be met, one per
        numeric field in which a measured neighbour differs from it alone (the nearest such neighbour)."""
        params = self._params_of(miss)
        worst = max(self.budget, key=lambda c: c.violation(miss.get("quality") or {}, _base(miss)), default=None)
        loss = _loss(worst, miss) if worst is not None and params is not None else None
        if loss is None:
            return []
        partners: dict[str, dict] = {}
        for r in results:
            other = self._params_of(r) if r.get("status") == "ok" and r is not miss else None
            differ = [k for k in set(other or {}) | set(params) if (other or {}).get(k) != params.get(k)]
            # a trend runs along a numeric field: a neighbour differing in a choice (the head's skip) has none
            if other is None or len(differ) != 1 or _span(self.space, differ[0]) is None or _loss(worst, r) is None:
                continue
            name = differ[0]
            near = partners.get(name)
            if near is None or abs(other[name] - params[name]) < abs(self._params_of(near)[name] - params[name]):
                partners[name] = r
        out = []
        for name, partner in partners.items():
            rng = _span(self.space, name)
            x0, x1 = self._params_of(partner)[name], params[name]
            value = crossing(x0, _loss(worst, partner), x1, loss, AIM * _bound_loss(worst), rng)
            if value is None:
                continue
            resolved = resolve(self.space, {**params, name: value})
            if resolved is not None:
                out.append((resolved[0], canonical(resolved[1], resolved[2]),
                            f"{name}: {x1!r} -> {value!r} (where {worst.metric} is extrapolated to meet the budget, "
                            f"from #{partner['number']} at {x0!r})"))
        return out


def crossing(x0: float, loss0: float, x1: float, loss1: float, target: float, rng: Span) -> float | None:
    """Where the line through (x, log loss) at two points reaches log target, moved onto rng's grid on the side
    of smaller loss and into its ends; None when the points do not tell a direction or it lands on x1."""
    if x0 == x1 or loss0 == loss1 or target <= 0:
        return None
    slope = (math.log(loss1) - math.log(loss0)) / (x1 - x0)
    x = x1 + (math.log(target) - math.log(loss1)) / slope
    if rng.step:
        k = (x - rng.low) / rng.step
        # the loss falls toward larger x when the slope is negative: round up there, down otherwise
        k = math.ceil(k - 1e-9) if slope < 0 else math.floor(k + 1e-9)
        x = rng.low + k * rng.step
    x = min(max(x, rng.low), rng.high)
    x = int(round(x)) if rng.integer else round(x, 6)
    return None if x == x1 else x


def _span(space, name: str) -> Span | None:
    if name.startswith("stage.") or name.startswith("export."):
        return None
    rng = field_range(space, name)
    return rng if isinstance(rng, Span) else None


def _base(result: dict) -> dict:
    return {"perplexity": result.get("reference_perplexity")}


def _loss(constraint: Constraint, result: dict) -> float | None:
    """What the constraint bounds as a positive loss that falls as quality rises (a KLD, a perplexity
    increase, 1 - top-1), or None when unmeasured or not positive."""
    value = constraint.read(result.get("quality") or {}, _base(result))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    loss = value if constraint.upper else 1.0 - value
    return loss if loss > 0 else None


def _bound_loss(constraint: Constraint) -> float:
    return constraint.value if constraint.upper else 1.0 - constraint.value
