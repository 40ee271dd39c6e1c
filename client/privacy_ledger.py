"""A hospital's privacy ledger: every DP-SGD step it ever took on its patients' data.

An (ε, δ) guarantee, per record or per patient (`unit`, fixed for the ledger's life), covers
*all* releases computed from the data, so it must compose
over every round of every run and survive node restarts. The ledger lives on the hospital's
disk, and ε is always recomputed from the full history with an Opacus accountant, never summed
(summing is loose and invites mixing accountants or δs); the stored ε is only for people.

The checksum catches hand edits and disk corruption; it is not a signature (anyone with write
access can recompute it). An untrustworthy file is refused, never reset: a fresh ledger would
forget the exposure already spent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedtune.core.privacy_accounting import (  # noqa: F401  (re-exported: the ledger's vocabulary)
    ACCOUNTANTS,
    History,
    PrivacyBudgetExhausted,
    calibrate_noise_multiplier,
    check_step_group,
    compute_epsilon,
    default_delta,
)

LEDGER_FORMAT = "fedtune-privacy-ledger/1"
# How the automatic δ was chosen when this ledger began. Ledgers written before the field
# existed used "below-1/n" (the largest power of ten strictly below 1/n); new ones use
# δ ≤ 1/(10·n). A ledger keeps its δ for life, so the rule is stored with it.
DELTA_RULE = "at-most-1/(10n)"
OLD_DELTA_RULE = "below-1/n"
# Float slack when comparing ε with a budget, so an exact-fit plan is not refused by rounding.
BUDGET_SLACK = 1e-9


class LedgerError(ValueError):
    """The ledger file cannot be trusted (corrupted, edited, another hospital's, unknown format).

    Never handled by resetting the ledger: that would erase the record of ε already spent.
    """


@dataclass(frozen=True)
class LedgerEntry:
    """One round of local DP training as recorded; `epsilon` is cumulative after it."""

    run_id: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    delta: float
    accountant: str
    recorded_at: str


@dataclass(frozen=True)
class RunPlan:
    """The σ chosen for a run up front, kept so a restarted node keeps the same σ."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    target_epsilon: float
    num_units: int = 0  # patients or records the plan was made for; 0 in older ledgers

    def __post_init__(self) -> None:
        check_step_group(self.noise_multiplier, self.sample_rate, self.steps_per_round)
        if self.planned_rounds < 1 or not self.target_epsilon > 0:
            raise ValueError("a run plan needs planned_rounds ≥ 1 and a positive target ε")


@dataclass
class PrivacyLedger:
    """The hospital's ledger file, loaded and verified; every change is saved atomically."""

    path: Path
    hospital: str
    accountant: str
    delta: float
    entries: list[LedgerEntry] = field(default_factory=list)
    plans: dict[str, RunPlan] = field(default_factory=dict)
    # What every step protected: "record" or "patient". Fixed for the ledger's life: a
    # record-level step says nothing exact about a patient with several records.
    unit: str = "record"
    delta_rule: str = DELTA_RULE

    @classmethod
    def open(
        cls, path: Path, hospital: str, accountant: str, delta: float, unit: str
    ) -> PrivacyLedger:
        """Load and verify `path` for this hospital/accountant/δ/unit; a missing file starts
        empty. `unit` has no default: it is what the hospital promises to protect."""
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown privacy accountant {accountant!r}; known: {ACCOUNTANTS}")
        path = Path(path)
        if not path.exists():
            return cls(path=path, hospital=hospital, accountant=accountant, delta=delta, unit=unit)
        ledger = read_ledger_file(path)
        if ledger.hospital != hospital:
            raise LedgerError(
                f"{path}: this ledger belongs to {ledger.hospital!r}, not {hospital!r}. "
                "Point this node at its own ledger file; do not delete or share ledgers."
            )
        # Re-stating ε under another δ or accountant would rewrite the hospital's history.
        for name, stored, wanted in (
            ("accountant", ledger.accountant, accountant),
            ("δ", ledger.delta, delta),
        ):
            if stored != wanted:
                raise LedgerError(
                    f"{path}: this ledger was kept with {name}={stored!r} but the node is now "
                    f"configured with {name}={wanted!r}. Changing it mid-life would re-state "
                    f"the ε already spent; set privacy {name} back to {stored!r}."
                )
        if ledger.unit != unit:
            raise LedgerError(
                f"{path}: this ledger protects each {ledger.unit}, but the run asks for "
                f"privacy.unit = {unit!r}. Its ε cannot be re-stated for another unit (a "
                f"record-level ε says nothing exact about a patient with several records). "
                f"Set privacy.unit = {ledger.unit!r}, or have the hospital's privacy officer "
                "start a new ledger file for the new unit and keep this one: what it records "
                "still applies on top (for patients, about k·ε for a patient with k records), "
                "so the new ledger's ε alone understates the total."
            )
        return ledger

    def history(self) -> list[tuple[float, float, int]]:
        """(σ, q, steps) of every recorded round, oldest first: the accountant's input."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon_spent(self) -> float:
        """ε over everything recorded so far, recomputed from the history."""
        return compute_epsilon(self.history(), self.delta, self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε the hospital would have spent after one more round with these settings."""
        upcoming = [*self.history(), (noise_multiplier, sample_rate, steps)]
        return compute_epsilon(upcoming, self.delta, self.accountant)

    def check_budget(
        self, budget: float, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """ε after the next round; raises PrivacyBudgetExhausted (before training) if > budget."""
        after = self.epsilon_after(noise_multiplier, sample_rate, steps)
        if after > budget + BUDGET_SLACK:
            raise PrivacyBudgetExhausted(self.epsilon_spent(), budget, after)
        return after

    def plan(self, run_id: str) -> RunPlan | None:
        """The σ plan stored for `run_id`, if this hospital already calibrated for it."""
        return self.plans.get(run_id)

    def set_plan(self, run_id: str, plan: RunPlan) -> None:
        """Store (and save) the plan so a restart reuses σ instead of recalibrating."""
        self._write({**self.plans, run_id: plan}, self.entries)

    def record(
        self,
        run_id: str,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> LedgerEntry:
        """Append one round and save. Call after training, before the update leaves the
        hospital: a crash in between can then only over-count exposure, never under-count."""
        epsilon = self.epsilon_after(noise_multiplier, sample_rate, steps)
        entry = LedgerEntry(
            run_id=str(run_id),
            server_round=int(server_round),
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            steps=int(steps),
            epsilon=epsilon,
            delta=self.delta,
            accountant=self.accountant,
            recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self._write(self.plans, [*self.entries, entry])
        return entry

    def save(self) -> None:
        """Write the ledger atomically (tmp file, fsync, rename) with mode 0600."""
        self._write(self.plans, self.entries)

    def _write(self, plans: dict[str, RunPlan], entries: list[LedgerEntry]) -> None:
        # State changes in memory only once the file is safely on disk.
        body = {
            "format": LEDGER_FORMAT,
            "hospital": self.hospital,
            "accountant": self.accountant,
            "delta": self.delta,
            "unit": self.unit,
            "delta_rule": self.delta_rule,
            "plans": {run_id: asdict(plan) for run_id, plan in plans.items()},
            "entries": [asdict(entry) for entry in entries],
        }
        text = json.dumps({**body, "checksum": _checksum(body)}, indent=2, ensure_ascii=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file 0600: it describes patients' exposure, so no other user reads.
        fd, tmp_name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as tmp:
                tmp.write(text + "\n")
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, self.path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_directory(self.path.parent)
        self.plans, self.entries = dict(plans), list(entries)

    def history_json(self) -> list[dict[str, Any]]:
        """The history in plain JSON, so anyone can recompute ε with an accountant they trust."""
        keys = ("noise_multiplier", "sample_rate", "steps", "epsilon", "delta", "accountant")
        return [
            {"round": e.server_round, **{key: getattr(e, key) for key in keys}, "run_id": e.run_id}
            for e in self.entries
        ]


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_ledger_file(path: Path) -> PrivacyLedger:
    """Load a ledger using the hospital, accountant and δ stored in it; verifies the checksum."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no privacy ledger here (nothing has been recorded).")
    invalid = f"{path}: not a valid fedtune privacy ledger"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LedgerError(
            f"{invalid} (unreadable JSON: {error}). It may be truncated or corrupted; restore it "
            "from a backup. Do not delete it: it is the record of ε already spent."
        ) from error
    if not isinstance(document, dict) or "format" not in document:
        raise LedgerError(f"{invalid} (no 'format' field). Check the privacy ledger path.")
    if document["format"] != LEDGER_FORMAT:
        raise LedgerError(
            f"{path}: unknown ledger format {document['format']!r} (this fedtune reads "
            f"{LEDGER_FORMAT!r}); it may come from a newer fedtune — upgrade this node."
        )
    body = {key: value for key, value in document.items() if key != "checksum"}
    if document.get("checksum") != _checksum(body):
        raise LedgerError(
            f"{path}: checksum mismatch — the ledger was edited by hand or corrupted, so the "
            "ε it records cannot be trusted. Restore it from a backup; do not delete it."
        )
    try:
        ledger = PrivacyLedger(
            path=path,
            hospital=str(body["hospital"]),
            accountant=str(body["accountant"]),
            delta=float(body["delta"]),
            unit=str(body.get("unit", "record")),
            delta_rule=str(body.get("delta_rule", OLD_DELTA_RULE)),
            entries=[LedgerEntry(**entry) for entry in body["entries"]],
            plans={run_id: RunPlan(**plan) for run_id, plan in body["plans"].items()},
        )
        compute_epsilon([], ledger.delta, ledger.accountant)  # checks accountant and δ
        if ledger.unit not in ("record", "patient"):
            raise ValueError(f"unknown privacy unit {ledger.unit!r}")
        for entry in ledger.entries:
            check_step_group(entry.noise_multiplier, entry.sample_rate, entry.steps)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise LedgerError(f"{invalid} (bad structure: {error}).") from error
    return ledger


def describe_ledger(path: Path) -> str:
    """Plain-words summary for `fedtune ledger <path>` (a privacy officer reads this)."""
    ledger = read_ledger_file(path)
    total_steps = sum(entry.steps for entry in ledger.entries)
    spent = ledger.epsilon_spent()
    lines = [
        f"Privacy ledger {ledger.path}",
        f"hospital: {ledger.hospital}",
        f"protects: each {ledger.unit}",
        f"accountant: {ledger.accountant}, δ={ledger.delta:g}",
        f"rounds recorded: {len(ledger.entries)}, total DP steps: {total_steps}",
        f"ε spent: {spent:.3f}",
        guarantee_sentence(ledger.unit, spent, ledger.delta),
    ]
    if ledger.unit == "record":
        lines.append(
            "  not covered: a patient with k records is protected only at about k·ε; "
            "privacy.unit = 'patient' (a new ledger) protects each patient as a whole."
        )
    weaker = weaker_delta_note(ledger)
    if weaker:
        lines.append(weaker)
    for run_id, plan in ledger.plans.items():
        lines.append(
            f"plan for run {run_id}: σ={plan.noise_multiplier:.3f}, q={plan.sample_rate:.3f}, "
            f"{plan.steps_per_round} steps × {plan.planned_rounds} rounds "
            f"for target ε={plan.target_epsilon:g}"
        )
    lines += [
        f"run {e.run_id} round {e.server_round}: σ={e.noise_multiplier:.2f}, "
        f"q={e.sample_rate:.3f}, {e.steps} steps → ε={e.epsilon:.2f}"
        for e in ledger.entries
    ]
    return "\n".join(lines)


def guarantee_sentence(unit: str, epsilon: float, delta: float) -> str:
    """What (ε, δ) means for this hospital, in one sentence a privacy officer can repeat."""
    return (
        f"meaning: whether or not any one {unit}'s data was used, every model update this "
        f"hospital sent is almost equally likely (within a factor e^{epsilon:.2f}), except "
        f"with probability δ = {delta:g}. Not covered: the training loss and evaluation metrics "
        "the hospital reported, and which rounds the coordinator asks for within the budget."
    )


def weaker_delta_note(ledger: PrivacyLedger) -> str | None:
    """A warning when the ledger's δ is weaker than today's default rule would give."""
    counts = [plan.num_units for plan in ledger.plans.values() if plan.num_units]
    if counts:
        today = default_delta(max(counts))
        if ledger.delta > today:
            return (
                f"WEAKER THAN TODAY'S DEFAULT: δ = {ledger.delta:g} is above 1/(10·n) for "
                f"n = {max(counts)} {ledger.unit}s (today's default would be δ = {today:g}). "
                "It is kept so the ε already spent is not re-stated; a new ledger gets the "
                "current rule."
            )
        return None
    if ledger.delta_rule == OLD_DELTA_RULE and ledger.entries:
        return (
            f"WEAKER THAN TODAY'S DEFAULT (likely): this ledger began under the old rule "
            f"(δ just below 1/n), so δ = {ledger.delta:g} may be up to 10× above today's "
            "δ ≤ 1/(10·n). It is kept so the ε already spent is not re-stated."
        )
    return None
