"""The Flower app bundle that `fedtune run` hands to the Flower engine.

Flower runs an app from a directory holding a `pyproject.toml` with `[tool.flwr.app]`. The
bundle is written from the code that is running right now (whether fedtune was installed from
a checkout or a wheel), so the coordinator and the hospitals always run the same version.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import fedtune
from fedtune.core.app_code import app_files

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
serverapp = "fedtune.server.app:app"
clientapp = "fedtune.client.app:app"

[tool.flwr.app.config]
config-path = ""
run-dir = ""
resume = false
"""


def write_app_bundle(target: Path) -> Path:
    """Copy the app's Python files (`APP_PACKAGES`, by package path) and a pyproject into
    `target`; return it. The bundle's code hash equals `app_code_sha256()` of this install."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for relative, path in app_files():
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    (target / "pyproject.toml").write_text(_PYPROJECT.format(version=fedtune.__version__))
    return target
