"""`harness bench`: expand a plan of the matrix (by default this device's), run what is missing, summarise.

With `--time-budget`, no run starts whose estimated time (harness.lab.estimate) exceeds what is
left, so a short GPU lease is spent on the plan's first, most valuable cells (on a GPU, those no
card has measured before any measured again); `--dry-run` prints the plan with those estimates. Each run is a fresh process (harness.lab.runner). A run
whose record already exists for the same resolved configuration and environment
fingerprint is skipped, so an interrupted matrix, even one killed with SIGKILL, resumes
with exactly the runs it lacks: records are written atomically, and a run that was cut
off left no record behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from functools import partial
from pathlib import Path

from harness import env, schema
from harness.arguments import like_field, parse_duration, positive
from harness.config import ENGINE_NAMES, MATRIX_FILE, ConfigError, ResolvedConfig
from harness.engines import engine_help
from harness.lab import launcher
from harness.lab.estimate import estimate_run
from harness.lab.runner import (
    CellBusy,
    cell_leftovers,
    check_ranks,
    keep_record,
    remove_stale_attempts,
    run_config,
    summary_line,
    why_kept,
)
from harness.matrix import PlannedRun, allocator_fingerprint, expand, load_matrix
from harness.predict.fit_table import fit_answer
from harness.step.checkpoint import BASE_SOURCE, base_checkpoint_path

# Memory held on the GPU by others beyond this means a polluted peak (a bare context is less).
SHARED_GPU_THRESHOLD = 1 * 2**30
# Under a time budget a run is stopped at this many times its estimate (never sooner than the minimum).
BUDGET_OVERRUN_FACTOR = 4
BUDGET_MIN_TIMEOUT_S = 180
# Without --timeout a run is still stopped (and recorded) at the same multiple of its estimate, never sooner
# than this: the estimate is a GPU's, and on 2 CPU cores the slowest run of the cpu-full plan takes minutes.
DEFAULT_MIN_TIMEOUT_S = {"cuda": BUDGET_MIN_TIMEOUT_S, "cpu": 3600.0}
NO_ESTIMATE_TIMEOUT_S = 6 * 3600.0  # a model whose shape cannot be read before the run


def expected_fingerprint(run: PlannedRun, fingerprint: str, environment: dict | None) -> str:
    """The fingerprint a current record of this run has: the launching environment's (`fingerprint`), or, for a
    run under an allocator setting, that environment's with the setting its worker records."""
    if run.allocator is None:
        return fingerprint
    if environment is None:
        raise ValueError(f"{run.path.name}: a run under an allocator setting needs the launching environment")
    return allocator_fingerprint(environment, run.allocator)


def is_current(path: Path, fingerprint: str) -> bool:
    """A finished record (ok or oom) for the same configuration on the same environment."""
    if not path.exists() or why_kept(path) is not None:
        return False
    record = schema.read(path, kind="run")
    return record.status in schema.MEASURED and record.fingerprint == fingerprint


def measured_on_a_gpu(run: PlannedRun) -> bool:
    """A finished record of this very configuration in a GPU's folder of the same results tree
    (another card's, or this card's by older code or software)."""
    results = run.path.parent.parent
    for folder in results.iterdir() if results.is_dir() else ():
        other = folder / run.path.name
        if folder == results / "cpu" or not other.exists():
            continue
        try:
            if schema.read(other, kind="run").status in schema.MEASURED:
                return True
        except (OSError, ValueError):
            continue
    return False


def new_evidence_first(planned: list[PlannedRun]) -> list[PlannedRun]:
    """Under a time budget on a GPU, cells no card has measured go before measuring one again.

    The plan's order stands within each group: a lease is short, and a cell measured nowhere
    decides more than the same cell measured a second time.
    """
    return sorted(planned, key=measured_on_a_gpu)


def other_gpu_users() -> str | None:
    """What other processes hold on the GPU, or None if it is free for a clean measurement."""
    users = env.gpu_users()
    if users is None:
        return None
    used, pids = users
    if pids or used > SHARED_GPU_THRESHOLD:
        return f"{used / 2**30:.2f} GiB already in use on the GPU (processes: {', '.join(map(str, pids)) or 'unknown'})"
    return None


def clean_interrupted_writes(out_dir: Path) -> None:
    """Interrupted writes and attempts; a cell's only where no process is measuring it now."""
    cells = set(cell_leftovers(out_dir))
    for tmp in out_dir.rglob(".*.tmp"):
        if tmp not in cells:
            tmp.unlink(missing_ok=True)
    remove_stale_attempts(out_dir)


def estimate_runs(planned: list[PlannedRun], device_type: str) -> None:
    """Fill each run's estimated GPU time (harness.lab.estimate), from its model's shape, read without
    running a model's own code or asking the network; None where the shape cannot be read so."""
    from harness.presets import PRESETS, preset_config
    from harness.step.checkpoint import recipe_for

    configs: dict[str, object] = {}
    for run in planned:
        model = run.config.experiment.model
        if model not in configs:
            if model == BASE_SOURCE:  # the shape of the recipe's preset, pretrained or not
                configs[model] = preset_config(recipe_for(device_type).preset)
            elif model in PRESETS:  # its shape is its config: nothing to resolve
                configs[model] = preset_config(model)
            else:
                from harness.step.models import resolve_source

                try:
                    configs[model] = resolve_source(model, device_type=device_type).config
                except ConfigError as error:
                    print(f"  no estimate for {model}: {error}", flush=True)
                    configs[model] = None
        run.estimate = estimate_run(run.config, configs[model]) if configs[model] is not None else None


def default_timeout(config: ResolvedConfig, estimate=None) -> float:
    """A run's time limit where none is given: a multiple of its estimate, at least the device's minimum."""
    device_type = env.resolve_device(config.experiment.device)
    if estimate is None:
        planned = [PlannedRun(config, 0, Path(), "")]
        estimate_runs(planned, device_type)
        estimate = planned[0].estimate
    if estimate is None:
        return NO_ESTIMATE_TIMEOUT_S
    return max(BUDGET_OVERRUN_FACTOR * estimate.seconds, DEFAULT_MIN_TIMEOUT_S[device_type])


def _label(index: int, total: int, run: PlannedRun) -> str:
    cell = run.config.experiment
    return (f"[{index}/{total}] {run.config.name} @ {cell.model} seq {cell.seq_len}"
            f" x{cell.micro_batch}x{cell.grad_accum}"
            + (f" budget {cell.budget_gb:g} GB" if cell.budget_gb else "")
            + (f" in {cell.engine}" if cell.engine != "harness" else "")
            + (f" with {run.allocator}" if run.allocator else "")
            + (f" repeat {run.repeat}" if run.repeat else ""))


def print_plan(planned: list[PlannedRun], fingerprint: str, budget_s: float | None, stream=sys.stdout,
               environment: dict | None = None) -> list[PlannedRun]:
    """The dry run: each run with its estimate, in order; returns the runs a budget would leave out.

    It applies the rule the real pass applies, as if every estimate were exact.
    """
    left = budget_s
    left_out = []
    total = len(planned)
    for index, run in enumerate(planned, 1):
        label = _label(index, total, run)
        if run.left_to:
            print(f"  {label}: not run on this CPU: {run.left_to}", file=stream)
            continue
        if is_current(run.path, expected_fingerprint(run, fingerprint, environment)):
            print(f"  {label}: done before", file=stream)
            continue
        estimate = run.estimate.seconds if run.estimate else None
        if left is not None and estimate is not None and estimate > left:
            left_out.append(run)
            print(f"  {label}: {estimate:6.0f} s  NOT STARTED: over the {left:.0f} s left of the budget", file=stream)
            continue
        if left is not None and estimate is not None:
            left -= estimate
        text = run.estimate.describe() if run.estimate else "no estimate"
        after = f"  ({left:.0f} s left)" if left is not None else ""
        print(f"  {label}: {text}{after}", file=stream)
    return left_out


def leave_to_another_machine(run: PlannedRun, environment: dict) -> schema.RunRecord | str:
    """A cell the plan does not run on this CPU, whose compute dtype is only emulated here: a `skipped`
    record saying why; or, where the cell has a measurement already (from a machine that computes in that
    dtype) or a file this code may not replace, why that stays as it is."""
    kept = why_kept(run.path)
    if kept is not None:
        return kept
    if run.path.exists() and schema.read(run.path, kind="run").status in schema.MEASURED:
        return "the measurement made elsewhere stays"
    config = run.config.run(uuid.uuid4().hex)
    record = schema.RunRecord(
        status="skipped", experiment=config.name, model=config.experiment.model, config=config.as_dict(),
        config_hash=config.config_hash, finished_at=env.now(), environment=environment,
        fingerprint=env.fingerprint(environment), emulated=run.left_to,
        error=schema.RunError("EmulatedHere", run.left_to))
    keep_record(run.path, record)
    return record


def run_matrix(planned: list[PlannedRun], fingerprint: str, *, force: bool = False, allow_shared_gpu: bool = False,
               timeout_s: float | None = None, budget_s: float | None = None, environment: dict | None = None,
               stream=sys.stdout) -> list[schema.RunRecord]:
    """Run what is missing, in order; returns every planned run's record (the ones skipped included).

    With a time budget (seconds, from now), a run whose estimate exceeds what is left is not
    started (later, smaller runs still may be), and no run may outlast the budget. A cell the plan
    leaves to another machine (`left_to`) gets a skipped record saying why (`environment`: this one's).
    """
    results = []
    not_started: Counter[str] = Counter()  # why -> how many
    total = len(planned)
    deadline = time.monotonic() + budget_s if budget_s is not None else None
    for index, run in enumerate(planned, 1):
        label = _label(index, total, run)
        if run.left_to:
            try:
                left = leave_to_another_machine(run, environment or {})
            except CellBusy as busy:
                print(f"{label}: not started: {busy}", file=stream, flush=True)
                not_started["measured by another process now"] += 1
                continue
            if isinstance(left, str):
                print(f"{label}: not run on this CPU ({run.left_to}); {left}", file=stream, flush=True)
                continue
            print(f"{label}: {summary_line(left)}", file=stream, flush=True)
            results.append(left)
            continue
        if not force and is_current(run.path, expected_fingerprint(run, fingerprint, environment)):
            record = schema.read(run.path, kind="run")
            print(f"{label}: done before, skipped ({record.status})", file=stream, flush=True)
            results.append(record)
            continue
        kept = None if force else why_kept(run.path)
        if kept is not None:  # a record a rerun may not replace: measuring it again would be filed beside it
            print(f"{label}: not started: {kept}; it is kept as it is (--force measures it again beside it)",
                  file=stream, flush=True)
            not_started["its record is kept as it is"] += 1
            continue
        run_timeout = timeout_s or default_timeout(run.config, run.estimate)
        if deadline is not None:
            left = deadline - time.monotonic()
            if run.estimate is None:
                print(f"{label}: not started: no estimate to fit in the time budget", file=stream, flush=True)
                not_started["no estimate for the time budget"] += 1
                continue
            if run.estimate.seconds > left:
                print(f"{label}: not started: estimated {run.estimate.seconds:.0f} s, {max(left, 0):.0f} s left "
                      "of the time budget", file=stream, flush=True)
                not_started["not within the time budget"] += 1
                continue
            # a run that overruns its estimate badly is stopped (and recorded) rather than eat the budget
            limit = min(left, max(BUDGET_OVERRUN_FACTOR * run.estimate.seconds, BUDGET_MIN_TIMEOUT_S))
            run_timeout = min(run_timeout, limit)
        polluted = other_gpu_users() if run.config.experiment.device == "cuda" else None
        if polluted and not allow_shared_gpu:
            raise SystemExit(f"refusing to measure on a shared GPU: {polluted} "
                             "(--allow-shared-gpu records it anyway, marked)")
        estimate = f" (estimated {run.estimate.seconds:.0f} s)" if run.estimate else ""
        print(f"{label}{estimate} ...", file=stream, flush=True)
        started = time.perf_counter()
        try:
            path, record = run_config(run.config, run.path.parent.parent, run.repeat, run_timeout,
                                      allocator=run.allocator)
        except CellBusy as busy:
            print(f"    not started: {busy}", file=stream, flush=True)
            not_started["measured by another process now"] += 1
            continue
        if polluted or run.shortened:
            record.shared_gpu = polluted  # the peak may include another process's memory
            record.emulated = run.shortened  # a CPU that emulates the cell's dtype ran it shorter
            schema.write(path, record)
        print(f"    {time.perf_counter() - started:6.1f} s  {summary_line(record)}", file=stream, flush=True)
        results.append(record)
    for why, count in not_started.items():
        print(f"{count} of {total} runs not started: {why}" + ("" if why.startswith("its record") else
              "; the same command resumes them"), file=stream, flush=True)
    return results


def summary_table(results: list[schema.RunRecord]):
    """One row per run, OOM and failed rows included."""
    import pandas as pd

    rows = []
    for record in results:
        config, memory, throughput = record.config, record.memory, record.throughput
        mfu = (throughput.mfu or {}).get("mfu") if throughput else None
        rows.append({
            "experiment": record.experiment, "model": record.model, "seq": config["seq_len"],
            "mb x k": f"{config['micro_batch']}x{config['grad_accum']}",
            "budget GB": config.get("budget_gb") or "",
            "status": record.status if record.status != "oom" else f"oom ({record.error.phase})",
            "peak alloc GiB": _gib(memory and memory.peak_allocated),
            "reserved GiB": _gib(memory and memory.peak_reserved),
            "device used GiB": _gib(memory and memory.peak_device_used),
            "tokens/s": round(throughput.tokens_per_s) if throughput else "",
            "MFU %": f"{100 * mfu:.1f}" if mfu else "",
            "final loss": f"{record.loss.final:.4f}" if record.loss and record.loss.final else "",
            "trainable %": f"{record.parameters.trainable_pct:.2f}" if record.parameters else "",
        })
    return pd.DataFrame(rows)


def _gib(value) -> str:
    return f"{value / 2**30:.3f}" if value else ""


def repeat_consistency(results: list[schema.RunRecord]) -> list[str]:
    """Repeats of one configuration should peak at the same bytes; say where they do not."""
    by_config: dict[tuple, list[schema.RunRecord]] = {}
    for record in results:
        if record.status == "ok":
            by_config.setdefault((record.experiment, record.config_hash), []).append(record)
    messages = []
    for (name, _), group in by_config.items():
        if len(group) < 2:
            continue
        peaks = {r.memory.peak_allocated for r in group}
        speeds = [r.throughput.tokens_per_s for r in group]
        spread = (max(speeds) - min(speeds)) / min(speeds)
        state = "identical peak memory" if len(peaks) == 1 else f"PEAK MEMORY DIFFERS: {sorted(peaks)}"
        messages.append(f"{name}: {len(group)} repeats, {state}; tokens/s spread {100 * spread:.1f}%")
    return messages


def main(args) -> int:
    experiments_dir = Path(args.experiments_dir)
    matrix_path = Path(args.matrix) if args.matrix else experiments_dir / MATRIX_FILE
    out_dir = Path(args.out)
    device_type = env.resolve_device(args.device)
    matrix = load_matrix(matrix_path)
    budget_s = args.time_budget
    if args.launcher != "local" and budget_s is not None:
        raise ConfigError("harness bench", "--time-budget", "applies to the local launcher; a cluster job's limit "
                          "is --time-limit (or launcher.time_limit in the matrix file)")
    settings = launcher.load_settings(matrix_path, launcher.settings_overrides(args))
    device_gb = args.device_gb or (env.gpu_total_gb() if device_type == "cuda" else None)
    # A cluster job gets the GPUs its cell asks for; this machine has its own (none: a CUDA plan read on a
    # machine without a GPU, as a dry run does, plans every cell).
    devices = args.devices or ((env.gpu_count() or None) if args.launcher == "local" else None)

    def plan():
        planned, skipped = [], []
        for name in (args.plan.split(",") if args.plan else [None]):  # several plans: one after the other
            runs, notes = expand(
                matrix, device_type, experiments_dir, out_dir, plan=name, models=args.model and [args.model],
                experiments=args.experiments, budgets_gb=args.budget_gb and [args.budget_gb],
                seq_lens=args.seq_len and [args.seq_len], engines=args.engine and [args.engine], repeat=args.repeat,
                device_gb=device_gb, devices=devices, emulated=env.emulated_dtypes(device_type),
                fit_answer=partial(fit_answer, out_dir=out_dir))
            planned += [run for run in runs if run.path not in {done.path for done in planned}]
            skipped += notes
        if budget_s is not None or args.dry_run:  # a run's default time limit estimates it as it starts
            estimate_runs(planned, device_type)
        if budget_s is not None and device_type == "cuda":
            planned = new_evidence_first(planned)
        return planned, skipped

    planned, skipped = plan()
    for run in planned if args.launcher == "local" and not args.dry_run else ():
        check_ranks(run.config, matrix_path, "world_sizes", args.force_ranks)
    environment = env.current_environment(device_type)
    if device_type == "cuda" and os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        # the workers inherit a setting of the user's, and their records name it (harness.env.run_environment):
        # so does the fingerprint a current record is known by, or every run would be measured again
        environment["cuda_alloc_conf"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    fingerprint = env.fingerprint(environment)
    card = f", a {device_gb:g} GB card" if device_gb else ""
    budget = f", time budget {budget_s:.0f} s" if budget_s is not None else ""
    print(f"plan '{args.plan or device_type}' of {matrix_path} on {environment['device_name']}{card}: "
          f"{len(planned)} runs{budget}", flush=True)
    for note in skipped:
        print(f"  not on this device: {note}")
    emulated = env.emulated_dtypes(device_type)
    if emulated:
        shorter, elsewhere = sum(bool(r.shortened) for r in planned), sum(bool(r.left_to) for r in planned)
        print(f"  this CPU ({env.cpu_features()['capability']}) only emulates {' and '.join(sorted(emulated))} "
              f"matrix products: {shorter} runs are shortened and {elsewhere} left to a machine that computes "
              "in them (experiments/matrix.yaml: if_emulated)")
    if args.status:
        return launcher.print_status(planned, out_dir)
    if args.dry_run:
        left_out = print_plan(planned, fingerprint, budget_s, environment=environment)
        if left_out:
            print(f"{len(left_out)} runs would not start within the budget (a later pass resumes them)")
        return 0
    clean_interrupted_writes(out_dir)
    if args.launcher != "local":  # one job per cell; the base model is pretrained on the cluster, by hand
        return launcher.launch([run for run in planned if not run.left_to], args.launcher, settings, out_dir, force=args.force, timeout_s=args.timeout,
                               wait=args.wait)
    if (any(run.config.experiment.model == BASE_SOURCE and not run.left_to for run in planned)
            and base_checkpoint_path(device_type) is None):
        # Runs on the lab's own base need it pretrained first (once; cached).
        print("pretraining the base model the loss comparison fine-tunes (once) ...", flush=True)
        pretraining = subprocess.run([sys.executable, "-m", "harness", "base", "--device", device_type,
                                      "--out", str(out_dir)])
        if pretraining.returncode:  # its runs then fail with a record saying so; the others go on
            print(f"pretraining the base failed (exit {pretraining.returncode}): runs on it will fail", flush=True)
        planned, _ = plan()  # the fine-tunes' configurations name the checkpoint now made
    try:
        results = run_matrix(planned, fingerprint, force=args.force, allow_shared_gpu=args.allow_shared_gpu,
                             timeout_s=args.timeout, budget_s=budget_s, environment=environment)
    except KeyboardInterrupt:  # the run in progress was stopped and left no record: it resumes next time
        done = sum(is_current(run.path, expected_fingerprint(run, fingerprint, environment)) for run in planned)
        print(f"\ninterrupted: {done} of {len(planned)} runs have a current record; the same command resumes",
              flush=True)
        return 130
    print()
    print(summary_table(results).to_string(index=False) if results else "no run has a record from this pass")
    for message in repeat_consistency(results):
        print(message)
    if device_type == "cpu":
        print("\nCPU run: memory is tracked tensor bytes, time is CPU time; neither is a GPU figure.")
    return 0 if all(r.status in schema.FINISHED for r in results) else 1


def add_arguments(parser) -> None:
    parser.add_argument("--matrix", help=f"matrix file (default: EXPERIMENTS_DIR/{MATRIX_FILE})")
    parser.add_argument("--experiments-dir", default="experiments")
    parser.add_argument("--out", default="results", help="results folder (default: results)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model", help="run every block on this model source instead")
    parser.add_argument("--experiments", nargs="+", metavar="NAME", help="run only these experiments")
    parser.add_argument("--budget-gb", type=like_field("budget_gb", float),
                        help="emulate a card of this size as sold, in GB (24: 24 GiB), in every run")
    parser.add_argument("--seq-len", type=like_field("seq_len"), help="use this sequence length in every run")
    parser.add_argument("--engine", choices=ENGINE_NAMES, help=f"run every block in this training loop: {engine_help()}")
    parser.add_argument("--repeat", type=positive(int), default=1, help="run each configuration N times")
    parser.add_argument("--force", action="store_true", help="rerun even where a current record exists")
    parser.add_argument("--allow-shared-gpu", action="store_true",
                        help="measure even if other processes hold GPU memory (records are marked)")
    parser.add_argument("--timeout", type=positive(float), help="seconds per run before it is killed and recorded "
                        "(default: from each run's estimated time)")
    parser.add_argument("--force-ranks", action="store_true", help="start cells of more ranks than this machine has "
                        "devices (CPU cores on a CPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the planned runs with their estimated GPU time and stop")
    parser.add_argument("--plan", help="a plan of the matrix file (default: the device type's, cpu or cuda), or "
                        "several, comma-separated, run one after the other; e.g. boundary,evidence: the GPU pass")
    parser.add_argument("--time-budget", metavar="DURATION", type=parse_duration,
                        help="start no run whose estimated time exceeds what is left (e.g. 11m, 600s)")
    parser.add_argument("--device-gb", type=positive(float),
                        help="plan for a card of this many GB (default: the GPU's own; useful with --dry-run)")
    parser.add_argument("--devices", type=positive(int), help="plan for this many GPUs (default: this machine's; "
                        "a cluster's jobs get what their cells ask for): blocks of min_devices above it are left out")
    launcher.add_arguments(parser)

