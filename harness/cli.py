"""Command line: `python -m harness run|bench|base|predict|probes|report|validate|list` (also installed as `harness`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.architectures import UnsupportedArchitecture
from harness.arguments import like_field, positive
from harness.config import ENGINE_NAMES, EXIT_BAD_CONFIG, ConfigError, experiment_files
from harness.engines import engine_help
from harness.lab.bench import add_arguments as add_bench_arguments
from harness.lab.pretrain import add_arguments as add_base_arguments
from harness.predict.command import add_arguments as add_predict_arguments
from harness.report import add_arguments as add_report_arguments


def _overrides(args) -> dict:
    chosen = {"model": args.model, "device": args.device, "budget_gb": args.budget_gb, "engine": args.engine,
              "world_size": getattr(args, "nproc", None)}
    return {k: v for k, v in chosen.items() if v is not None}


def cmd_run(args) -> int:
    from harness import schema
    from harness.config import resolve
    from harness.lab.bench import default_timeout
    from harness.lab.runner import CellBusy, check_ranks, run_config, summary_line

    config = resolve(args.experiment, _overrides(args))
    check_ranks(config, args.experiment, "--nproc" if args.nproc else "world_size", args.force_ranks)
    try:
        path, record = run_config(config, args.out, timeout_s=args.timeout or default_timeout(config))
    except CellBusy as busy:
        print(f"error: {busy}", file=sys.stderr)
        return 1
    print(summary_line(record))
    if schema.ATTEMPTS_FOLDER in path.parts:
        print(f"the cell keeps its record: {record.extra.get('kept_because', 'it measured nothing')}; "
              f"this attempt: {path}")
    else:
        print(f"record: {path}")
    return 0 if record.status in schema.FINISHED else 1


def cmd_bench(args) -> int:
    from harness.lab.bench import main as bench_main

    return bench_main(args)


def cmd_base(args) -> int:
    from harness.lab.pretrain import main as base_main

    return base_main(args)


def cmd_predict(args) -> int:
    from harness.predict.command import main as predict_main

    return predict_main(args)


def cmd_probes(args) -> int:
    from harness.lab.probes import PROBES, headline, run_probes

    unknown = sorted(set(args.only or ()) - set(PROBES))
    if unknown:
        print(f"error: unknown probe(s) {', '.join(unknown)}; known: {', '.join(PROBES)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    for path, result, ran in run_probes(args.out, args.weights, args.only, args.force):
        print(headline(result))
        print(f"  -> {path}" if ran else f"  (up to date: {path}; --force recomputes)")
    return 0


def cmd_report(args) -> int:
    from harness.report.render import main as report_main

    return report_main(args)


def cmd_validate(args) -> int:
    """Every file is checked and every bad one reported; exit status 2 if any is bad."""
    from harness.config import resolve

    if not args.files and not args.folder.is_dir():
        raise ConfigError(args.folder, "--folder", "no such folder")
    paths = args.files or experiment_files(args.folder)
    bad = 0
    for path in paths:
        try:
            config = resolve(path)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            bad += 1
            continue
        print(f"{path}: ok ({config.name}: technique {config.experiment.technique}, model {config.experiment.model})")
    if bad:
        print(f"{bad} of {len(paths)} experiment files are not valid", file=sys.stderr)
    return EXIT_BAD_CONFIG if bad else 0


def cmd_list(args) -> int:
    from harness.blocks.optimizers import OPTIMIZERS
    from harness.presets import PRESETS
    from harness.techniques import TECHNIQUES

    print("techniques:")
    for name, technique in TECHNIQUES.items():
        print(f"  {name:<11} {technique.summary}")
    print("optimizers: " + ", ".join(OPTIMIZERS))
    print("model presets: " + ", ".join(PRESETS))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one experiment file in a fresh process and write its record")
    run.add_argument("experiment", type=Path, help="an experiments/*.yaml file")
    run.add_argument("--model", help="model source: a preset, a config.json, a local folder or a hub id")
    run.add_argument("--out", type=Path, default=Path("results"), help="folder for the record (default: results)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument("--budget-gb", type=like_field("budget_gb", float), help="emulate a card of this size as sold, in GB (24: 24 GiB; see harness.measure.budget)")
    run.add_argument("--engine", choices=ENGINE_NAMES, help=f"the training loop (default harness): {engine_help()}")
    run.add_argument("--nproc", type=like_field("world_size"), help="ranks that train together (the experiment's "
                     "world_size; above 1 under torchrun, each rank measured, rank 0 writes the record)")
    run.add_argument("--timeout", type=positive(float), help="seconds before the run is killed and recorded as failed "
                     "(default: from its estimated time, harness.lab.bench.default_timeout)")
    run.add_argument("--force-ranks", action="store_true", help="start more ranks than this machine has devices "
                     "(CPU cores on a CPU)")
    run.set_defaults(func=cmd_run)

    bench = commands.add_parser("bench", help="run the experiment matrix for this device (resumable)")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    base = commands.add_parser("base", help="pretrain (once) the lab's own base model for loss comparisons")
    add_base_arguments(base)
    base.set_defaults(func=cmd_base)

    predict = commands.add_parser("predict", help="memory of a model x technique, analytic and simulated, no GPU")
    add_predict_arguments(predict)
    predict.set_defaults(func=cmd_predict)

    probes = commands.add_parser("probes", help="number formats, quantization error, accumulation equivalence (JSON)")
    probes.add_argument("--out", type=Path, default=Path("results/probes"), help="folder (default: results/probes)")
    probes.add_argument("--weights", help="model source whose linear weights the quantization probe uses "
                        "(default: the cached base checkpoint if any, else tiny-llama at random init)")
    probes.add_argument("--only", nargs="+", metavar="PROBE", help="run only these probes")
    probes.add_argument("--force", action="store_true", help="recompute probes whose file is up to date")
    probes.set_defaults(func=cmd_probes)

    report = commands.add_parser("report", help="render reports/index.md and index.html from results/ (no torch)")
    add_report_arguments(report)
    report.set_defaults(func=cmd_report)

    validate = commands.add_parser("validate", help="check experiment files without running them")
    validate.add_argument("files", nargs="*", type=Path)
    validate.add_argument("--folder", type=Path, default=Path("experiments"))
    validate.set_defaults(func=cmd_validate)

    listing = commands.add_parser("list", help="registered techniques, optimizers and model presets")
    listing.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.func(args))
    except (ConfigError, UnsupportedArchitecture) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    except KeyboardInterrupt:  # records are written atomically: nothing half-written stays behind
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
