"""Tests for fedtune.simulation: run-config quoting and real runs on the simulation engine.

The end-to-end tests build a tiny real Flower app in a temporary directory, run it through a
private SuperLink and check both the result and that no Flower/Ray process outlives the run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import psutil
import pytest
from flwr.common.config import parse_config_args

from fedtune.ops.simulation import (
    RunConfigValue,
    SimulationError,
    SimulationSpec,
    format_config_value,
    format_run_config,
    run_simulation,
)

# pytest-xdist (make test: -n 2 --dist loadgroup): every test that starts Flower's
# simulation engine (Ray) runs on one worker, one Ray cluster at a time.
pytestmark = pytest.mark.xdist_group("flower-simulation")

# ---- run-config formatter, checked against flwr's own parser ---------------------------

ROUND_TRIP_VALUES: list[RunConfigValue] = [
    "",
    "plain",
    "with spaces and = signs",
    'double "quotes" inside',
    "single 'quotes' inside",
    "both \" and ' and \\ backslash",
    "C:\\Users\\hospital\\data.jsonl",
    "/srv/runs/run 1/config.toml",
    "ends with .toml",
    "tab\tnew\nline\rcr\x00nul\x7fdel",
    "unicode: Zürich 東京 🏥",
    "k2=5 k3=x",
    True,
    False,
    0,
    -17,
    2**63 - 1,
    -(2**63),
    0.0,
    -2.5,
    1e-05,
    1e300,
    0.1 + 0.2,
    math.inf,
    -math.inf,
]


@pytest.mark.parametrize("value", ROUND_TRIP_VALUES, ids=repr)
def test_value_round_trips_through_flwr_parser(value: RunConfigValue) -> None:
    parsed = parse_config_args(format_run_config({"key": value}))
    assert list(parsed) == ["key"]
    assert type(parsed["key"]) is type(value)
    assert parsed["key"] == value


def test_all_pairs_parse_together_as_one_argument_list() -> None:
    config = {f"k{i}": v for i, v in enumerate(ROUND_TRIP_VALUES)}
    parsed = parse_config_args(format_run_config(config))
    assert parsed == config


def test_pairs_also_parse_when_joined_into_one_string() -> None:
    config: dict[str, RunConfigValue] = {"a": "x y", "b": 'q"uote', "c": 3, "d.e": False}
    parsed = parse_config_args([" ".join(format_run_config(config))])
    assert parsed == config


def test_paths_are_strings() -> None:
    path = Path("/data/hospital a/notes.jsonl")
    assert parse_config_args(format_run_config({"p": path})) == {"p": str(path)}


def test_nan_round_trips() -> None:
    assert format_config_value(math.nan) == "nan"
    assert math.isnan(parse_config_args(format_run_config({"x": math.nan}))["x"])


@pytest.mark.parametrize("key", ["", "has space", "a=b", 'q"', "a..b", ".a"])
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="not a plain TOML key"):
        format_run_config({key: 1})


def test_unsupported_values_are_refused() -> None:
    with pytest.raises(ValueError, match="64 bits"):
        format_config_value(2**63)
    with pytest.raises(TypeError, match="run config values"):
        format_config_value([1, 2])  # type: ignore[arg-type]


def test_spec_validation_messages(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_hospitals"):
        SimulationSpec(tmp_path, 0, {}, tmp_path)
    with pytest.raises(ValueError, match="whole number"):
        SimulationSpec(tmp_path, 2, {}, tmp_path, client_cpus=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        SimulationSpec(tmp_path, 2, {}, tmp_path, timeout_s=0)


def test_missing_app_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match=r"no pyproject\.toml"):
        run_simulation(SimulationSpec(tmp_path / "nope", 2, {}, tmp_path / "work"))


# ---- end-to-end runs through the real simulation engine --------------------------------

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "demoapp"
version = "1.0.0"
description = "Minimal Flower app for fedtune's simulation tests"
license = "Apache-2.0"
dependencies = ["flwr[simulation]==1.41.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedtune-tests"

[tool.flwr.app.components]
serverapp = "demoapp.server:app"
clientapp = "demoapp.client:app"

[tool.flwr.app.config]
result-path = ""
expected-nodes = 1
fail = false
"""

SERVER = '''\
"""ServerApp: one `train` message per node; writes "<sum of partition ids> <replies>"."""

import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config["fail"]:
        raise RuntimeError("deliberate failure in the test ServerApp")
    # Simulated nodes register asynchronously: get_node_ids() can be empty at first.
    expected = int(context.run_config["expected-nodes"])
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
    replies = [r for r in grid.send_and_receive(messages, timeout=120) if r.has_content()]
    total = sum(int(r.content.metric_records["result"]["partition-id"]) for r in replies)
    Path(str(context.run_config["result-path"])).write_text(f"{total} {len(replies)}")
'''

CLIENT = '''\
"""ClientApp: replies with the node's partition id."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    content = RecordDict({"result": MetricRecord({"partition-id": partition_id})})
    return Message(content, reply_to=msg)
'''


@pytest.fixture
def demo_app(tmp_path: Path) -> Path:
    app_dir = tmp_path / "demo app"  # a space in the path on purpose
    package = app_dir / "demoapp"
    package.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text(SERVER)
    (package / "client.py").write_text(CLIENT)
    return app_dir


def _leftovers(root: Path, port: int | None = None) -> list[str]:
    """Live processes tied to this test: FLWR_HOME under ``root``, or the SuperLink port."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        try:
            flwr_home = proc.environ().get("FLWR_HOME", "")
        except psutil.Error:
            flwr_home = ""
        uses_port = port is not None and re.search(rf"(:|--port )({port})(?!\d)", cmdline)
        if flwr_home.startswith(str(root)) or uses_port:
            found.append(f"{proc.info['pid']}: {cmdline}")
    return found


@pytest.mark.slow
def test_two_hospitals_end_to_end(demo_app: Path, tmp_path: Path) -> None:
    result_file = tmp_path / "out dir" / 'result "1".txt'
    result_file.parent.mkdir()
    lines: list[str] = []
    spec = SimulationSpec(
        app_dir=demo_app,
        num_hospitals=2,
        run_config={"result-path": result_file, "expected-nodes": 2},
        work_dir=tmp_path / "work",
        timeout_s=240,
    )
    result = run_simulation(spec, on_line=lines.append)

    assert result_file.read_text() == "1 2"  # partition ids 0 + 1, two replies
    assert any(f"Successfully started run {result.run_id}" in line for line in lines)
    assert not any("\x1b[" in line for line in lines)
    assert result.flwr_home.parent == tmp_path / "work"
    assert result.superlink_log.is_file()
    assert _leftovers(tmp_path, result.port) == []


@pytest.mark.slow
def test_failing_server_app_raises_and_cleans_up(demo_app: Path, tmp_path: Path) -> None:
    spec = SimulationSpec(
        app_dir=demo_app,
        num_hospitals=2,
        run_config={"fail": True},
        work_dir=tmp_path / "work",
        timeout_s=240,
    )
    with pytest.raises(SimulationError) as excinfo:
        run_simulation(spec, on_line=lambda _line: None)

    message = str(excinfo.value)
    assert "finished:failed" in message
    assert "deliberate failure in the test ServerApp" in message
    assert "superlink.log" in message
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_timeout_stops_everything(demo_app: Path, tmp_path: Path) -> None:
    spec = SimulationSpec(
        app_dir=demo_app,
        num_hospitals=2,
        run_config={"expected-nodes": 2, "result-path": str(tmp_path / "r.txt")},
        work_dir=tmp_path / "work",
        timeout_s=4,
    )
    with pytest.raises(SimulationError, match="did not finish within 4 s"):
        run_simulation(spec, on_line=lambda _line: None)
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_interrupt_mid_run_stops_everything(demo_app: Path, tmp_path: Path) -> None:
    def interrupt_once_running(line: str) -> None:
        if "Successfully started run" in line:
            raise KeyboardInterrupt  # what Ctrl-C in the researcher's terminal does

    spec = SimulationSpec(
        app_dir=demo_app,
        num_hospitals=2,
        run_config={"expected-nodes": 2, "result-path": str(tmp_path / "r.txt")},
        work_dir=tmp_path / "work",
    )
    with pytest.raises(KeyboardInterrupt):
        run_simulation(spec, on_line=interrupt_once_running)
    assert _leftovers(tmp_path) == []
