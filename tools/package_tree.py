"""Lay out the installed package tree (build/typecheck/fedtune/...) with one symlink per file.

The repository keeps `client/`, `server/`, `strategies/`, `simulations/` and `benchmarks/` at
the top and installs them as `fedtune.*` through setuptools' package-dir mapping. mypy and
import-linter locate packages on disk and do not apply that mapping, so `make lint` points
them at this tree instead: the same files, laid out as the wheel lays them out. Rebuilt from
scratch on every run, so it never goes stale.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(target: Path) -> Path:
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    if target.exists():
        shutil.rmtree(target)
    for package, folder in sorted(mapping.items()):
        source = REPO / folder
        destination = target.joinpath(*package.split("."))
        for path in sorted(source.rglob("*.py")):
            relative = path.relative_to(source)
            if "__pycache__" in relative.parts:
                continue
            # the fedtune folder itself holds no mapped packages' files, only its own
            if package == "fedtune" and relative.parts[0] in {
                p.split(".")[1] for p in mapping if p.count(".") == 1
            }:
                continue
            link = destination / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    return target


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "build" / "typecheck"))
