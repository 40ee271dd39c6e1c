"""Hospital identity keys and the enrollment file (core/secagg/identity.py, `fedtune keys`)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.core.secagg.identity import (
    ENROLLMENT_FORMAT,
    IdentityError,
    ensure_simulation_identities,
    fingerprint,
    generate_identity,
    load_enrollment,
    load_identity_key,
    load_public_key_file,
    public_key_hex,
    simulated_identity_paths,
    write_enrollment,
)
from fedtune.ops.cli import main

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file permissions")


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_generated_key_pair_round_trips_and_signs(tmp_path: Path):
    key_path, pub_path = generate_identity("st-marys", tmp_path / "new" / "keys")
    assert key_path == tmp_path / "new" / "keys" / "st-marys.key"
    assert pub_path == tmp_path / "new" / "keys" / "st-marys.pub"
    assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")

    private = load_identity_key(key_path)
    name, public = load_public_key_file(pub_path)
    assert name == "st-marys"
    assert _raw(private) == public.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    signature = private.sign(b"round 3 keys")
    public.verify(signature, b"round 3 keys")
    with pytest.raises(InvalidSignature):
        public.verify(signature, b"round 4 keys")

    body = json.loads(pub_path.read_text())
    assert body == {
        "hospital": "st-marys",
        "ed25519-public-key": _raw(private).hex(),
        "fingerprint": fingerprint(public),
    }


def test_fingerprint_and_hex_are_derived_from_the_raw_key():
    private = Ed25519PrivateKey.generate()
    raw = _raw(private)
    assert public_key_hex(private.public_key()) == raw.hex()
    assert len(raw.hex()) == 64
    assert fingerprint(private.public_key()) == "SHA256:" + hashlib.sha256(raw).hexdigest()[:16]


@posix_only
def test_key_file_is_readable_only_by_its_owner(tmp_path: Path):
    key_path, pub_path = generate_identity("h1", tmp_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_path.stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused_with_a_chmod_hint(tmp_path: Path, mode: int):
    key_path, _ = generate_identity("h1", tmp_path)
    key_path.chmod(mode)
    with pytest.raises(IdentityError, match=f"chmod 600 {key_path}"):
        load_identity_key(key_path)
    key_path.chmod(0o600)
    load_identity_key(key_path)


def test_missing_or_wrong_key_files_are_clear_errors(tmp_path: Path):
    with pytest.raises(IdentityError, match="does not exist.*fedtune keys generate"):
        load_identity_key(tmp_path / "absent.key")
    _, pub_path = generate_identity("h1", tmp_path)
    pub_copy = tmp_path / "pub-as-key.key"
    pub_copy.write_bytes(pub_path.read_bytes())
    pub_copy.chmod(0o600)
    with pytest.raises(IdentityError, match="not an unencrypted Ed25519 private key"):
        load_identity_key(pub_copy)
    other = tmp_path / "ec.key"
    from cryptography.hazmat.primitives.asymmetric import ec

    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    other.chmod(0o600)
    with pytest.raises(IdentityError, match="not an unencrypted Ed25519 private key"):
        load_identity_key(other)


def test_existing_key_is_never_overwritten(tmp_path: Path):
    key_path, pub_path = generate_identity("h1", tmp_path)
    before = key_path.read_bytes(), pub_path.read_bytes()
    with pytest.raises(IdentityError, match="already exists"):
        generate_identity("h1", tmp_path)
    assert (key_path.read_bytes(), pub_path.read_bytes()) == before


@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", "st marys", ".hidden", "..", "h\u00f4pital", "h1\n", "-x"]
)
def test_names_that_are_not_safe_file_names_are_refused(tmp_path: Path, name: str):
    with pytest.raises(IdentityError, match="invalid hospital name"):
        generate_identity(name, tmp_path / "keys")
    assert not (tmp_path / "keys").exists()


@pytest.mark.parametrize("name", ["h1", "St.Marys_London-2", "7"])
def test_reasonable_names_are_accepted(tmp_path: Path, name: str):
    key_path, _ = generate_identity(name, tmp_path)
    assert key_path.name == f"{name}.key"


def test_enrollment_round_trip(tmp_path: Path):
    pubs = [generate_identity(name, tmp_path / name)[1] for name in ("b-hosp", "a-hosp")]
    out = tmp_path / "coord" / "enrollment.json"
    mapping = write_enrollment(pubs, out)
    keys = dict(load_public_key_file(pub) for pub in pubs)
    assert mapping == {name: public_key_hex(key) for name, key in sorted(keys.items())}
    assert json.loads(out.read_text()) == {"format": ENROLLMENT_FORMAT, "hospitals": mapping}
    loaded = load_enrollment(out)
    assert {n: public_key_hex(k) for n, k in loaded.items()} == mapping


def test_enrollment_refuses_a_hospital_twice(tmp_path: Path):
    first = generate_identity("h1", tmp_path / "one")[1]
    second = generate_identity("h1", tmp_path / "two")[1]
    out = tmp_path / "enrollment.json"
    with pytest.raises(IdentityError, match="h1 appears twice"):
        write_enrollment([first, second], out)
    assert not out.exists()


def test_enrollment_refuses_two_hospitals_sharing_a_key(tmp_path: Path):
    pub = generate_identity("h1", tmp_path)[1]
    copy = tmp_path / "h2.pub"
    body = json.loads(pub.read_text())
    copy.write_text(json.dumps({**body, "hospital": "h2"}))
    with pytest.raises(IdentityError, match="same key as hospital h1"):
        write_enrollment([pub, copy], tmp_path / "enrollment.json")


def test_edited_public_key_file_is_refused(tmp_path: Path):
    pub = generate_identity("h1", tmp_path)[1]
    body = json.loads(pub.read_text())
    other = public_key_hex(Ed25519PrivateKey.generate().public_key())
    pub.write_text(json.dumps({**body, "ed25519-public-key": other}))
    with pytest.raises(IdentityError, match="fingerprint .* does not match"):
        load_public_key_file(pub)


def _enrollment(tmp_path: Path) -> Path:
    pubs = [generate_identity(name, tmp_path / "k")[1] for name in ("h1", "h2")]
    out = tmp_path / "enrollment.json"
    write_enrollment(pubs, out)
    return out


@pytest.mark.parametrize(
    ("bad_value", "message"),
    [("zz" * 32, "hospital h2.*64 lowercase hex"), ("ab" * 31, "hospital h2.*64 lowercase hex"),
     (42, "hospital h2")],
)
def test_corrupted_enrollment_names_the_hospital(tmp_path: Path, bad_value: object, message: str):
    out = _enrollment(tmp_path)
    body = json.loads(out.read_text())
    body["hospitals"]["h2"] = bad_value
    out.write_text(json.dumps(body))
    with pytest.raises(IdentityError, match=message):
        load_enrollment(out)


def test_broken_enrollment_files_are_clear_errors(tmp_path: Path):
    with pytest.raises(IdentityError, match="does not exist"):
        load_enrollment(tmp_path / "absent.json")
    out = _enrollment(tmp_path)
    text = out.read_text()
    out.write_text(text[: len(text) // 2])
    with pytest.raises(IdentityError, match="broken JSON at line"):
        load_enrollment(out)
    out.write_text(json.dumps({"format": "something-else", "hospitals": {}}))
    with pytest.raises(IdentityError, match=ENROLLMENT_FORMAT):
        load_enrollment(out)
    h1 = public_key_hex(Ed25519PrivateKey.generate().public_key())
    h2 = public_key_hex(Ed25519PrivateKey.generate().public_key())
    out.write_text(
        f'{{"format": "{ENROLLMENT_FORMAT}", "hospitals": {{"h1": "{h1}", "h1": "{h2}"}}}}'
    )
    with pytest.raises(IdentityError, match="'h1' appears twice"):
        load_enrollment(out)
    out.write_text(json.dumps({"format": ENROLLMENT_FORMAT, "hospitals": {"h1": h1, "h2": h1}}))
    with pytest.raises(IdentityError, match="same key"):
        load_enrollment(out)


def test_simulation_identities_keep_existing_keys_and_add_missing(tmp_path: Path):
    keys_dir = tmp_path / "keys"
    enrollment = ensure_simulation_identities(keys_dir, 2)
    assert enrollment == keys_dir / "enrollment.json"
    first = {p.name: p.read_bytes() for p in keys_dir.glob("*.key")}
    assert sorted(first) == ["hospital-1.key", "hospital-2.key"]

    assert ensure_simulation_identities(keys_dir, 3) == enrollment
    second = {p.name: p.read_bytes() for p in keys_dir.glob("*.key")}
    assert sorted(second) == ["hospital-1.key", "hospital-2.key", "hospital-3.key"]
    assert {name: second[name] for name in first} == first

    enrolled = load_enrollment(enrollment)
    assert sorted(enrolled) == ["hospital-1", "hospital-2", "hospital-3"]
    for name, public in enrolled.items():
        key_path, enrollment_path = simulated_identity_paths(keys_dir, name)
        assert enrollment_path == enrollment
        private = load_identity_key(key_path)
        public.verify(private.sign(b"m"), b"m")

    # Fewer hospitals next time: the enrollment lists exactly those, keys stay on disk.
    ensure_simulation_identities(keys_dir, 1)
    assert sorted(load_enrollment(enrollment)) == ["hospital-1"]
    assert (keys_dir / "hospital-3.key").read_bytes() == second["hospital-3.key"]


def test_simulation_identities_repair_a_missing_public_key_file(tmp_path: Path):
    keys_dir = tmp_path / "keys"
    ensure_simulation_identities(keys_dir, 1)
    key_bytes = (keys_dir / "hospital-1.key").read_bytes()
    (keys_dir / "hospital-1.pub").unlink()
    enrollment = ensure_simulation_identities(keys_dir, 1)
    assert (keys_dir / "hospital-1.key").read_bytes() == key_bytes
    private = load_identity_key(keys_dir / "hospital-1.key")
    assert public_key_hex(load_enrollment(enrollment)["hospital-1"]) == _raw(private).hex()


def test_simulation_needs_a_hospital(tmp_path: Path):
    with pytest.raises(IdentityError, match="at least one hospital"):
        ensure_simulation_identities(tmp_path, 0)


def test_cli_generate_enroll_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["keys", "generate", "--hospital", "h1", "--out", str(tmp_path / "h1")]) == 0
    out = capsys.readouterr().out
    key_path, pub_path = tmp_path / "h1" / "h1.key", tmp_path / "h1" / "h1.pub"
    _, public = load_public_key_file(pub_path)
    assert str(key_path) in out and str(pub_path) in out
    assert fingerprint(public) in out
    assert "coordinator" in out and "never leaves" in out
    load_identity_key(key_path)

    assert main(["keys", "generate", "--hospital", "h2", "--out", str(tmp_path / "h2")]) == 0
    capsys.readouterr()
    pub2 = tmp_path / "h2" / "h2.pub"
    enrollment = tmp_path / "enrollment.json"
    assert main(["keys", "enroll", str(pub_path), str(pub2), "--out", str(enrollment)]) == 0
    out = capsys.readouterr().out
    fingerprint2 = fingerprint(load_public_key_file(pub2)[1])
    assert "2 hospital" in out and fingerprint(public) in out and fingerprint2 in out
    assert sorted(load_enrollment(enrollment)) == ["h1", "h2"]

    assert main(["keys", "show", str(enrollment)]) == 0
    out = capsys.readouterr().out
    assert f"h1  {fingerprint(public)}" in out and f"h2  {fingerprint2}" in out

    assert main(["keys", "show", str(pub2)]) == 0
    out = capsys.readouterr().out
    assert f"h2  {fingerprint2}" in out and "h1" not in out.replace(str(tmp_path), "")


def test_cli_refuses_to_overwrite_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    argv = ["keys", "generate", "--hospital", "h1", "--out", str(tmp_path)]
    assert main(argv) == 0
    before = (tmp_path / "h1.key").read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fedtune: error: ")
    assert "already exists" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""
    assert (tmp_path / "h1.key").read_bytes() == before


def test_cli_errors_for_enroll_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["keys", "show", str(tmp_path / "absent.pub")]) == 2
    assert "does not exist" in capsys.readouterr().err
    key_path, pub_path = generate_identity("h1", tmp_path)
    assert main(["keys", "show", str(key_path)]) == 2
    assert "give the .pub file" in capsys.readouterr().err
    assert main(["keys", "enroll", str(pub_path), str(pub_path), "--out", "x.json"]) == 2
    assert "appears twice" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["generate", "enroll", "show"])
def test_keys_help(action: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as caught:
        main(["keys", action, "--help"])
    assert caught.value.code == 0
    assert f"usage: fedtune keys {action}" in capsys.readouterr().out
