"""The code a node runs for the coordinator: one list of packages, one way to walk them.

`APP_PACKAGES` is the single source for the Flower app bundle (`fedtune.ops.flower_app`),
the code hash a hospital pins (`allowed-app-sha256`, `fedtune app-hash`) and the audit
trail. Packages are located through the import system (never by walking site-packages), so
another distribution's top-level `client/` or `server/` can neither join the bundle nor
change the hash; relative paths are the dotted package paths (``fedtune/client/app.py``),
the same in a checkout, an installed wheel and an unpacked bundle.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

ROOT_PACKAGE = "fedtune"
# The packages whose code answers the coordinator (operations, simulations and benchmarks
# never run inside a node's ClientApp, so they stay out of the bundle).
APP_PACKAGES = ("fedtune.core", "fedtune.client", "fedtune.server", "fedtune.strategies")


def package_directory(package: str) -> Path:
    """Where `package`'s files are, found by the import system without running its code."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"fedtune package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def app_files(root: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(relative path, file) for every .py file of the app, in a fixed order.

    `root` is an unpacked app bundle (laid out by package path); without it, the packages
    the running interpreter imports.
    """
    def directory(package: str) -> Path:
        return root.joinpath(*package.split(".")) if root else package_directory(package)

    yield f"{ROOT_PACKAGE}/__init__.py", directory(ROOT_PACKAGE) / "__init__.py"
    for package in APP_PACKAGES:
        source = directory(package)
        prefix = "/".join(package.split("."))
        for path in sorted(source.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            yield f"{prefix}/{path.relative_to(source).as_posix()}", path


def app_code_sha256(root: Path | None = None) -> str:
    """SHA-256 over the relative paths and bytes of every .py file of the app's packages.

    This is the code that answers the coordinator on this node (runtime installation is off),
    so pinning it pins what the node will do with the hospital's data.
    """
    digest = hashlib.sha256()
    for relative, path in app_files(root):
        digest.update(f"{relative}\n{path.stat().st_size}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
