"""The Flower app bundle that `fedtune run` hands to the Flower engine.

Flower runs an app from a directory holding a `pyproject.toml` with `[tool.flwr.app]`. The
bundle is written from the code that is running right now (whether fedtune was installed from
a checkout or a wheel), so the coordinator and the hospitals always run the same version.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import fedtune

PACKAGES = ("fedtune", "client", "server", "strategies")

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedtune-app"
version = "{version}"
description = "fedtune federated LoRA fine-tuning (Flower app bundle)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "server.app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
config-path = ""
run-dir = ""
resume = false
"""


def write_app_bundle(target: Path) -> Path:
    """Copy the four packages' Python files and a pyproject into `target`; return it."""
    import client
    import server
    import strategies

    modules = {"fedtune": fedtune, "client": client, "server": server, "strategies": strategies}
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in PACKAGES:
        source = Path(next(iter(modules[name].__path__)))
        for path in sorted(source.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            destination = target / name / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)
    (target / "pyproject.toml").write_text(_PYPROJECT.format(version=fedtune.__version__))
    return target
