"""The node's own `flwr-clientapp` accepts only a bundle that is its installed fedtune code.

Bundles are built the way the coordinator ships them (`write_app_bundle` + Flower's own FAB
builder); the end-to-end attack (a coordinator running modified code, real SuperNodes) is in
tests/test_deployment.py.
"""

from __future__ import annotations

import io
import subprocess
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedtune.ops.flower_app import write_app_bundle
from fedtune.ops.node_clientapp import UnapprovedAppBundle, verify_app_bundle, write_launcher


def _fab(app: Path) -> bytes:
    return build_fab_from_disk(app)


def test_the_coordinators_bundle_of_the_same_code_is_accepted(tmp_path: Path):
    verify_app_bundle(_fab(write_app_bundle(tmp_path / "app")))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda app: (app / "fedtune" / "client" / "app.py").write_text(
            (app / "fedtune" / "client" / "app.py").read_text()
            + "\nopen('/tmp/canary', 'w')\n"), r"changed: fedtune/client/app\.py"),
        (lambda app: (app / "numpy.py").write_text("import os\n"),
         r"not part of this node's fedtune: numpy\.py"),
        (lambda app: (app / "fedtune" / "client" / "privacy.py").unlink(),
         r"missing: fedtune/client/privacy\.py"),
        (lambda app: (app / "pyproject.toml").write_text(
            (app / "pyproject.toml").read_text().replace(
                'clientapp = "fedtune.client.app:app"', 'clientapp = "evil:app"')),
         r"its ClientApp is 'evil:app'"),
    ],
    ids=["changed-file", "extra-module", "missing-file", "other-clientapp"],
)
def test_any_other_bundle_is_refused_naming_what_differs(tmp_path: Path, change, message):
    app = write_app_bundle(tmp_path / "app")
    change(app)
    with pytest.raises(UnapprovedAppBundle, match=message):
        verify_app_bundle(_fab(app))


def test_a_bundle_that_is_not_an_archive_is_refused():
    with pytest.raises(UnapprovedAppBundle, match="not a valid archive"):
        verify_app_bundle(b"not a zip")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(".info/CONTENT", "")
    with pytest.raises(UnapprovedAppBundle, match="no pyproject.toml"):
        verify_app_bundle(buffer.getvalue())


def test_the_launcher_runs_this_interpreter_without_the_current_folder(tmp_path: Path):
    """A `fedtune/` in the working folder must not stand in for the installed one."""
    launcher = write_launcher(tmp_path / "bin")
    assert launcher.name == "flwr-clientapp" and launcher.stat().st_mode & 0o111
    fake = tmp_path / "cwd" / "fedtune" / "ops"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("raise SystemExit('the working folder ran')\n")
    (fake / "__init__.py").write_text("")
    result = subprocess.run([str(launcher), "--help"], cwd=fake.parent.parent,
                            capture_output=True, text=True, timeout=120)
    assert "the working folder ran" not in result.stderr + result.stdout
    assert result.returncode == 0 and "runtime" in (result.stdout + result.stderr).lower()
