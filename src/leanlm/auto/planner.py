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
points take turns, so refining a near miss does not wait for every neighbour of the best.
"""

from __future__ import annotations

import math
from collections import deque

from leanlm.auto.budget import OBJECTIVES, better
from leanlm.auto.moves import neighbors, params_of, resolve
from leanlm.auto.space import canonical

INCUMBENTS = 3  # the best candidates whose neighbours are tried, best first
TIE = 0.05  # objectives this close (relative) are the same to a quick in-process estimate
# a near miss is over its bound by at most this many times the bound (KLD <= 0.55 for kld<=0.05): a miss
# far beyond is no starting point; among those within, the smallest miss is taken
NEAR = 10.0


class Planner:
    def __init__(self, space, objective: str):
        self.space, self.objective = space, objective
        self.seeds = deque(space.seeds())
        self.issued: set[str] = set()
        self._params: dict[int, dict | None] = {}
        self._turn = 0  # which starting point's neighbours come first next time (they take turns)

    def next(self, results: list[dict], seen: dict) -> tuple[dict, str] | None:
        """(Optuna parameters, where they came from) for the next trial, or None: let the sampler propose."""
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
            number = best["number"]
            if number not in self._params:  # a recipe the space cannot express has no neighbours here
                self._params[number] = params_of(self.space, best["steps"], best.get("export") or {})
            params = self._params[number]
            if params is None:
                continue
            for moved, key, words in neighbors(self.space, params):
                if key not in seen and key not in self.issued:
                    self.issued.add(key)
                    over = " (over budget)" if best.get("violation", 0) > 0 else ""
                    return moved, f"move from #{number} ({best['name']}){over}: {words}"
        return None
