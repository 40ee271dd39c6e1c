"""Long-term hospital identities: Ed25519 signing keys and the coordinator's enrollment file.

Secure aggregation only protects a hospital if the round keys it receives for its peers really
come from those peers: otherwise a malicious coordinator could hand out its own keys and read
every masked delta. Each hospital therefore owns a long-term Ed25519 key (the `.key` file,
which never leaves the hospital) and signs its round keys with it; the coordinator collects
the public halves (`.pub` files) into one enrollment file that every hospital checks
signatures against. Fingerprints exist so two people can compare keys over the phone.

The private key is stored unencrypted (like an ssh host key) because the hospital node runs
unattended; it is protected by file permissions, which are checked on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

ENROLLMENT_FORMAT = "fedtune-enrollment-1"
ENROLLMENT_FILE = "enrollment.json"
PUBLIC_KEY_FIELD = "ed25519-public-key"

# Names become file names (<name>.key / <name>.pub): ASCII letters, digits, '-', '_', '.',
# starting with a letter or digit so a name can never be '.', '..' or a hidden file.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HEX_KEY = re.compile(r"[0-9a-f]{64}")


class IdentityError(ValueError):
    """A key or enrollment file is missing, unsafe or malformed; the message says how to fix it."""


def generate_identity(hospital: str, out_dir: Path) -> tuple[Path, Path]:
    """Create `<hospital>.key` (private, 0600) and `<hospital>.pub` in `out_dir`.

    Never overwrites an existing key: replacing a hospital's key silently would lock it out of
    the federation (its enrolled public key would no longer match) until re-enrolled.
    """
    _check_name(hospital)
    out_dir = Path(out_dir)
    key_path, pub_path = out_dir / f"{hospital}.key", out_dir / f"{hospital}.pub"
    if key_path.exists():
        raise IdentityError(
            f"{key_path} already exists; fedtune will not overwrite a hospital's identity key. "
            "Keep using it, or move it away first if you really mean to replace it (the "
            "coordinator must then enroll the new .pub file)."
        )
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _ensure_dir(out_dir)
    # Key first and without clobbering: if another process created it meanwhile, we stop
    # before touching the .pub file that belongs to that other key.
    _atomic_write(key_path, pem, mode=0o600, overwrite=False)
    _atomic_write(pub_path, _public_key_json(hospital, private.public_key()), mode=0o644)
    return key_path, pub_path


def load_identity_key(path: Path) -> Ed25519PrivateKey:
    """Load a hospital's private key, refusing files other users could read (as ssh does)."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise IdentityError(
            f"identity key {path} does not exist; create it with "
            "`fedtune keys generate --hospital NAME --out DIR`."
        ) from None
    if not path.is_file():
        raise IdentityError(f"identity key {path} is not a file; give the path of the .key file.")
    if os.name == "posix" and status.st_mode & 0o077:
        raise IdentityError(
            f"identity key {path} can be accessed by other users of this machine (permissions "
            f"{status.st_mode & 0o777:o}); anyone who reads it can impersonate this hospital. "
            f"Restrict it with: chmod 600 {path}"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {path}: {exc.strerror}.") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(
            f"{path} is not an unencrypted Ed25519 private key in PEM format; give the .key "
            "file written by `fedtune keys generate` (not the .pub file)."
        )
    return key


def load_public_key_file(path: Path) -> tuple[str, Ed25519PublicKey]:
    """Read a `.pub` file; returns (hospital name, public key)."""
    path = Path(path)
    data = _read_json(path, "public key file")
    if not isinstance(data, dict) or PUBLIC_KEY_FIELD not in data or "hospital" not in data:
        raise IdentityError(
            f"{path} is not a fedtune public key file; give the .pub file written by "
            "`fedtune keys generate`."
        )
    hospital = data["hospital"]
    if not isinstance(hospital, str) or not _NAME.fullmatch(hospital):
        raise IdentityError(f"{path} names an invalid hospital {hospital!r}.")
    key = _parse_public_key(data[PUBLIC_KEY_FIELD], f"{path} (hospital {hospital})")
    # The fingerprint is what people compare by phone: a file whose fingerprint no longer
    # matches its key has been edited, and enrolling it would enroll the wrong key.
    stated = data.get("fingerprint")
    if stated is not None and stated != fingerprint(key):
        raise IdentityError(
            f"{path}: the fingerprint {stated!r} does not match the key it contains "
            f"({fingerprint(key)}); the file was modified. Ask hospital {hospital} to send "
            "its .pub file again."
        )
    return hospital, key


def public_key_hex(key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key as 64 lowercase hex characters."""
    return _raw(key).hex()


def fingerprint(key: Ed25519PublicKey) -> str:
    """A short digest of the key, for humans comparing keys over the phone."""
    return "SHA256:" + hashlib.sha256(_raw(key)).hexdigest()[:16]


def write_enrollment(public_key_files: Sequence[Path], out: Path) -> dict[str, str]:
    """Write the coordinator's enrollment file from hospitals' `.pub` files.

    Refuses duplicates because a repeated name would silently keep only one key, and one key
    under two names would let one hospital count twice towards the dropout threshold.
    """
    if not public_key_files:
        raise IdentityError("no public key files given; enroll at least one hospital's .pub.")
    hospitals: dict[str, str] = {}
    source: dict[str, Path] = {}
    owner_of_key: dict[str, str] = {}
    for file in public_key_files:
        name, key = load_public_key_file(Path(file))
        hexkey = public_key_hex(key)
        if name in hospitals:
            raise IdentityError(
                f"hospital {name} appears twice ({source[name]} and {file}); enroll each "
                "hospital once."
            )
        if hexkey in owner_of_key:
            raise IdentityError(
                f"{file}: hospital {name} has the same key as hospital {owner_of_key[hexkey]}; "
                "every hospital must generate its own key with `fedtune keys generate`."
            )
        hospitals[name], source[name], owner_of_key[hexkey] = hexkey, Path(file), name
    hospitals = dict(sorted(hospitals.items()))
    text = json.dumps({"format": ENROLLMENT_FORMAT, "hospitals": hospitals}, indent=2) + "\n"
    out = Path(out)
    _ensure_dir(out.parent)
    _atomic_write(out, text.encode(), mode=0o644)
    return hospitals


def load_enrollment(path: Path) -> dict[str, Ed25519PublicKey]:
    """Read an enrollment file; returns {hospital name: public key}."""
    path = Path(path)
    data = _read_json(path, "enrollment file")
    if not isinstance(data, dict) or data.get("format") != ENROLLMENT_FORMAT:
        raise IdentityError(
            f'{path} is not a fedtune enrollment file (expected "format": '
            f'"{ENROLLMENT_FORMAT}"); create it with `fedtune keys enroll`.'
        )
    entries = data.get("hospitals")
    if not isinstance(entries, dict) or not entries:
        raise IdentityError(
            f"{path} lists no hospitals; recreate it with `fedtune keys enroll PUB [PUB ...]`."
        )
    keys: dict[str, Ed25519PublicKey] = {}
    owner_of_key: dict[str, str] = {}
    for name, value in entries.items():
        if not _NAME.fullmatch(name):
            raise IdentityError(f"{path} lists an invalid hospital name {name!r}.")
        key = _parse_public_key(value, f"{path} (hospital {name})")
        hexkey = public_key_hex(key)
        if hexkey in owner_of_key:
            raise IdentityError(
                f"{path}: hospitals {owner_of_key[hexkey]} and {name} have the same key; "
                "recreate the file with `fedtune keys enroll`."
            )
        keys[name], owner_of_key[hexkey] = key, name
    return keys


def ensure_simulation_identities(keys_dir: Path, num_hospitals: int) -> Path:
    """Simulation only: give hospital-1..N key pairs and an enrollment file listing exactly them.

    Existing keys are kept so repeated simulated runs (and resumed runs) keep their identities;
    the enrollment is rewritten so it never lists hospitals that are not in this run.
    """
    if num_hospitals < 1:
        raise IdentityError(f"a simulation needs at least one hospital, got {num_hospitals}.")
    keys_dir = Path(keys_dir)
    pub_files = []
    for k in range(1, num_hospitals + 1):
        hospital = f"hospital-{k}"
        key_path, pub_path = keys_dir / f"{hospital}.key", keys_dir / f"{hospital}.pub"
        if not key_path.exists():
            try:
                generate_identity(hospital, keys_dir)
            except IdentityError:
                if not key_path.exists():  # not a concurrent creation: a real problem
                    raise
        # Re-derive the .pub from the key (kept as is) so a missing or stale .pub can never
        # enroll a key the hospital does not hold.
        public = load_identity_key(key_path).public_key()
        expected = _public_key_json(hospital, public)
        if not pub_path.exists() or pub_path.read_bytes() != expected:
            _atomic_write(pub_path, expected, mode=0o644)
        pub_files.append(pub_path)
    enrollment = keys_dir / ENROLLMENT_FILE
    write_enrollment(pub_files, enrollment)
    return enrollment


def simulated_identity_paths(keys_dir: Path, hospital: str) -> tuple[Path, Path]:
    """(key path, enrollment path) where a simulated hospital finds its identity files."""
    _check_name(hospital)
    keys_dir = Path(keys_dir)
    return keys_dir / f"{hospital}.key", keys_dir / ENROLLMENT_FILE


def _check_name(hospital: str) -> None:
    if not isinstance(hospital, str) or not _NAME.fullmatch(hospital):
        raise IdentityError(
            f"invalid hospital name {hospital!r}: use letters, digits, '-', '_' and '.', "
            "starting with a letter or digit (it becomes a file name), e.g. st-marys-london."
        )


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _public_key_json(hospital: str, key: Ed25519PublicKey) -> bytes:
    body = {
        "hospital": hospital,
        PUBLIC_KEY_FIELD: public_key_hex(key),
        "fingerprint": fingerprint(key),
    }
    return (json.dumps(body, indent=2) + "\n").encode()


def _parse_public_key(value: Any, where: str) -> Ed25519PublicKey:
    if not isinstance(value, str) or not _HEX_KEY.fullmatch(value):
        raise IdentityError(
            f"{where}: the public key must be 64 lowercase hex characters (32 bytes), got "
            f"{value!r}; the file is damaged, so ask for the hospital's .pub file again."
        )
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(value))


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise IdentityError(f"{what} {path} does not exist.") from None
    except UnicodeDecodeError:
        raise IdentityError(f"{path} is not a {what} (it is not text).") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror}.") from None
    if text.lstrip().startswith("-----BEGIN"):
        raise IdentityError(
            f"{path} is a PEM key, not a {what}; give the .pub file instead (the .key file is "
            "private and never leaves the hospital)."
        )
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise IdentityError(
            f"{path} is not a valid {what} (broken JSON at line {exc.lineno}, column "
            f"{exc.colno}: {exc.msg})."
        ) from None
    except IdentityError as exc:  # a repeated entry, found by _no_duplicate_keys
        raise IdentityError(f"{path}: {exc}") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Plain json.loads keeps the last of two equal keys; for a key file that would silently
    # drop a hospital or a key, so it is refused instead.
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise IdentityError(f"the entry {name!r} appears twice; each must appear once.")
        result[name] = value
    return result


def _ensure_dir(directory: Path) -> None:
    # 0700 when we create it: the directory holds private keys.
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _atomic_write(path: Path, data: bytes, *, mode: int, overwrite: bool = True) -> None:
    """Write via a temporary file so readers never see half a file, even after a crash."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as tmp:
            if hasattr(os, "fchmod"):  # mkstemp made it 0600; public files get 0644
                os.fchmod(tmp.fileno(), mode)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        if overwrite:
            os.replace(tmp_name, path)
        else:
            try:
                os.link(tmp_name, path)  # fails if `path` exists: no check-then-write race
            except FileExistsError:
                raise IdentityError(
                    f"{path} already exists; fedtune will not overwrite it. Move it away "
                    "first if you really mean to replace it."
                ) from None
            except OSError:  # a file system without hard links: best effort instead
                if path.exists():
                    raise IdentityError(
                        f"{path} already exists; fedtune will not overwrite it."
                    ) from None
                os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
