"""The one import root and the enforced layers, checked on what is really built and run.

The wheel is built from this checkout and unpacked: its top level must be exactly `fedtune`
(+ dist-info), and the app bundle written from the *installed* wheel must hash to what that
install reports. The import contract is run on a copy of the package tree with one upward
import planted, and must fail there while it holds on the real tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tree_builder():
    import importlib.util

    path = REPO / "tools" / "package_tree.py"
    spec = importlib.util.spec_from_file_location("package_tree", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def test_the_wheel_installs_only_the_fedtune_package(fedtune_wheel: Path):
    with zipfile.ZipFile(fedtune_wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        names = set(archive.namelist())
    assert tops == {"fedtune", "fedtune-0.1.0.dist-info"}, tops
    for module in ("fedtune/client/app.py", "fedtune/server/app.py", "fedtune/strategies/fedavg.py",
                   "fedtune/core/secagg/protocol.py", "fedtune/ops/cli.py",
                   "fedtune/simulations/sweep.py", "fedtune/benchmarks/runner.py",
                   "fedtune/simulations/quick.toml"):
        assert module in names, module


def test_the_installed_wheel_runs_and_bundles_its_own_code(installed_wheel: Path, tmp_path: Path):
    """Outside the checkout, `fedtune` and every subpackage come from the wheel, and the app
    bundle written there hashes exactly like that install's code (what a hospital pins)."""
    target = installed_wheel
    probe = (
        "import fedtune, fedtune.client.app, fedtune.server.app, fedtune.core.app_code as c;"
        "from fedtune.ops.flower_app import write_app_bundle;"
        "from pathlib import Path;"
        "print(fedtune.__file__); print(fedtune.client.app.__file__);"
        "print(c.app_code_sha256());"
        "print(c.app_code_sha256(write_app_bundle(Path('bundle'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True)
    root_file, client_file, installed_hash, bundle_hash = result.stdout.split()
    assert Path(root_file).is_relative_to(target) and Path(client_file).is_relative_to(target)
    assert installed_hash == bundle_hash
    assert (tmp_path / "bundle" / "fedtune" / "client" / "app.py").is_file()
    assert not (tmp_path / "bundle" / "fedtune" / "ops").exists()
    cli = subprocess.run([sys.executable, "-m", "fedtune.ops.cli", "app-hash"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=True)
    assert cli.stdout.split()[-1] == installed_hash


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "lint-imports"), str(REPO / "pyproject.toml")], cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
    )


def test_the_layer_contract_holds_and_fails_on_a_planted_upward_import(tmp_path: Path):
    tree = _tree_builder()(tmp_path / "tree")
    kept = _lint_imports(tree)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    # The core must never import the coordinator: plant that import in a real copy.
    config = tree / "fedtune" / "core" / "config.py"
    source = config.read_text()
    config.unlink()
    shutil.copyfile(REPO / "fedtune" / "core" / "config.py", config)
    config.write_text(source + "\n\ndef _upward() -> None:\n    import fedtune.server.rounds\n")
    broken = _lint_imports(tree)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout
    assert "fedtune.core.config -> fedtune.server.rounds" in broken.stdout
