"""The `fedad` command line: data tools, simulations and reports."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _data_synth(args: argparse.Namespace) -> int:
    from fedad.data import generate_dataset

    categories = args.categories.split(",") if args.categories else None
    root = generate_dataset(args.out, seed=args.seed, image_size=args.image_size,
                            num_train=args.num_train, categories=categories)
    print(f"wrote {root}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from fedad.data import DatasetError, validate_dataset

    try:
        for line in validate_dataset(args.dir, args.category or None):
            print(line)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _data_partitions(args: argparse.Namespace) -> int:
    from fedad.config import ExperimentConfig
    from fedad.experiment import prepare_data
    from partitions import partition_table

    cfg = ExperimentConfig(
        data_path=args.data_path, category=args.category, partitioner=args.partitioner,
        dirichlet_alpha=args.alpha, seed=args.seed, image_size=args.image_size,
    )
    data = prepare_data(cfg, args.num_partitions)
    print(f"{data.root} | categories: {', '.join(data.categories)} | "
          f"{cfg.partitioner} x {args.num_partitions}")
    print(partition_table(data.manifest).to_string())
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from fedad.simulation import run_simulation

    flwr_home = args.flwr_home or os.environ.get("FLWR_HOME") or tempfile.mkdtemp(
        prefix="fedad-flwr-")
    run_config = args.run_config or {}
    if args.resume_from:
        run_config = resume_run_config(args.resume_from, args.run_config)
    run = run_simulation(
        args.app, num_supernodes=args.num_supernodes, run_config=run_config,
        flwr_home=flwr_home, gpus_per_client=args.num_gpus, echo=True,
    )
    print(f"fedad: run {run.run_id} {run.status} in {run.seconds:.0f} s")
    results = re.search(r"results: (\S+)", run.log)
    if results:
        print(f"fedad: results in {results.group(1)}")
    return 0 if run.completed else 1


def resume_run_config(results_dir: str, extra: str = "") -> str:
    """The run-config text that resumes ``results_dir``: its saved config.yaml plus
    ``resume-from`` (and any ``extra`` text, which the server checks against the saved one)."""
    from fedad.config import ConfigError, ExperimentConfig
    from fedad.simulation import format_run_config

    saved = Path(results_dir).expanduser().resolve() / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume-from {results_dir}: {saved} not found")
    values = ExperimentConfig.from_yaml(saved).to_dict()
    values["resume-from"] = str(saved.parent)
    return " ".join(filter(None, [format_run_config(values), extra]))


def _report(args: argparse.Namespace) -> int:
    import pandas as pd

    from fedad.bench.report import is_sweep, run_report, sweep_report
    from fedad.bench.spec import SweepError
    from fedad.report_html import write_html_report

    root = Path(args.dir)
    try:
        if is_sweep(root):
            for path in [*sweep_report(root), write_html_report(root)]:
                print(f"wrote {path}")
            print((root / "table.md").read_text())
            return 0
        rounds, plots = run_report(root)
        plots.append(write_html_report(root))
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(rounds.to_markdown(index=False, floatfmt=".4f"))
    summary = root / "summary.json"
    if summary.exists():
        print(json.dumps(json.loads(summary.read_text())["final"], indent=2))
    per_type = root / "defect_types.csv"
    if per_type.exists():
        print("\nper defect type (last round):\n"
              + pd.read_csv(per_type).to_markdown(index=False, floatfmt=".3f"))
    print("\n".join(f"wrote {path}" for path in plots))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fedad.predict import (
        InputError,
        RunError,
        collect_inputs,
        load_scorer,
        open_run,
        predict_images,
        run_thresholds,
    )

    try:
        run = open_run(args.results_dir, args.round)
        thresholds = run_thresholds(run)
        thresholds = replace(thresholds, **{k: v for k, v in (
            ("image", args.threshold), ("pixel", args.pixel_threshold)) if v is not None})
        result = predict_images(load_scorer(run, args.device), collect_inputs(args.inputs),
                                args.out, thresholds, batch_size=args.batch_size)
    except (RunError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for line in result.skipped:
        print(f"skipped {line}", file=sys.stderr)
    anomalous = int((result.table["decision"] == "anomalous").sum())
    print(f"fedad: {run.cfg.method} round {run.round}: {len(result.table)} images scored, "
          f"{anomalous} anomalous (score >= {thresholds.image:g}), {len(result.skipped)} "
          "skipped")
    print("\n".join(f"wrote {path}" for path in result.written))
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedad.export import ExportError, export_and_check
    from fedad.predict import RunError, open_run

    try:
        run = open_run(args.results_dir, args.round)
        path, difference, checked = export_and_check(run, args.format, args.out,
                                                     args.check_images)
    except (RunError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"fedad: {run.cfg.method} round {run.round} -> {path} ({args.format})")
    print(f"check: {args.format} vs torch on {checked} test images: largest difference "
          f"{difference:.2g}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fedad.bench import SweepError, load_spec, run_sweep
    from fedad.bench.report import sweep_report

    try:
        spec = load_spec(args.config, overrides=args.overrides)
        base = Path(os.environ.get("FEDAD_RESULTS", Path.home() / "fedad-results"))
        out = Path(args.out) if args.out else base / "sweeps" / spec.name
        print(f"fedad: sweep {spec.name}: {len(spec.cells())} cells into {out}", flush=True)
        outcomes = run_sweep(spec, out, max_cells=args.max_cells or None)
        sweep_report(out, spec)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    print(f"fedad: {counts['done']} run, {counts['skipped']} already finished, "
          f"{counts['failed']} failed; tables in {out}")
    print((out / "table.md").read_text())
    return 1 if counts["failed"] else 0


def _config_reference(args: argparse.Namespace) -> int:
    from fedad.config_reference import render_reference

    sys.stdout.write(render_reference())
    return 0


def _deploy_errors(handler):
    """Report a DeployError (bad argument or file) as one line and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        from fedad.deploy import DeployError

        try:
            return handler(args)
        except DeployError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1

    return run


@_deploy_errors
def _deploy_certs(args: argparse.Namespace) -> int:
    from fedad.deploy import create_ca, create_server_certificate, subject_alternative_names

    subject_alternative_names(args.san)  # refuse bad names before writing anything
    ca = create_ca(args.out, days=args.days)
    server = create_server_certificate(ca, args.out, args.san, days=args.days)
    print(f"CA: {ca.cert} (give it to every site as --root-certificates; keep {ca.key} safe)")
    print(f"SuperLink: {server.cert} {server.key} (SAN: {', '.join(args.san)})")
    return 0


@_deploy_errors
def _deploy_keys(args: argparse.Namespace) -> int:
    from fedad.deploy import create_node_key

    for i in range(args.sites):
        key = create_node_key(args.out, f"site-{i}")
        print(f"site {i}: {key.private} (stays on the site), {key.public} (register it)")
    return 0


@_deploy_errors
def _deploy_connection(args: argparse.Namespace) -> int:
    from fedad.deploy import write_connection

    home = args.flwr_home or os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    path = write_connection(home, args.name, args.address, args.root_certificates,
                            default=args.default)
    print(f"connection {args.name!r} -> {args.address} (TLS) written to {path}")
    return 0


@_deploy_errors
def _deploy_register(args: argparse.Namespace) -> int:
    from fedad.deploy import register_node

    for key in args.public_keys:
        print(f"{key}: node {register_node(key, args.connection)}")
    return 0


@_deploy_errors
def _deploy_commands(args: argparse.Namespace) -> int:
    from fedad.deploy import CertificateFiles, superlink_command, supernode_command

    certs, keys = Path(args.certs).resolve(), Path(args.keys).resolve()
    server = CertificateFiles(certs / "server.pem", certs / "server.key")
    print("# on the server")
    print(_portable(superlink_command(server, certs / "ca.crt", port=args.port)))
    for i in range(args.sites):
        data = args.data_path.format(i=i)
        print(f"# on site {i}")
        print(_portable(supernode_command(f"{args.host}:{args.port}", certs / "ca.crt",
                                          keys / f"site-{i}", partition_id=i, data_path=data)))
    return 0


def _portable(command: list[str]) -> str:
    """A command line to paste on another machine: the Flower tool by its bare name."""
    import shlex

    return shlex.join([Path(command[0]).name, *command[1:]])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `fedad`."""
    parser = argparse.ArgumentParser(prog="fedad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets: synthesize, check, partition").add_subparsers(
        dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the built-in synthetic MVTec-format dataset")
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--num-train", type=int, default=60, help="good training images")
    synth.add_argument("--categories", default="", help="comma list (default: all)")
    synth.set_defaults(func=_data_synth)
    check = data.add_parser("check", help="validate a folder in the MVTec AD layout")
    check.add_argument("dir")
    check.add_argument("--category", action="append")
    check.set_defaults(func=_data_check)
    parts = data.add_parser("partitions", help="per-client counts by defect type")
    parts.add_argument("--data-path", default="", help="MVTec root (default: built-in data)")
    parts.add_argument("--category", default="")
    parts.add_argument("--partitioner", default="iid")
    parts.add_argument("--num-partitions", type=int, default=4)
    parts.add_argument("--alpha", type=float, default=0.5)
    parts.add_argument("--seed", type=int, default=0)
    parts.add_argument("--image-size", type=int, default=128)
    parts.set_defaults(func=_data_partitions)

    sim = sub.add_parser("simulate", help="`flwr run` a simulation and check it completed")
    sim.add_argument("--app", default=str(PROJECT_ROOT))
    sim.add_argument("--num-supernodes", type=int, default=4)
    sim.add_argument("--run-config", default="", help="e.g. \"num-server-rounds=3 lr=0.001\"")
    sim.add_argument("--num-gpus", type=float, default=0.0,
                     help="GPU share each simulated site reserves (client-resources-num-gpus; "
                          "0.25: four sites at a time per GPU; 0: none)")
    sim.add_argument("--flwr-home", default="")
    sim.add_argument("--resume-from", default="",
                     help="continue an interrupted run from its results folder (same config)")
    sim.set_defaults(func=_simulate)

    bench = sub.add_parser("bench", help="run a YAML sweep of simulations (resumable) into "
                           "tables and plots")
    bench.add_argument("config", help="sweep file, e.g. configs/strategies.yaml")
    bench.add_argument("--out", default="",
                       help="sweep folder (default: $FEDAD_RESULTS or ~/fedad-results, "
                            "/sweeps/<name>); a rerun skips its finished cells")
    bench.add_argument("--max-cells", type=int, default=0,
                       help="stop after running this many cells (0: all)")
    bench.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="override a run-config value of the sweep file (repeatable; a "
                            "swept key takes that one value), e.g. data-path=~/fedad-real")
    bench.set_defaults(func=_bench)

    report = sub.add_parser("report", help="rebuild plots and tables of a results folder or "
                            "of a sweep folder")
    report.add_argument("dir")
    report.set_defaults(func=_report)

    predict = sub.add_parser("predict", help="score images with a run's global model: "
                             "predictions.csv, overlays, masks, a grid of the most anomalous")
    predict.add_argument("results_dir", help="a finished run's results folder")
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files, folders, or an MVTec AD category folder (its test "
                              "images)")
    predict.add_argument("--out", required=True, help="folder for the outputs")
    predict.add_argument("--round", type=int, default=None,
                         help="the round's global model (default: the last)")
    predict.add_argument("--threshold", type=float, default=None,
                         help="image decision threshold on the [0, 1] score (default: the "
                              "run's)")
    predict.add_argument("--pixel-threshold", type=float, default=None,
                         help="threshold of the binary masks on the [0, 1] map (default: the "
                              "run's)")
    predict.add_argument("--batch-size", type=int, default=4,
                         help="images per forward pass (a feature head's enlarged views take "
                              "tens of MB each)")
    predict.add_argument("--device", default="auto",
                         help="where to score: auto (CUDA if present, else CPU), cpu, cuda:N, "
                              "mps (the machine on the line, not the one the run trained on)")
    predict.set_defaults(func=_predict)

    export = sub.add_parser("export", help="a run's global model as ONNX, TorchScript or "
                            "OpenVINO (image tensor -> score, map), checked against torch")
    export.add_argument("results_dir", help="a finished run's results folder")
    export.add_argument("--format", required=True, help="onnx, torchscript or openvino")
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument("--round", type=int, default=None,
                        help="the round's global model (default: the last)")
    export.add_argument("--check-images", type=int, default=None,
                        help="test images the check runs (default: all)")
    export.set_defaults(func=_export)

    config = sub.add_parser("config", help="run-config keys").add_subparsers(
        dest="config_command", required=True)
    config.add_parser("reference", help="print the Markdown reference of every run-config key "
                      "(docs/config.md)").set_defaults(func=_config_reference)

    deploy = sub.add_parser("deploy", help="multi-site deployment: TLS certificates, node "
                            "keys, connection, registration").add_subparsers(
        dest="deploy_command", required=True)
    certs = deploy.add_parser("certs", help="a CA and the SuperLink's TLS certificate")
    certs.add_argument("--out", required=True, help="folder for ca.crt, server.pem and keys")
    certs.add_argument("--san", action="append", required=True,
                       help="IP or DNS name the sites use to reach the SuperLink (repeatable)")
    certs.add_argument("--days", type=int, default=365)
    certs.set_defaults(func=_deploy_certs)
    keys = deploy.add_parser("keys", help="one ECDSA authentication key pair per site")
    keys.add_argument("--out", required=True)
    keys.add_argument("--sites", type=int, required=True)
    keys.set_defaults(func=_deploy_keys)
    conn = deploy.add_parser("connection", help="add a TLS SuperLink connection to "
                             "$FLWR_HOME/config.toml (for flwr run / flwr supernode register)")
    conn.add_argument("--name", default="fedad")
    conn.add_argument("--address", required=True, help="HOST:PORT of the SuperLink")
    conn.add_argument("--root-certificates", required=True, help="the CA certificate")
    conn.add_argument("--flwr-home", default="", help="default: $FLWR_HOME or ~/.flwr")
    conn.add_argument("--default", action="store_true", help="make it the default connection")
    conn.set_defaults(func=_deploy_connection)
    register = deploy.add_parser("register", help="flwr supernode register each public key")
    register.add_argument("public_keys", nargs="+")
    register.add_argument("--connection", default="fedad")
    register.set_defaults(func=_deploy_register)
    commands = deploy.add_parser("commands", help="print the SuperLink and SuperNode commands")
    commands.add_argument("--certs", required=True, help="the folder of `deploy certs`")
    commands.add_argument("--keys", required=True, help="the folder of `deploy keys`")
    commands.add_argument("--host", required=True, help="the SuperLink's address (a SAN)")
    commands.add_argument("--port", type=int, default=8000)
    commands.add_argument("--sites", type=int, required=True)
    commands.add_argument("--data-path", default="/data/mvtec",
                          help="each site's data folder; {i} is replaced by the site number")
    commands.set_defaults(func=_deploy_commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fedad`."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
