"""The hospital node runs only its own installed fedtune code, whatever bundle arrives.

Flower ships the coordinator's app bundle (FAB) to every SuperNode; the node's
`flwr-clientapp` process installs it and imports the ClientApp from it, with the bundle's
folder first on `sys.path`. Code the coordinator ships would therefore answer the
coordinator: it could read the data path or the identity key, skip the privacy ledger and
every pin. A check inside that code would protect nothing, since the coordinator could
remove it.

So `fedtune node` puts its own `flwr-clientapp` first on the SuperNode's PATH: this module,
run from the hospital's installed fedtune. Before Flower installs a bundle — before any of
the bundle's code can run — `verify_app_bundle` requires it to be exactly this node's
installed code: every file of the app's packages (`core.app_code.APP_PACKAGES`)
byte-identical to the installed copy, nothing else but Flower's manifest and a pyproject
whose ClientApp is `fedtune.client.app:app`. Anything else is refused with the files that
differ, written to the hospital's own audit log, and nothing of the bundle is installed or
imported. The hospital's admin approves code by installing a fedtune version (and may pin
its hash, `allowed_app_sha256`); the coordinator cannot change it.

Simulations run every virtual hospital in the researcher's own process; there is no
bundle from anyone else to check, and this module is not used.
"""

from __future__ import annotations

import io
import os
import sys
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

from fedtune.core.app_code import app_code_sha256, app_files

CLIENTAPP = "fedtune.client.app:app"
# Where `fedtune node` tells this process to write refusals (the hospital's audit log).
AUDIT_LOG_ENV = "FEDTUNE_NODE_AUDIT_LOG"
_FLOWER_MANIFEST = ".info/"
_PYPROJECT = "pyproject.toml"


class UnapprovedAppBundle(RuntimeError):
    """The coordinator's app bundle is not this node's installed fedtune code."""


def verify_app_bundle(fab: bytes) -> None:
    """Raise UnapprovedAppBundle unless `fab` holds exactly this node's installed app code."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        raise UnapprovedAppBundle("the coordinator's app bundle is not a valid archive") from None
    with archive:
        files = {info.filename: info for info in archive.infolist() if not info.is_dir()}
        installed = dict(app_files())
        shipped = {name for name in files
                   if not name.startswith(_FLOWER_MANIFEST) and name != _PYPROJECT}
        extra = sorted(shipped - set(installed))
        missing = sorted(set(installed) - shipped)
        changed = sorted(name for name in shipped & set(installed)
                         if archive.read(name) != installed[name].read_bytes())
        problems = []
        if changed:
            problems.append(f"changed: {_names(changed)}")
        if extra:
            problems.append(f"not part of this node's fedtune: {_names(extra)}")
        if missing:
            problems.append(f"missing: {_names(missing)}")
        if _PYPROJECT not in files:
            problems.append("no pyproject.toml")
        else:
            problems += _pyproject_problems(archive.read(_PYPROJECT))
    if problems:
        raise UnapprovedAppBundle(
            "refused the coordinator's app bundle: it is not the fedtune code installed on "
            f"this node ({'; '.join(problems)}). Nothing of it was installed or run. If the "
            "coordinator upgraded fedtune, review that version and install the same one here."
        )


def _pyproject_problems(text: bytes) -> list[str]:
    try:
        project = tomllib.loads(text.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ["its pyproject.toml cannot be read"]
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    clientapp = components.get("clientapp") if isinstance(components, dict) else None
    if clientapp != CLIENTAPP:
        return [f"its ClientApp is {clientapp!r}, not {CLIENTAPP!r}"]
    return []


def _names(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _record_refusal(reason: str) -> None:
    path = os.environ.get(AUDIT_LOG_ENV, "").strip()
    if path:
        from fedtune.core.audit import AuditLog

        AuditLog(Path(path)).append("refused-app-bundle", {"reason": reason})


def main() -> None:
    """`flwr-clientapp`, with every bundle verified before Flower installs it."""
    from flwr.supernode.runtime import run_clientapp as runtime

    install = runtime.install_from_fab

    def install_verified(fab_file: Path | bytes, *args: object, **kwargs: object) -> Path:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            verify_app_bundle(content)
        except UnapprovedAppBundle as exc:
            print(f"fedtune: {exc}", file=sys.stderr, flush=True)
            _record_refusal(str(exc))
            raise
        print(f"fedtune: app bundle verified: it is this node's installed fedtune code "
              f"(SHA-256 {app_code_sha256()[:16]}…)", file=sys.stderr, flush=True)
        return install(fab_file, *args, **kwargs)  # type: ignore[arg-type]

    # Flower 1.41's run_clientapp installs the pulled bundle with this module-level name
    # (pinned version; tests/test_deployment.py plays a modified bundle against it).
    runtime.install_from_fab = install_verified
    _flwr_clientapp(runtime.run_clientapp)


def _flwr_clientapp(run_clientapp: Callable[..., None]) -> None:
    """Flower 1.41's `flwr_clientapp` command, restated.

    Flower's own lives in `flwr.supernode.cli`, whose package import also loads the whole
    SuperNode (FastAPI, SQLAlchemy, Alembic): about 1 s of every message's process, spent on
    code a ClientApp process never runs. Same arguments, same call.
    """
    import argparse

    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
    from flwr.supercore.constant import SUPERNODE_DEFAULT_CLIENT_ADDRESS
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    parser = argparse.ArgumentParser(description="Run a Flower ClientApp (fedtune node)")
    parser.add_argument("--runtime-api-address", dest="runtime_api_address",
                        default=SUPERNODE_DEFAULT_CLIENT_ADDRESS, type=str)
    add_args_flwr_app_common(parser=parser)
    args = parser.parse_args()
    run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=try_obtain_flwr_app_token(args),
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(
            args.root_certificates, args.insecure
        ),
        parent_pid=args.parent_pid,
        runtime_dependency_install=args.runtime_dependency_install,
    )


def write_launcher(folder: Path) -> Path:
    """A `flwr-clientapp` in `folder` that runs `main` with this interpreter; returns it.

    `-P` keeps the current folder off `sys.path`, so nothing there can stand in for the
    installed fedtune either.
    """
    folder.mkdir(parents=True, exist_ok=True)
    launcher = folder / "flwr-clientapp"
    launcher.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -P -m fedtune.ops.node_clientapp "$@"\n'
    )
    launcher.chmod(0o755)
    return launcher


if __name__ == "__main__":
    main()
