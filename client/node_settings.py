"""This hospital's own settings, parsed once from its node configuration into a frozen object.

A deployed node gets them from its admin (`fedtune node` turns the `[node]` file into the
SuperNode's `--node-config`; `NodeSettings.to_node_config` writes that mapping, so the two
cannot drift); a simulated hospital gets Flower's `partition-id`. Every handler parses the
mapping once with `parse_node_settings` and passes the object down, so each setting has one
name, one type and one error message, and a typo in an admin's key is refused (naming the key
and the allowed ones) instead of silently meaning "not set" — for a pin or a budget that
would turn a protection off without anyone noticing.

The coordinator cannot change any of these: they are the node's, not the run's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedtune.core.config import ConfigError

# A deployed hospital's split and evaluation limit when its admin sets none.
DEFAULT_DATA_SPLIT = (0.8, 0.1, 0.1)
DEFAULT_MAX_EVALUATIONS = 100

# Flower's simulation engine sets these for each virtual hospital.
SIM_PARTITION_KEY = "partition-id"
SIM_PARTITIONS_KEY = "num-partitions"


class NodeSettingsError(ConfigError):
    """A node setting is unknown or has the wrong type: the hospital's admin must fix it."""


@dataclass(frozen=True)
class NodeSettings:
    """What this hospital's admin decided for its node; empty / None = not set.

    Field names are the node-configuration keys with `_` for `-` (`data_path` is
    `data-path`), except `name` (`hospital-name`) and the simulation's `partition_id`.
    """

    name: str = ""  # as reported to the coordinator; default: the data file's stem
    data_path: Path | None = None  # the hospital's data (deployed nodes)
    partition_id: int | None = None  # the virtual hospital's number (simulation)
    num_partitions: int | None = None
    # Privacy: the persistent ledger and this hospital's own ε budget over all runs.
    privacy_ledger: Path | None = None
    privacy_epsilon_budget: float | None = None
    # "patient": this hospital protects each patient as a whole whatever the run asks
    # ("record" or unset: the run's privacy.unit; a run asking "patient" always gets it).
    privacy_unit: str = ""
    device: str = ""  # where this node trains (auto, cpu, cuda); replaces the run's choice
    allow_plain_updates: bool = False  # may the delta ever travel unmasked (research runs)
    # Pins: what this hospital agrees to run (client.approval, client.session).
    allowed_model: str = ""
    allowed_model_sha256: str = ""
    allowed_strategies: tuple[str, ...] = ()
    max_epsilon: float | None = None
    allowed_app_sha256: str = ""
    # Secure aggregation: its identity, the enrolled hospitals, the lowest threshold accepted.
    identity_key: Path | None = None
    enrollment: Path | None = None
    secagg_min_threshold: int | None = None
    secagg_min_survivors: int | None = None  # fewest survivors to unmask with (default 3)
    # Evaluation is the hospital's (deployed nodes): its own train/validation/test split, so
    # the coordinator cannot move records out of DP training into noise-free evaluation,
    # and at most this many evaluation replies per run (counted in its audit log).
    data_split: tuple[float, float, float] | None = None  # default 0.8, 0.1, 0.1
    split_seed: int | None = None  # default 0
    max_evaluations: int | None = None  # default DEFAULT_MAX_EVALUATIONS
    # Governance: identifier-check findings accepted; data summary shared; own audit log.
    pii_acknowledged: bool = False
    share_data_summary: bool = False
    audit_log: Path | None = None

    @property
    def simulated(self) -> bool:
        """A virtual hospital of a simulation (no admin file; data generated for the run)."""
        return self.data_path is None and self.partition_id is not None

    @property
    def display_name(self) -> str:
        """The name this node gives in replies and logs, even before its data is resolved."""
        if self.partition_id is not None and self.data_path is None:
            return f"hospital-{self.partition_id + 1}"
        if self.name:
            return self.name
        return self.data_path.stem if self.data_path is not None else "this hospital"

    def to_node_config(self) -> dict[str, str | int | float | bool]:
        """The mapping `parse_node_settings` reads back into this object (unset keys left out)."""
        out: dict[str, str | int | float | bool] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None or value == "" or value == () or value is False:
                continue
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = ",".join(str(part) for part in value)
            out[_KEY_OF[field.name]] = value
        return out


# node-configuration key -> (field, type); the types Flower's --node-config parser produces.
_SCHEMA: dict[str, tuple[str, type]] = {
    "hospital-name": ("name", str),
    "data-path": ("data_path", Path),
    SIM_PARTITION_KEY: ("partition_id", int),
    SIM_PARTITIONS_KEY: ("num_partitions", int),
    "privacy-ledger": ("privacy_ledger", Path),
    "privacy-epsilon-budget": ("privacy_epsilon_budget", float),
    "privacy-unit": ("privacy_unit", str),
    "device": ("device", str),
    "allow-plain-updates": ("allow_plain_updates", bool),
    "allowed-model": ("allowed_model", str),
    "allowed-model-sha256": ("allowed_model_sha256", str),
    "allowed-strategies": ("allowed_strategies", tuple),
    "max-epsilon": ("max_epsilon", float),
    "allowed-app-sha256": ("allowed_app_sha256", str),
    "identity-key": ("identity_key", Path),
    "enrollment": ("enrollment", Path),
    "secagg-min-threshold": ("secagg_min_threshold", int),
    "secagg-min-survivors": ("secagg_min_survivors", int),
    "data-split": ("data_split", list),
    "split-seed": ("split_seed", int),
    "max-evaluations": ("max_evaluations", int),
    "pii-acknowledged": ("pii_acknowledged", bool),
    "share-data-summary": ("share_data_summary", bool),
    "audit-log": ("audit_log", Path),
}
_KEY_OF = {field: key for key, (field, _) in _SCHEMA.items()}
# Whole-number settings and the least value each may take.
_WHOLE_NUMBER_MINIMUMS = {"secagg_min_threshold": 2, "secagg_min_survivors": 2,
                          "max_evaluations": 0, "partition_id": 0}
_DEVICES = ("", "auto", "cpu", "cuda")


def node_key(field: str) -> str:
    """The node-configuration key of a NodeSettings field, for messages to the admin."""
    return _KEY_OF[field]


def parse_node_settings(node_config: Mapping[str, Any]) -> NodeSettings:
    """Validate and type the node configuration; every mistake names the key.

    Raises NodeSettingsError for an unknown key (with the allowed ones), a value of the wrong
    type, an empty path, a non-positive budget or ε cap, or a threshold below 2.
    """
    unknown = sorted(set(node_config) - set(_SCHEMA))
    if unknown:
        raise NodeSettingsError(
            f"unknown node setting(s) {', '.join(repr(k) for k in unknown)}; this node "
            f"understands: {', '.join(sorted(_SCHEMA))}."
        )
    values: dict[str, Any] = {}
    for key, raw in node_config.items():
        field, kind = _SCHEMA[key]
        values[field] = _typed(key, raw, kind)
    settings = NodeSettings(**values)
    for field in ("privacy_epsilon_budget", "max_epsilon"):
        number = getattr(settings, field)
        if number is not None and not number > 0:
            raise NodeSettingsError(f"node setting {node_key(field)} must be > 0, got {number}.")
    for field, least in _WHOLE_NUMBER_MINIMUMS.items():
        number = getattr(settings, field)
        if number is not None and number < least:
            raise NodeSettingsError(
                f"node setting {node_key(field)} must be a whole number >= {least}, got {number}."
            )
    if settings.privacy_unit not in ("", "record", "patient"):
        raise NodeSettingsError(
            f"node setting {node_key('privacy_unit')} must be 'record' or 'patient'; got "
            f"{settings.privacy_unit!r}."
        )
    if settings.device not in _DEVICES:
        raise NodeSettingsError(
            f"node setting device must be one of auto, cpu, cuda; got {settings.device!r}."
        )
    if settings.data_split is not None and (
            len(settings.data_split) != 3 or min(settings.data_split) < 0
            or settings.data_split[0] <= 0 or abs(sum(settings.data_split) - 1.0) > 1e-6):
        raise NodeSettingsError(
            f"node setting {node_key('data_split')} must be three fractions (train, "
            f"validation, test) summing to 1 with train > 0, got {settings.data_split}."
        )
    return settings


def _typed(key: str, raw: Any, kind: type) -> Any:
    """`raw` as `kind`, refusing what Flower's parser would not produce for such a setting
    (a bool where a number belongs, the string "false" for a switch)."""
    names = {str: "text", Path: "a path", int: "a whole number", float: "a number",
             bool: "true or false", tuple: "comma-separated names",
             list: "comma-separated fractions, e.g. 0.8,0.1,0.1"}
    ok = {
        str: isinstance(raw, str),
        Path: isinstance(raw, str | Path) and str(raw).strip() != "",
        int: isinstance(raw, int) and not isinstance(raw, bool),
        float: isinstance(raw, int | float) and not isinstance(raw, bool),
        bool: isinstance(raw, bool),
        tuple: isinstance(raw, str),
        list: isinstance(raw, str) and _fractions(raw) is not None,
    }[kind]
    if not ok:
        raise NodeSettingsError(f"node setting {key} must be {names[kind]}, got {raw!r}.")
    if kind is Path:
        return Path(str(raw)).expanduser()
    if kind is float:
        return float(raw)
    if kind is str:
        return raw.strip()
    if kind is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind is list:
        return _fractions(raw)
    return raw


def _fractions(raw: str) -> tuple[float, ...] | None:
    try:
        return tuple(float(part) for part in raw.split(","))
    except ValueError:
        return None
