"""The `fedtune` command: --help everywhere, clear errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.ops.cli import main

COMMANDS = ["demo", "run", "data", "check-data", "export", "ledger", "keys", "bench"]


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_answers_for_every_command(command: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as caught:
        main([*command, "--help"])
    assert caught.value.code == 0
    assert "usage: fedtune" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "fedtune"), "--help"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0 and "demo" in result.stdout and "export" in result.stdout


def test_check_data_reports_bad_lines_with_path_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    data = tmp_path / "ward.jsonl"
    data.write_text(
        '{"text": "chest pain", "label": "cardio"}\n{"text": "fever"\n\n{"label": "x"}\n'
    )
    assert main(["check-data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2:" in err and f"{data}:4:" in err and "Traceback" not in err


def test_check_data_accepts_a_valid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "ward.jsonl"
    data.write_text('{"text": "chest pain", "label": "cardio"}\n')
    assert main(["check-data", str(data)]) == 0
    assert "1 valid examples" in capsys.readouterr().out


def test_run_with_a_config_typo_fails_before_starting_flower(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nlocal_stpes = 3\n")
    code = main(
        ["run", "--config", str(config), "--hospitals", "2", "--run-dir", str(tmp_path / "r")]
    )
    assert code == 2
    assert "local_stpes" in capsys.readouterr().err


def test_export_of_an_unknown_round_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not a fedtune run directory" in capsys.readouterr().err


def test_the_launcher_shows_the_coordinators_lines_and_hides_flower_internals():
    from fedtune.ops.launch import show_flower_line

    shown: list[str] = []
    for line in [
        "INFO :      round train loss  val loss",
        "11/23/2026 14:16:21:DEBUG:ServerApp finished running.",
        "11/23/2026 14:39:41:INFO:",
        "Successfully started run 42",
        "  ! hospital-2: privacy budget exhausted (ε spent 7.9 / ε budget 8.0)",
    ]:
        show_flower_line(line, shown.append)
    assert shown == [
        "round train loss  val loss",
        "  ! hospital-2: privacy budget exhausted (ε spent 7.9 / ε budget 8.0)",
    ]
