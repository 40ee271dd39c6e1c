"""Federation TLS certificates and node-authentication keys (fedtune/ops/federation_keys.py)."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedtune.core.secagg.identity import IdentityError, load_enrollment, load_public_key_file
from fedtune.ops.cli import main
from fedtune.ops.federation_keys import (
    check_node_private_key,
    enroll_hospital,
    enrolled_node_keys,
    fingerprint_node_key,
    init_federation,
    load_node_public_key,
    new_hospital,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file permissions")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- init_federation -----------------------------------------------------------------------


def test_coordinator_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path: Path):
    files = init_federation(tmp_path / "fed", ["127.0.0.1", "coordinator.example.org"], 30)
    assert files.ca_cert == tmp_path / "fed" / "ca.pem"
    assert files.coordinator_key == tmp_path / "fed" / "coordinator.key"
    ca, server = _cert(files.ca_cert), _cert(files.coordinator_cert)

    server.verify_directly_issued_by(ca)  # raises if not signed by the CA

    ca_constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_constraints.critical
    assert ca_constraints.value.ca and ca_constraints.value.path_length == 0
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ca_usage.critical and ca_usage.value.key_cert_sign and ca_usage.value.crl_sign
    ca_public = ca.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    assert ca_public.curve.name == "secp384r1"

    server_constraints = server.extensions.get_extension_for_class(x509.BasicConstraints)
    assert server_constraints.critical and not server_constraints.value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    validity = server.not_valid_after_utc - server.not_valid_before_utc
    assert 29 < validity.days <= 30

    for key in (files.ca_key, files.coordinator_key):
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
    if os.name == "posix":
        assert _mode(files.ca_key) == 0o600
        assert _mode(files.coordinator_key) == 0o600
        assert _mode(files.ca_cert) == 0o644


def test_init_federation_never_overwrites(tmp_path: Path):
    files = init_federation(tmp_path, ["127.0.0.1"], 30)
    before = files.ca_key.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        init_federation(tmp_path, ["127.0.0.1"], 30)
    assert files.ca_key.read_bytes() == before


@pytest.mark.parametrize(
    "hosts",
    [[], ["https://coordinator:8000"], ["127.0.0.1", "bad host"], ["0.0.0.0"], ["10.0.0.256"]],
)
def test_init_federation_refuses_missing_or_invalid_hosts(tmp_path: Path, hosts: list[str]):
    with pytest.raises(IdentityError, match="host"):
        init_federation(tmp_path, hosts, 30)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("days", [0, 3651])
def test_init_federation_refuses_absurd_validity(tmp_path: Path, days: int):
    with pytest.raises(IdentityError, match="valid days"):
        init_federation(tmp_path, ["127.0.0.1"], days)


@contextmanager
def _tls_server(cert: Path, key: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 answering b"ok" after each handshake; yields its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError):
                    pass  # the client refused our certificate: expected in some tests

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def _handshake(port: int, context: ssl.SSLContext, server_hostname: str) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        return tls.recv(2)


def test_real_tls_handshake_verifies_the_coordinator(tmp_path: Path):
    files = init_federation(tmp_path / "fed", ["127.0.0.1", "localhost"], 30)
    with _tls_server(files.coordinator_cert, files.coordinator_key) as port:
        trusting = ssl.create_default_context(cafile=str(files.ca_cert))
        assert _handshake(port, trusting, "127.0.0.1") == b"ok"
        assert _handshake(port, trusting, "localhost") == b"ok"

        without_ca = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, but trusts nothing
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(port, without_ca, "127.0.0.1")


def test_tls_handshake_fails_for_an_address_not_in_the_certificate(tmp_path: Path):
    files = init_federation(tmp_path / "fed", ["10.1.2.3"], 30)
    with _tls_server(files.coordinator_cert, files.coordinator_key) as port:
        trusting = ssl.create_default_context(cafile=str(files.ca_cert))
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            _handshake(port, trusting, "127.0.0.1")


# ---- new_hospital and node keys ------------------------------------------------------------


def test_new_hospital_writes_openssh_node_keys_and_identity(tmp_path: Path):
    files = new_hospital("st-marys", tmp_path / "keys")
    assert files.node_key == tmp_path / "keys" / "st-marys-node.key"
    assert files.node_pub == tmp_path / "keys" / "st-marys-node.pub"

    data = files.node_key.read_bytes()
    assert data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(data, None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)

    line = files.node_pub.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 AAAA")
    assert line.split()[2] == "st-marys"
    public = serialization.load_ssh_public_key(line.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert load_node_public_key(files.node_pub).public_numbers() == public.public_numbers()
    check_node_private_key(files.node_key)

    name, _ = load_public_key_file(files.identity_pub)
    assert name == "st-marys"
    assert files.identity_key.is_file()
    if os.name == "posix":
        assert _mode(files.node_key) == 0o600
        assert _mode(files.identity_key) == 0o600
        assert _mode(files.node_pub) == 0o644


def test_new_hospital_never_overwrites_and_validates_the_name(tmp_path: Path):
    files = new_hospital("st-marys", tmp_path)
    before = files.node_key.read_bytes()
    with pytest.raises(FileExistsError, match="st-marys-node.key"):
        new_hospital("st-marys", tmp_path)
    assert files.node_key.read_bytes() == before
    # An identity made earlier with `keys generate` is not replaced either.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "guys.pub").write_text("{}")
    with pytest.raises(FileExistsError, match="guys.pub"):
        new_hospital("guys", tmp_path / "other")
    assert not (tmp_path / "other" / "guys-node.key").exists()
    for bad in ("../evil", "", "a b", "x-node"):
        with pytest.raises(IdentityError, match="hospital name"):
            new_hospital(bad, tmp_path)


def test_fingerprint_matches_ssh_keygen_format(tmp_path: Path):
    files = new_hospital("h1", tmp_path)
    key = load_node_public_key(files.node_pub)
    fp = fingerprint_node_key(key)
    assert fp.startswith("SHA256:") and not fp.endswith("=")
    assert len(fp) == len("SHA256:") + 43  # 32 bytes in unpadded base64
    other = load_node_public_key(new_hospital("h2", tmp_path).node_pub)
    assert fingerprint_node_key(other) != fp


@posix_only
def test_check_node_private_key_refuses_readable_and_pem_keys(tmp_path: Path):
    files = new_hospital("h1", tmp_path)
    files.node_key.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        check_node_private_key(files.node_key)

    pem = tmp_path / "pkcs8.key"
    pem.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem.chmod(0o600)
    with pytest.raises(IdentityError, match="OpenSSH"):
        check_node_private_key(pem)
    with pytest.raises(IdentityError, match="does not exist"):
        check_node_private_key(tmp_path / "missing.key")


def test_load_node_public_key_refuses_ed25519_and_garbage(tmp_path: Path):
    ed = tmp_path / "ed.pub"
    ed.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + b" someone\n"
    )
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("ecdsa-sha2-nistp384 not-base64 h1\n")
    for path in (ed, garbage):
        with pytest.raises(IdentityError, match="not a hospital node-authentication public key"):
            load_node_public_key(path)


# ---- enrollment ----------------------------------------------------------------------------


def test_enroll_hospitals_in_a_federation(tmp_path: Path):
    fed = tmp_path / "fed"
    init_federation(fed, ["127.0.0.1"], 30)
    a = new_hospital("hospital-a", tmp_path / "a")
    b = new_hospital("hospital-b", tmp_path / "b")

    assert enroll_hospital(fed, a.identity_pub, a.node_pub) == "hospital-a"
    assert enroll_hospital(fed, b.identity_pub, b.node_pub) == "hospital-b"
    assert set(load_enrollment(fed / "enrollment.json")) == {"hospital-a", "hospital-b"}
    assert (fed / "hospitals" / "hospital-a.pub").read_bytes() == a.identity_pub.read_bytes()

    # The same files again: nothing changes.
    assert enroll_hospital(fed, a.identity_pub, a.node_pub) == "hospital-a"
    assert set(load_enrollment(fed / "enrollment.json")) == {"hospital-a", "hospital-b"}

    nodes = enrolled_node_keys(fed)
    assert nodes == {
        "hospital-a": fed / "hospitals" / "hospital-a-node.pub",
        "hospital-b": fed / "hospitals" / "hospital-b-node.pub",
    }
    assert load_node_public_key(nodes["hospital-b"]).public_numbers() == (
        load_node_public_key(b.node_pub).public_numbers()
    )


def test_enroll_refuses_changed_keys_and_shared_node_keys(tmp_path: Path):
    fed = tmp_path / "fed"
    init_federation(fed, ["127.0.0.1"], 30)
    a = new_hospital("hospital-a", tmp_path / "a")
    enroll_hospital(fed, a.identity_pub, a.node_pub)
    enrollment_before = (fed / "enrollment.json").read_bytes()

    # Same name, new keys (an impostor, or a re-keyed hospital): refused until removed.
    impostor = new_hospital("hospital-a", tmp_path / "impostor")
    with pytest.raises(IdentityError, match="hospital-a is already enrolled.*remove"):
        enroll_hospital(fed, impostor.identity_pub, impostor.node_pub)
    # A new identity under the enrolled name, even with the enrolled node key: refused.
    with pytest.raises(IdentityError, match="already enrolled with a different identity"):
        enroll_hospital(fed, impostor.identity_pub, a.node_pub)
    # Same identity, different node key: refused too.
    with pytest.raises(IdentityError, match="already enrolled with a different node"):
        enroll_hospital(fed, a.identity_pub, impostor.node_pub)

    # Another hospital presenting hospital-a's node key.
    c = new_hospital("hospital-c", tmp_path / "c")
    with pytest.raises(IdentityError, match="already enrolled for hospital hospital-a"):
        enroll_hospital(fed, c.identity_pub, a.node_pub)

    assert (fed / "enrollment.json").read_bytes() == enrollment_before
    assert not (fed / "hospitals" / "hospital-c.pub").exists()
    assert set(enrolled_node_keys(fed)) == {"hospital-a"}


def test_enroll_needs_a_federation_directory_and_files_in_order(tmp_path: Path):
    a = new_hospital("hospital-a", tmp_path / "a")
    with pytest.raises(IdentityError, match="not a federation directory"):
        enroll_hospital(tmp_path / "nowhere", a.identity_pub, a.node_pub)
    init_federation(tmp_path / "fed", ["127.0.0.1"], 30)
    with pytest.raises(IdentityError, match="identity NAME.pub first"):
        enroll_hospital(tmp_path / "fed", a.node_pub, a.identity_pub)


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_federation_workflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    fed, hospital = tmp_path / "fed", tmp_path / "hospital"
    args = ["keys", "init-federation", str(fed), "--host", "127.0.0.1", "--host", "localhost"]
    assert main(args) == 0
    for name in ("ca.pem", "ca.key", "coordinator.pem", "coordinator.key"):
        assert (fed / name).is_file()
    out = capsys.readouterr().out
    assert "ca.key" in out and "secret" in out and "ca.pem" in out

    assert main(["keys", "new-hospital", "st-marys", "--out", str(hospital)]) == 0
    out = capsys.readouterr().out
    node_fp = fingerprint_node_key(load_node_public_key(hospital / "st-marys-node.pub"))
    assert node_fp in out
    assert "st-marys.key and st-marys-node.key never leave this machine" in out

    identity, node = hospital / "st-marys.pub", hospital / "st-marys-node.pub"
    assert main(["keys", "enroll", "--federation", str(fed), str(identity), str(node)]) == 0
    out = capsys.readouterr().out
    assert "st-marys" in out and node_fp in out
    assert set(load_enrollment(fed / "enrollment.json")) == {"st-marys"}

    assert main(["keys", "show", str(node)]) == 0
    assert node_fp in capsys.readouterr().out

    # The simulation form keeps working.
    assert main(["keys", "enroll", str(identity), "--out", str(tmp_path / "e.json")]) == 0
    assert set(load_enrollment(tmp_path / "e.json")) == {"st-marys"}


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    fed = tmp_path / "fed"
    assert main(["keys", "init-federation", str(fed), "--host", "127.0.0.1"]) == 0
    assert main(["keys", "new-hospital", "h1", "--out", str(tmp_path / "h")]) == 0
    capsys.readouterr()

    assert main(["keys", "enroll", "--federation", str(fed), str(tmp_path / "h" / "h1.pub")]) == 2
    err = capsys.readouterr().err
    assert "exactly two files" in err and "NAME-node.pub" in err

    assert main(["keys", "init-federation", str(fed), "--host", "127.0.0.1"]) == 2
    assert "already exists" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:  # --host is required: argparse usage error
        main(["keys", "init-federation", str(tmp_path / "other")])
    assert exc.value.code == 2


@pytest.mark.parametrize("action", ["init-federation", "new-hospital", "enroll", "show"])
def test_keys_help(action: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as caught:
        main(["keys", action, "--help"])
    assert caught.value.code == 0
    assert f"usage: fedtune keys {action}" in capsys.readouterr().out
