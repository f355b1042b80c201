"""`harness predict`: memory of any model x technique, without a GPU.

The command line of harness.predict.prediction's `predict`, which has two methods on the same
experiment file: `analytic` (harness.predict.analytic, from the config alone, instant) and
`simulated` (harness.predict.simulate, the runner's own step traced under fake tensors at full
size). `--save` writes each prediction to results/predictions/ for the
report; `--claims` predicts the configurations the report compares (claims ledger, matrix) and
what fits each card (results/fits/); `--solve` finds the longest sequence or largest
micro-batch that fits a card (harness.predict.solve).
"""

from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path

from harness import env, schema
from harness.env import HALF_DTYPES
from harness.architectures import UnsupportedArchitecture
from harness.cards import CARD_OF_SIZE, CARDS
from harness.arguments import like_field, parse_duration
from harness.config import experiment_files, resolve
from harness.predict.prediction import ALLOCATORS, PREDICTOR_MODULES, fits, predict
from harness.predict.speed import is_current
from harness.schema import CATEGORIES
from harness.techniques import NotSimulated


DEFAULT_TOKENS = 100e6  # the fine-tune whose time and price a speed prediction gives


def expand_plans(experiments_dir: Path, results_dir: Path | None = None) -> dict[tuple, list]:
    """Every plan's runs, by (plan, code path, dtypes emulated), on a card large enough for every block and as
    many GPUs as each asks for (harness.matrix.expand; the fit answers its blocks multiply confirmed by simulation
    where `results_dir` holds a current confirmation). A CPU plan runs some cells otherwise where bf16 and fp16
    are emulated: both CPUs' expansions are there."""
    from harness.config import MATRIX_FILE
    from harness.matrix import expand, load_matrix
    from harness.predict.fit_table import fit_answer

    matrix = load_matrix(experiments_dir / MATRIX_FILE)
    answer = partial(fit_answer, out_dir=results_dir)
    expanded = {}
    for plan in matrix:
        device_type = "cpu" if plan == "cpu" else "cuda"
        for emulated in ((frozenset(), frozenset(HALF_DTYPES)) if device_type == "cpu" else (frozenset(),)):
            expanded[plan, device_type, emulated] = expand(matrix, device_type, experiments_dir, experiments_dir,
                                                           plan=plan, device_gb=math.inf, emulated=emulated,
                                                           fit_answer=answer)[0]
    return expanded


def matrix_configurations(experiments_dir: Path, expanded: dict[tuple, list] | None = None
                          ) -> list[tuple[str, str, int, int, str, int]]:
    """Every (experiment, model, seq_len, micro-batch, code path, world size) the matrix's plans measure
    (expand_plans: given, or expanded here).

    The lab's pretrained base (its shape is a preset's) and the accumulation series (one
    micro-batch's memory, predicted at the experiment's own accumulation) are left out.
    """
    from harness.step.checkpoint import BASE_SOURCE

    own_accumulation = {path.stem: resolve(path).experiment.grad_accum for path in experiment_files(experiments_dir)}
    cells = []
    for (_, device_type, _), runs in (expanded or expand_plans(experiments_dir)).items():
        cells += [(name, e.model, e.seq_len, e.micro_batch, device_type, e.world_size)
                  for name, e in ((run.config.name, run.config.experiment) for run in runs if not run.left_to)
                  if e.model != BASE_SOURCE and e.grad_accum == own_accumulation[name]]
    return list(dict.fromkeys(cells))


def claim_configurations() -> list[tuple[str, str, int, int, str, int]]:
    """What the two ledgers read (the documents' claims, other projects' figures), on the CUDA path, one rank."""
    from harness.claims import PUBLISHED_FILE, evidence_configurations, load_claims

    claims = load_claims() + load_claims(PUBLISHED_FILE)
    return [(name, model, seq, batch, "cuda", 1) for name, model, seq, batch in evidence_configurations(claims)]


def _gpu_records(results_dir: Path) -> list[dict]:
    """The run records under `results_dir` (schema.find_records: no predictions, fits or attempts) of a GPU."""
    found = []
    for path in schema.find_records(results_dir):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # the report lists what it cannot read
        if isinstance(record, dict) and record.get("experiment") and (
                (record.get("environment") or {}).get("device_type") == "cuda"):
            found.append(record)
    return found


def record_configurations(results_dir: Path, experiments_dir: Path,
                          records: list[dict] | None = None) -> list[tuple[str, str, int, int, str, int]]:
    """The configuration of every run measured on a GPU under `results_dir` (<device>/*.json), one rank, at its
    experiment's own accumulation (a prediction is named without it), whatever plan ran it: the evidence passes
    run shapes and models no plan of the matrix names."""
    cells = []
    for record in _gpu_records(results_dir) if records is None else records:
        config = record.get("config") or {}
        experiment = experiments_dir / f"{record['experiment']}.yaml"
        if record.get("status") not in ("ok", "oom") or not experiment.exists() or (config.get("world_size") or 1) != 1:
            continue
        if (config.get("grad_accum") or 1) != resolve(experiment).experiment.grad_accum:
            continue
        cells.append((experiment.stem, record["model"], config["seq_len"], config["micro_batch"], "cuda", 1))
    return cells


def record_caps(results_dir: Path, records: list[dict] | None = None) -> dict[tuple, int]:
    """The allocator cap of each budget run among them, by its configuration: its prediction replays the caching
    allocator under the same cap (`budget_replay`), which the report compares its reserved bytes with."""
    caps = {}
    for record in _gpu_records(results_dir) if records is None else records:
        cap = (record.get("budget") or {}).get("cap_bytes")
        # a run under another allocator setting (PYTORCH_CUDA_ALLOC_CONF) is not what the replay replays
        if cap and not (record.get("environment") or {}).get("cuda_alloc_conf"):
            config = record.get("config") or {}
            caps[(record["experiment"], record.get("model"), config.get("seq_len"), config.get("micro_batch"))] = cap
    return caps


def matrix_caps(experiments_dir: Path, expanded: dict[tuple, list] | None = None) -> dict[tuple, int]:
    """The allocator cap of each one-GPU CUDA cell of the matrix's plans run under a budget (the boundary's
    probes), by its configuration: its simulated prediction replays the allocator under the cap it will run
    under (`budget_replay`), so whether the step fits the emulated card is predicted before a GPU measures it.
    expanded: expand_plans's (expanded here if not given)."""
    from harness.measure.budget import budget_cap_bytes

    caps = {}
    for (_, device_type, _), runs in (expanded or expand_plans(experiments_dir)).items():
        for run in runs if device_type == "cuda" else ():
            cfg = run.config.experiment
            # a cell under another allocator setting is not replayed here (a prediction replays torch's default
            # allocator): its probes bracket the fit answer with that setting, which --confirm-fits simulated
            if cfg.budget_gb and cfg.world_size == 1 and run.allocator is None:
                caps[(run.config.name, cfg.model, cfg.seq_len, cfg.micro_batch)] = budget_cap_bytes(
                    cfg.budget_gb, "cuda", run.config.technique)
    return caps


def report_configurations(experiments_dir: Path, results_dir: Path | None = None,
                          records: list[dict] | None = None, expanded: dict[tuple, list] | None = None
                          ) -> list[tuple[str, str, int, int, str, int]]:
    """What the report compares: (experiment, model, seq_len, batch, code path, world size). First the ledgers'
    configurations, then every cell of the matrix's plans (harness.lab.bench), then what the GPU runs under
    `results_dir` measured, so each measured run has both predictions beside it. expanded: expand_plans's."""
    measured = record_configurations(results_dir, experiments_dir, records) if results_dir else []
    return list(dict.fromkeys(claim_configurations() + matrix_configurations(experiments_dir, expanded) + measured))


def describe(prediction: schema.Prediction, budget_gb: float | None) -> str:
    lines = [f"{prediction.experiment} @ {prediction.model}, seq {prediction.seq_len} x batch "
             f"{prediction.micro_batch} ({prediction.method}, {prediction.seconds:.1f} s)"]
    for name in CATEGORIES:
        value = prediction.categories[name]
        lines.append(f"  {name:<16} {value / 2**30:9.3f} GiB {value / 1e9:9.3f} GB")
    total = prediction.total_bytes
    lines.append(f"  {'peak':<16} {total / 2**30:9.3f} GiB {total / 1e9:9.3f} GB")
    for name, value in (("reserved", prediction.reserved_bytes), ("device", prediction.device_bytes)):
        if value is not None:
            lines.append(f"  {name:<16} {value / 2**30:9.3f} GiB {value / 1e9:9.3f} GB"
                         + (f"  (allocator: {prediction.allocator})" if name == "reserved" else ""))
    if budget_gb:
        verdict = "fits" if fits(prediction, budget_gb) else "does not fit"
        lines.append(f"  a {budget_gb:g} GB card: {verdict}")
    if prediction.speed:
        lines.append(describe_speed(prediction.speed))
    return "\n".join(lines)


def describe_speed(speed: dict) -> str:
    """The speed lines: tokens/s, step time and its terms, and the time and price of the fine-tune."""
    terms = ", ".join(f"{name[:-2]} {speed[name] * 1e3:,.1f} ms" for name in ("host_s", "matmul_s", "memory_s",
                                                                            "optimizer_s") if name in speed)
    how = f"{speed['bound']}-bound" if "bound" in speed else "no host cost: a lower bound on the step"
    line = (f"  on {speed['gpu']} ({speed['method']}): {speed['tokens_per_s']:,.0f} tokens/s, step "
            f"{speed['step_time_s'] * 1e3:,.1f} ms ({terms}; {how})")
    cost = speed.get("fine_tune")
    if cost:
        price = (f", ${cost['cost_usd']:,.2f} at ${cost['price_per_hour']:.2f}/GPU-hour"
                 if cost["cost_usd"] is not None else " (no price for this card: --price)")
        line += f"\n  {cost['tokens'] / 1e6:,.0f}M tokens: {cost['hours']:,.1f} GPU-hours{price}"
    return line


def with_cost(speed: dict | None, tokens: float, price: float | None) -> dict | None:
    """speed with the time and price of fine-tuning `tokens` (price: the card's catalogue price if None)."""
    if not speed:
        return speed
    from harness.cards import card
    from harness.predict.speed import fine_tune_cost

    price = price if price is not None else card(speed["gpu"]).price_per_hour
    return {**speed, "fine_tune": fine_tune_cost(speed["tokens_per_s"], tokens, price)}


def _experiment_file(name_or_path: str, experiments_dir: Path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".yaml":
        return path
    return experiments_dir / f"{name_or_path}.yaml"


def main(args) -> int:
    experiments_dir = Path(args.experiments_dir)
    methods = ["analytic", "simulated"] if args.method == "both" else [args.method]
    if args.checkpointing and (args.save or args.claims):
        # a saved prediction is named after its experiment file alone: its file would say otherwise
        raise SystemExit("predict: --checkpointing is not saved (--save, --claims); use an experiment with "
                         "gradient_checkpointing: true, such as qlora-gc")
    overrides = {"gradient_checkpointing": True} if args.checkpointing else {}
    if args.speed_of_runs:
        from harness.predict.record_speed import predict_runs

        written = predict_runs(Path(args.results), Path(args.out), args.force)
        print(f"speed predictions: {len(written)} written under {Path(args.out)}")
        return 0
    if args.confirm_fits:
        from harness.predict.fit_table import confirm_fits

        counts = confirm_fits(experiments_dir, Path(args.out), args.jobs, args.time_budget)
        print(f"fit answers confirmed by simulation under {Path(args.out)}: {counts['searched']} searched, "
              f"{counts['failed']} failed, {counts['late']} left for a later run")
        _write_fit_table(Path(args.out), experiments_dir, args.force)
        return 1 if counts["failed"] else 0
    if args.solve:
        return _solve(args, experiments_dir, {**overrides, **({"world_size": args.world_size} if args.world_size else {})})
    # read and expanded once, for both uses below (the fit answers the boundary multiplies: confirmed ones where
    # --out holds them, as the fit table it writes)
    gpu_records = _gpu_records(Path(args.results)) if args.claims else []
    expanded = expand_plans(experiments_dir, Path(args.out)) if args.claims else {}
    if args.claims:
        jobs = [(experiments_dir / f"{name}.yaml", model, seq, batch, device_type, world_size)
                for name, model, seq, batch, device_type, world_size in report_configurations(
                    experiments_dir, Path(args.results), gpu_records, expanded)]
    else:
        if not args.model or not args.experiment:
            raise SystemExit("predict: --model and --experiment are required (or --claims)")
        jobs = [(_experiment_file(args.experiment, experiments_dir), args.model, args.seq, args.batch, args.device,
                 args.world_size or None)]
    results = []
    predictor = env.code_digest(PREDICTOR_MODULES)  # the code that would predict now
    # a budget run's recorded cap stands over the cap a matrix cell of the same configuration would run under
    caps = {**matrix_caps(experiments_dir, expanded), **record_caps(Path(args.results), gpu_records)} if args.claims else {}
    for experiment, model, seq, batch, device_type, world_size in jobs:
        ranks = {"world_size": world_size} if world_size else {}  # None: the experiment's own
        cap = caps.get((experiment.stem, model, seq, batch)) if device_type == "cuda" and (world_size or 1) == 1 else None
        for method in methods:
            path = schema.prediction_path(args.out, experiment.stem, model, seq, batch, device_type, method,
                                          world_size or 1)
            if args.claims and not args.force and path.exists():
                saved = schema.read(path, kind="prediction")
                replayed = method != "simulated" or cap is None or (
                    (saved.extra.get("budget_replay") or {}).get("cap_bytes") == cap)
                if saved.predictor == predictor and is_current(saved.speed) and replayed:
                    results.append(saved)
                    continue
            try:
                prediction = predict(experiment, model, seq, batch, method, device_type, {**overrides, **ranks},
                                     allocator=args.allocator, cap_bytes=cap, gpu=args.gpu)
                if prediction.speed:
                    prediction.speed = with_cost(prediction.speed, args.tokens, args.price)
            except (UnsupportedArchitecture, NotSimulated) as error:
                if len(methods) == 1:
                    raise
                print(f"{method}: {error}", file=sys.stderr)  # the other method still answers
                continue
            if args.save or args.claims:
                schema.write(path, prediction)
            results.append(prediction)
            if not args.json:
                print(describe(prediction, args.budget_gb), flush=True)
    if args.claims:
        _write_fit_table(Path(args.out), experiments_dir, args.force)
        _write_gpu_table(Path(args.out), experiments_dir, args.force)
        from harness.predict.record_speed import predict_runs  # what the report's speed check compares

        written = predict_runs(Path(args.results), Path(args.out), args.force)
        print(f"speed predictions of the GPU runs: {len(written)} written under {Path(args.out)}", file=sys.stderr)
    if args.json:
        out = [{**schema.to_dict(r), "fits": fits(r, args.budget_gb) if args.budget_gb else None}
               for r in results]
        json.dump(out[0] if len(out) == 1 else out, sys.stdout, indent=1)
        print()
    return 0


def _write_fit_table(out: Path, experiments_dir: Path, force: bool) -> None:
    """The report's "what fits my card" table (harness.predict.fit_table)."""
    from harness.predict.fit_table import fit_table, fit_table_predictor

    _write_table(schema.fit_table_path(out), "fit_table", lambda: fit_table_predictor(out),
                 lambda: fit_table(experiments_dir, out_dir=out), "what fits each card", force)


def _write_gpu_table(out: Path, experiments_dir: Path, force: bool) -> None:
    """The report's "how many GPUs" table (harness.predict.gpus)."""
    from harness.predict.gpus import gpu_count_table, gpu_table_predictor

    _write_table(schema.gpu_table_path(out), "gpu_count_table", gpu_table_predictor,
                 lambda: gpu_count_table(experiments_dir), "how many GPUs", force)


def _write_table(path: Path, kind: str, predictor, make, what: str, force: bool) -> None:
    """A table made again when the code that predicts it has changed (or when forced)."""
    if not force and path.exists():
        try:
            if schema.read(path, kind=kind).predictor == predictor():
                return
        except schema.RecordError:
            pass  # an unreadable or older table is made again
    table = make()
    schema.write(path, table)
    print(f"{what}: {len(table.rows)} answers ({table.method}, {table.seconds:.0f} s) -> {path}", flush=True)


def _solve(args, experiments_dir: Path, overrides: dict) -> int:
    from harness.predict.solve import describe as describe_answer
    from harness.predict.solve import solve

    if not args.model or not args.experiment or not args.card:
        raise SystemExit("predict --solve: --model, --experiment and --card are required")
    result = solve(_experiment_file(args.experiment, experiments_dir), args.model, args.card, args.solve,
                   seq_len=args.seq, micro_batch=args.batch, overrides=overrides, device_type=args.device,
                   simulate=args.method != "analytic", allocator=args.allocator, out_dir=Path(args.out))
    gpu = args.gpu or CARD_OF_SIZE.get(args.card)
    if gpu and result[f"max_{args.solve}"]:
        seq, batch = ((result["max_seq_len"], args.batch) if args.solve == "seq_len" else
                      (args.seq, result["max_micro_batch"]))
        method = "analytic" if args.method == "analytic" else "simulated"
        speed = predict(_experiment_file(args.experiment, experiments_dir), args.model, seq, batch, method,
                        args.device, overrides, gpu=gpu).speed
        result["speed"] = with_cost({**speed, "seq_len": seq, "micro_batch": batch}, args.tokens, args.price)
        result.update(tokens_per_s=speed["tokens_per_s"], step_time_s=speed["step_time_s"],
                      cost_usd=result["speed"]["fine_tune"]["cost_usd"])
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print(describe_answer(result))
        if result.get("speed"):
            print(f"  at seq {result['speed']['seq_len']:,} x batch {result['speed']['micro_batch']}:")
            print(describe_speed(result["speed"]))
    return 0


def _positive(value: str) -> float:
    import argparse

    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0 or math.isinf(number):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value!r}")
    return number


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="a preset, a config.json, a local model folder or a hub id")
    parser.add_argument("--experiment", help="an experiment name (experiments/NAME.yaml) or a YAML path")
    parser.add_argument("--seq", type=like_field("seq_len"), default=512, help="sequence length (default 512)")
    parser.add_argument("--batch", type=like_field("micro_batch"), default=1, help="micro-batch size (default 1)")
    parser.add_argument("--budget-gb", type=like_field("budget_gb", float),
                        help="say whether the step fits a card of this size as sold, in GB (24: 24 GiB; 141: H200)")
    parser.add_argument("--world-size", type=like_field("world_size"),
                        help="ranks the step is sharded over (an experiment with sharding): one rank's bytes")
    parser.add_argument("--checkpointing", action="store_true",
                        help="with gradient checkpointing (whatever the experiment says)")
    parser.add_argument("--solve", choices=["seq_len", "micro_batch"],
                        help="the longest sequence (at --batch) or the largest micro-batch (at --seq) that fits "
                             "--card: analytic search, confirmed by simulation unless --method analytic")
    parser.add_argument("--confirm-fits", action="store_true",
                        help="simulate the fit table's card-limited longest sequences and largest micro-batches at "
                             "their answers, and search below those that run out (harness.predict.confirm; resumes "
                             "where it stopped; about ten seconds of a CPU per simulated 7B step), then make the fit "
                             "table again")
    parser.add_argument("--jobs", type=like_field("world_size"), default=1,
                        help="with --confirm-fits: processes that search at once (default 1)")
    parser.add_argument("--time-budget", metavar="DURATION", type=parse_duration,
                        help="with --confirm-fits: start no search after this long (90s, 11m, 2h)")
    parser.add_argument("--card", type=like_field("budget_gb", float),
                        help="with --solve: the card's size as sold, in GB (24: a 24 GB card, 24 GiB; 141: H200)")
    parser.add_argument("--method", choices=["analytic", "simulated", "both"], default="both")
    parser.add_argument("--allocator", choices=list(ALLOCATORS), default="default",
                        help="the CUDA caching allocator's setting whose reserved and device bytes are predicted: "
                             "default, or expandable_segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="the device whose code path is predicted (default cuda)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (a list for several)")
    parser.add_argument("--save", action="store_true", help="also write results/predictions/*.json")
    parser.add_argument("--claims", action="store_true",
                        help="predict every configuration the report uses: the claims ledger's and the "
                             "default matrix's (skips saved ones)")
    parser.add_argument("--force", action="store_true", help="with --claims: predict again even if saved")
    parser.add_argument("--gpu", choices=list(CARDS),
                        help="also predict the step's time and tokens/s on this card (harness.cards); with --solve, "
                             "the card of --card's size unless given")
    parser.add_argument("--tokens", type=_positive, default=DEFAULT_TOKENS,
                        help="with --gpu: the GPU-hours and price of fine-tuning this many tokens (default 100e6)")
    parser.add_argument("--price", type=_positive,
                        help="with --gpu: USD per GPU-hour (default: the card's price in harness.cards)")
    parser.add_argument("--speed-of-runs", action="store_true",
                        help="predict the speed of every measured CUDA run in --results on its own card, into "
                             "--out/predictions/speed/ (what the report checks the speed model against)")
    parser.add_argument("--results", default="results",
                        help="with --speed-of-runs or --claims: the run records' folder")
    parser.add_argument("--out", default="results", help="results folder (default: results)")
    parser.add_argument("--experiments-dir", default="experiments")

