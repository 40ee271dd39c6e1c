"""Keys for a real (deployed) federation: TLS for the coordinator and node-authentication keys.

A deployed Flower 1.41 federation needs two kinds of keys besides the secure-aggregation
identities of `fedtune.core.secagg.identity`:

* TLS. The coordinator's SuperLink serves HTTPS; hospitals verify it against a small private
  CA (`ca.pem`) that the coordinator creates once. Flower checks the host name, so the
  coordinator certificate must list every address hospitals dial (IP addresses and/or DNS
  names) as SubjectAlternativeName entries; a certificate without them is rejected.
* Node authentication. Each hospital's SuperNode signs its requests with an EC key on a NIST
  curve. Flower reads the private key only in OpenSSH format (`-----BEGIN OPENSSH PRIVATE
  KEY-----`, unencrypted: the node runs unattended) and the coordinator registers the public
  half, an OpenSSH line `ecdsa-sha2-nistp384 AAAA... <hospital>`, with
  `flwr supernode register`. Without this any machine that can reach the SuperLink could join
  the federation and receive the model.

The coordinator keeps `ca.key` offline (whoever holds it can impersonate the coordinator) and
`coordinator.key` on the SuperLink machine; hospitals keep their `.key` files. Private keys are
protected by file permissions (0600), checked on every load, as ssh does. Existing keys are
never overwritten: a silently replaced key locks hospitals out, or lets an old CA linger.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ec import (
    EllipticCurvePrivateKey,
    EllipticCurvePublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.core.secagg.identity import (
    ENROLLMENT_FILE,
    IdentityError,
    _atomic_write,
    _check_name,
    _ensure_dir,
    generate_identity,
    load_public_key_file,
    public_key_hex,
    write_enrollment,
)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
COORDINATOR_CERT = "coordinator.pem"
COORDINATOR_KEY = "coordinator.key"
HOSPITALS_DIR = "hospitals"
NODE_SUFFIX = "-node"
CA_COMMON_NAME = "fedtune federation CA"
MAX_VALID_DAYS = 3650

# The curves Flower accepts for SuperNode authentication (NIST curves only; ssh names them
# nistp256/384/521). New keys use P-384, as Flower's own ephemeral node keys do.
_NIST_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
# One DNS label: letters, digits and '-', not starting or ending with '-', at most 63 chars.
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_NODE_PUB_HINT = "expected 'ecdsa-sha2-nistp384 ...' as written by `fedtune keys new-hospital`"


@dataclass(frozen=True)
class FederationFiles:
    """What `init_federation` wrote. ca_key and coordinator_key are secret."""

    ca_cert: Path
    ca_key: Path
    coordinator_cert: Path
    coordinator_key: Path


@dataclass(frozen=True)
class HospitalFiles:
    """What `new_hospital` wrote. The .pub files go to the coordinator; the .key files stay."""

    node_key: Path
    node_pub: Path
    identity_key: Path
    identity_pub: Path


# ---- coordinator: CA and TLS certificate ---------------------------------------------------


def init_federation(out_dir: Path, hosts: Sequence[str], valid_days: int) -> FederationFiles:
    """Create the federation CA and the coordinator's TLS certificate in `out_dir`.

    `hosts` are the addresses hospitals dial to reach the coordinator (e.g. its LAN IP and DNS
    name). There is deliberately no default: a certificate for the wrong address fails every
    hospital's connection, and one for too many addresses widens what it vouches for.
    """
    names = _subject_alt_names(hosts)
    if isinstance(valid_days, bool) or not isinstance(valid_days, int):
        raise IdentityError(f"valid days must be a whole number, got {valid_days!r}.")
    if not 1 <= valid_days <= MAX_VALID_DAYS:
        raise IdentityError(
            f"valid days must be between 1 and {MAX_VALID_DAYS}, got {valid_days}; the "
            "certificates must be renewed (a new federation directory) when they expire."
        )
    out_dir = Path(out_dir)
    files = FederationFiles(
        ca_cert=out_dir / CA_CERT,
        ca_key=out_dir / CA_KEY,
        coordinator_cert=out_dir / COORDINATOR_CERT,
        coordinator_key=out_dir / COORDINATOR_KEY,
    )
    # All four are checked before anything is written, so a refusal never leaves a mix of
    # old and new files (hospitals would then trust a CA that did not sign the certificate).
    for path in (files.ca_cert, files.ca_key, files.coordinator_cert, files.coordinator_key):
        if path.exists():
            raise FileExistsError(
                f"{path} already exists: a federation was already initialised in {out_dir}. "
                "fedtune will not overwrite its keys (hospitals trust its ca.pem); use another "
                "directory, or move the old files away if you really mean to start over."
            )

    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)  # tolerate clocks a little behind
    not_after = now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # path_length=0: this CA signs the coordinator certificate only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    first = hosts[0].strip()
    common_name = first if len(first) <= 64 else "fedtune coordinator"  # X.509 CN limit
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        # Clients check the address they dial against these entries (the CN is ignored).
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    _ensure_dir(out_dir)
    # Private keys first and without clobbering (a concurrent run stops here, before any
    # certificate is written). The SuperLink's web server takes no password: plain PKCS8 PEM.
    _atomic_write(files.ca_key, _pem_private(ca_key), mode=0o600, overwrite=False)
    _atomic_write(files.coordinator_key, _pem_private(server_key), mode=0o600, overwrite=False)
    pem = serialization.Encoding.PEM
    _atomic_write(files.ca_cert, ca_cert.public_bytes(pem), mode=0o644, overwrite=False)
    _atomic_write(
        files.coordinator_cert, server_cert.public_bytes(pem), mode=0o644, overwrite=False
    )
    return files


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Turn host strings into SAN entries, refusing anything a client could not dial."""
    if isinstance(hosts, str):  # a lone string is a Sequence[str] of its characters
        hosts = [hosts]
    if not hosts:
        raise IdentityError(
            "give at least one host: the IP address(es) and/or DNS name(s) hospitals use to "
            "reach the coordinator, e.g. --host 10.0.0.5 --host coordinator.example.org."
        )
    names: list[x509.GeneralName] = []
    for host in hosts:
        name = _subject_alt_name(host)
        if name not in names:
            names.append(name)
    return names


def _subject_alt_name(host: str) -> x509.GeneralName:
    if not isinstance(host, str):
        raise IdentityError(f"invalid host {host!r}: give an IP address or a DNS name.")
    text = host.strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if address.is_unspecified:
            raise IdentityError(
                f"invalid host {host!r}: {text} is an address a server listens on, not one "
                "clients dial; give 127.0.0.1 and/or the coordinator's real address or name."
            )
        return x509.IPAddress(address)
    labels = text.split(".")
    if (
        not text
        or len(text) > 253
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()  # a mistyped IP address such as 10.0.0.256 or 10.0.5
    ):
        raise IdentityError(
            f"invalid host {host!r}: give an IP address (10.0.0.5, ::1) or a DNS name made of "
            "letters, digits, '-' and '.' (coordinator.example.org), without scheme, port or "
            "spaces."
        )
    return x509.DNSName(text)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_private(key: EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# ---- hospital: node-authentication key and identity ---------------------------------------


def new_hospital(name: str, out_dir: Path) -> HospitalFiles:
    """Create all of a hospital's keys in `out_dir`: node authentication and identity.

    Writes `<name>-node.key` (OpenSSH private, 0600), `<name>-node.pub` (OpenSSH line whose
    comment is the name), `<name>.key` and `<name>.pub` (the Ed25519 identity). Nothing is
    written if any of the four already exists.
    """
    _check_hospital_name(name)
    out_dir = Path(out_dir)
    files = HospitalFiles(
        node_key=out_dir / f"{name}{NODE_SUFFIX}.key",
        node_pub=out_dir / f"{name}{NODE_SUFFIX}.pub",
        identity_key=out_dir / f"{name}.key",
        identity_pub=out_dir / f"{name}.pub",
    )
    for path in (files.node_key, files.node_pub, files.identity_key, files.identity_pub):
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; fedtune will not overwrite a hospital's keys (the "
                "coordinator enrolled the old ones). Keep using them, or move them away first "
                "if you really mean to replace them (the coordinator must then re-enroll)."
            )
    private = ec.generate_private_key(ec.SECP384R1())
    openssh_private = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # the SuperNode runs unattended; 0600 protects it
    )
    _ensure_dir(out_dir)
    _atomic_write(files.node_key, openssh_private, mode=0o600, overwrite=False)
    public_line = _openssh_public_line(private.public_key(), name)
    _atomic_write(files.node_pub, public_line, mode=0o644, overwrite=False)
    generate_identity(name, out_dir)
    return files


def load_node_public_key(path: Path) -> EllipticCurvePublicKey:
    """Read a node-authentication public key (OpenSSH line) as Flower will register it.

    Only EC keys on NIST curves are accepted because `flwr supernode register` refuses others;
    finding out here gives the coordinator a clear message instead of a failed registration.
    """
    path = Path(path)
    data = _read_key_file(path, "node-authentication public key")
    if data.lstrip().startswith(b"-----BEGIN"):
        raise IdentityError(
            f"{path}: not a hospital node-authentication public key ({_NODE_PUB_HINT}); this "
            "is a PEM file, perhaps a private key, which must never leave the hospital."
        )
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, EllipticCurvePublicKey) or key.curve.name not in _NIST_CURVES:
        raise IdentityError(
            f"{path}: not a hospital node-authentication public key ({_NODE_PUB_HINT})."
        )
    return key


def node_public_key_comment(path: Path) -> str:
    """The comment of an OpenSSH public key line (the hospital name for fedtune's keys)."""
    path = Path(path)
    load_node_public_key(path)
    fields = (
        _read_key_file(path, "node-authentication public key")
        .decode("utf-8", errors="replace")
        .split(maxsplit=2)
    )
    return fields[2].strip() if len(fields) == 3 else ""


def check_node_private_key(path: Path) -> None:
    """Check that the SuperNode will accept its private key, before it fails at start-up.

    The key must exist, be readable only by its owner (anyone who reads it can join the
    federation as this hospital) and be an unencrypted OpenSSH EC key on a NIST curve.
    """
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        raise IdentityError(
            f"node-authentication key {path} does not exist; create it with "
            "`fedtune keys new-hospital NAME --out DIR`."
        ) from None
    if not path.is_file():
        raise IdentityError(
            f"node-authentication key {path} is not a file; give the path of the -node.key file."
        )
    if os.name == "posix" and status.st_mode & 0o077:
        raise IdentityError(
            f"node-authentication key {path} can be accessed by other users of this machine "
            f"(permissions {status.st_mode & 0o777:o}); anyone who reads it can join the "
            f"federation as this hospital. Restrict it with: chmod 600 {path}"
        )
    data = _read_key_file(path, "node-authentication key")
    if not data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
        raise IdentityError(
            f"{path} is not an OpenSSH private key (the SuperNode only accepts "
            "'-----BEGIN OPENSSH PRIVATE KEY-----'); give the -node.key file written by "
            "`fedtune keys new-hospital` (not the .pub file, nor the identity .key)."
        )
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise IdentityError(
            f"{path} is protected by a passphrase, but the SuperNode starts unattended and "
            "cannot type it; create an unencrypted key with `fedtune keys new-hospital`."
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, EllipticCurvePrivateKey) or key.curve.name not in _NIST_CURVES:
        raise IdentityError(
            f"{path} is not an EC (NIST P-256/384/521) OpenSSH private key, which the "
            "SuperNode needs; create one with `fedtune keys new-hospital`."
        )


def fingerprint_node_key(key: EllipticCurvePublicKey) -> str:
    """`SHA256:<base64>` of the key, exactly as `ssh-keygen -lf` prints it, for phone checks."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])  # ssh-keygen hashes the binary key blob
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# ---- coordinator: enrollment ---------------------------------------------------------------


def enroll_hospital(federation_dir: Path, identity_pub: Path, node_pub: Path) -> str:
    """Enroll one hospital: keep its two public keys and rewrite the enrollment file.

    The hospital name comes from the identity file (signed keys are checked under that name).
    Re-enrolling the same keys is harmless; a different key under an enrolled name is refused,
    since swapping a hospital's key is exactly what an attacker would try. A node key already
    used by another hospital is refused too: it would let one machine act as two hospitals.
    Returns the hospital name.
    """
    federation_dir = Path(federation_dir)
    if not (federation_dir / CA_CERT).is_file():
        raise IdentityError(
            f"{federation_dir} is not a federation directory (it has no {CA_CERT}); create it "
            "with `fedtune keys init-federation DIR --host HOST`."
        )
    identity_pub, node_pub = Path(identity_pub), Path(node_pub)
    if _looks_like_openssh_public(identity_pub):
        raise IdentityError(
            f"{identity_pub} is a node-authentication key, not an identity file; give the "
            "identity NAME.pub first and NAME-node.pub second."
        )
    name, identity_key = load_public_key_file(identity_pub)
    _check_hospital_name(name)
    node_key = load_node_public_key(node_pub)
    node_bytes = _openssh_public_bytes(node_key)

    hospitals = federation_dir / HOSPITALS_DIR
    target_identity = hospitals / f"{name}.pub"
    target_node = hospitals / f"{name}{NODE_SUFFIX}.pub"
    enrolled = _enrolled_identity_files(hospitals)

    # Check everything before writing anything, so a refusal leaves the federation unchanged.
    if name in enrolled:
        _, old_identity = load_public_key_file(enrolled[name])
        if public_key_hex(old_identity) != public_key_hex(identity_key):
            raise _already_enrolled(name, "identity", target_identity)
    if (
        target_node.exists()
        and _openssh_public_bytes(load_node_public_key(target_node)) != node_bytes
    ):
        raise _already_enrolled(name, "node-authentication", target_node)
    identity_hex = public_key_hex(identity_key)
    for other, other_file in enrolled.items():
        if other == name:
            continue
        if public_key_hex(load_public_key_file(other_file)[1]) == identity_hex:
            raise IdentityError(
                f"{identity_pub}: hospital {name} has the same identity key as the enrolled "
                f"hospital {other}; every hospital must create its own keys with "
                "`fedtune keys new-hospital`."
            )
        other_node = hospitals / f"{other}{NODE_SUFFIX}.pub"
        if other_node.exists() and (
            _openssh_public_bytes(load_node_public_key(other_node)) == node_bytes
        ):
            raise IdentityError(
                f"{node_pub}: this node-authentication key is already enrolled for hospital "
                f"{other}; every hospital must create its own keys with "
                "`fedtune keys new-hospital`."
            )

    _ensure_dir(hospitals)
    if name not in enrolled:
        _atomic_write(target_identity, identity_pub.read_bytes(), mode=0o644, overwrite=False)
    if not target_node.exists():
        _atomic_write(target_node, node_pub.read_bytes(), mode=0o644, overwrite=False)
    write_enrollment(
        sorted(_enrolled_identity_files(hospitals).values()), federation_dir / ENROLLMENT_FILE
    )
    return name


def enrolled_node_keys(federation_dir: Path) -> dict[str, Path]:
    """{hospital name: its enrolled node public key file}, for the SuperLink to register.

    Every key is checked, so a damaged file is reported here and not by a failed registration.
    """
    hospitals = Path(federation_dir) / HOSPITALS_DIR
    result: dict[str, Path] = {}
    for name in sorted(_enrolled_identity_files(hospitals)):
        node = hospitals / f"{name}{NODE_SUFFIX}.pub"
        if not node.is_file():
            raise IdentityError(
                f"hospital {name} is enrolled without a node-authentication key ({node} is "
                "missing); enroll it again with `fedtune keys enroll --federation DIR "
                f"{name}.pub {name}{NODE_SUFFIX}.pub`."
            )
        load_node_public_key(node)
        result[name] = node
    return result


def _enrolled_identity_files(hospitals: Path) -> dict[str, Path]:
    if not hospitals.is_dir():
        return {}
    return {
        path.name[: -len(".pub")]: path
        for path in sorted(hospitals.glob("*.pub"))
        if not path.name.endswith(f"{NODE_SUFFIX}.pub")
    }


def _already_enrolled(name: str, kind: str, path: Path) -> IdentityError:
    return IdentityError(
        f"hospital {name} is already enrolled with a different {kind} key ({path}). If the "
        f"hospital really replaced its keys (confirm the fingerprints by phone), remove "
        f"{path.parent / name}.pub and {path.parent / name}{NODE_SUFFIX}.pub first, then "
        "enroll again."
    )


# ---- helpers -------------------------------------------------------------------------------


def _check_hospital_name(name: str) -> None:
    _check_name(name)
    # <name>-node.pub is the node key of <name>; a hospital called "x-node" would collide with
    # the node key of hospital "x" in the coordinator's hospitals/ folder.
    if name.endswith(NODE_SUFFIX):
        raise IdentityError(
            f"invalid hospital name {name!r}: names ending in '{NODE_SUFFIX}' are reserved for "
            "node-authentication key files; choose another name."
        )


def _openssh_public_bytes(key: EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _openssh_public_line(key: EllipticCurvePublicKey, comment: str) -> bytes:
    return _openssh_public_bytes(key) + b" " + comment.encode() + b"\n"


def _looks_like_openssh_public(path: Path) -> bool:
    try:
        head = path.read_bytes()[:64].lstrip()
    except OSError:
        return False  # the loader reports the real problem
    return head.startswith((b"ecdsa-sha2-", b"ssh-", b"sk-"))


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what} {path} does not exist.") from None
    except IsADirectoryError:
        raise IdentityError(f"{what} {path} is a folder; give the key file.") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror}.") from None
