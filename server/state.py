"""What the coordinator must remember between rounds, as one object saved with each change.

A run stopped at any point (crash, Ctrl-C, a coordinator moved to another machine) resumes
from `coordinator-state.json` alone, with the adapter and strategy state of its
`completed_round`: nothing is reconstructed by replaying metrics.jsonl. The state keeps:

- `completed_round`: the last round whose global adapter (and strategy state) is saved; a
  resumed run starts at the next one. `fedtune rollback` moves it back.
- `attempts`: the highest attempt started per round, so a retried or resumed round always
  uses a new attempt (hospitals refuse to key one attempt twice).
- `releases`: every round whose sum the coordinator computed, with how many hospitals were
  sampled and connected: the client-level accountant composes them. Never rolled back: a
  release happened even if its round was undone.
- `guarantees`: each hospital's latest reported (ε, δ, budget); `lineage`: each hospital's
  latest data and model fingerprints; `validation`: the weighted validation metrics of each
  completed round (what picks the best round); `base_test`: the base model's test
  evaluation (weighted, per hospital, refusals), measured once at the first start.

It is saved atomically (a temporary file renamed into place) at every change the next
round depends on, so it never lags what hospitals were asked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

STATE_VERSION = 1


class StateError(ValueError):
    """The saved coordinator state cannot be used to continue the run."""


@dataclass(frozen=True)
class Release:
    """One round sum the coordinator computed (a mechanism for client-level privacy)."""

    server_round: int
    sampled: int
    connected: int


@dataclass
class CoordinatorState:
    """The coordinator's memory of a run; `state_dict()` is what is saved."""

    completed_round: int = 0
    attempts: dict[int, int] = field(default_factory=dict)
    releases: list[Release] = field(default_factory=list)
    guarantees: dict[str, dict[str, float]] = field(default_factory=dict)
    lineage: dict[str, dict[str, Any]] = field(default_factory=dict)
    validation: dict[int, dict[str, float]] = field(default_factory=dict)
    base_test: dict[str, Any] = field(default_factory=dict)

    def next_attempt(self, server_round: int) -> int:
        """Start a new attempt at a round: the number it gets (1 for a first try)."""
        attempt = self.attempts.get(server_round, 0) + 1
        self.attempts[server_round] = attempt
        return attempt

    def released(self, server_round: int, sampled: int, connected: int) -> None:
        self.releases.append(Release(server_round, sampled, connected))

    @property
    def participation(self) -> list[int]:
        """Hospitals sampled per release (for `client_level_guarantee`)."""
        return [r.sampled for r in self.releases]

    @property
    def connected(self) -> list[int]:
        return [r.connected for r in self.releases]

    def completed(
        self, server_round: int, validation: dict[str, float],
        lineage: dict[str, dict[str, Any]],
    ) -> None:
        """A round's adapter and strategy state are saved: it is the new resume point."""
        self.completed_round = server_round
        if validation:  # with evaluation.with_training it arrives later (`validation[r] = …`)
            self.validation[server_round] = dict(validation)
        self.lineage.update(copy.deepcopy(lineage))

    def rolled_back(self, to_round: int) -> None:
        """`fedtune rollback`: continue from `to_round`; later validation is forgotten (its
        adapters were moved aside), releases and attempts are kept (they happened)."""
        self.completed_round = to_round
        self.validation = {r: v for r, v in self.validation.items() if r <= to_round}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able; round numbers as strings (JSON object keys)."""
        return {
            "version": STATE_VERSION,
            "completed_round": self.completed_round,
            "attempts": {str(r): a for r, a in sorted(self.attempts.items())},
            "releases": [[r.server_round, r.sampled, r.connected] for r in self.releases],
            "guarantees": copy.deepcopy(self.guarantees),
            "lineage": copy.deepcopy(self.lineage),
            "validation": {str(r): v for r, v in sorted(self.validation.items())},
            "base_test": copy.deepcopy(self.base_test),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; a state of another version or shape is refused."""
        if state.get("version") != STATE_VERSION:
            raise StateError(
                f"coordinator state version {state.get('version')!r} is not "
                f"{STATE_VERSION}, the one this fedtune writes; resume with the fedtune "
                "version that started the run"
            )
        try:
            self.completed_round = int(state["completed_round"])
            self.attempts = {int(r): int(a) for r, a in state["attempts"].items()}
            self.releases = [Release(int(r), int(s), int(c)) for r, s, c in state["releases"]]
            self.guarantees = {h: {k: float(v) for k, v in g.items()}
                               for h, g in state["guarantees"].items()}
            self.lineage = dict(state["lineage"])
            self.validation = {int(r): {k: float(v) for k, v in m.items()}
                               for r, m in state["validation"].items()}
            self.base_test = dict(state["base_test"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"the coordinator state is damaged: {exc!r}") from None
