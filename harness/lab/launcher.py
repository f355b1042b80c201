"""Cells as cluster jobs: `harness bench --launcher slurm|submitit-local`, through submitit.

Each cell without a current record becomes one job of submitit's AutoExecutor: a SLURM job, or
a process of submitit's local executor (the same code path without a cluster). The job measures
its cell as the local launcher does (`harness.lab.runner.run_config`: a worker process, the
cell's lock, the record written atomically under results/), so a record is the same whichever
launcher made it. results/ must be on a filesystem the submitting machine and the nodes share:
submitit's own files (the pickled cell, the job's log) live there too, in results/.jobs/submitit/.

Each submitted cell's job is one small JSON file, results/.jobs/<cell>.json. It keeps a second
job from being submitted for a cell whose job is pending or running, and it is what
`--status` reads beside the records. A job that ended without a record (killed, out of time,
its node lost) becomes a `failed` record with the tail of its log when the next `--status` or
submission looks at it; like any attempt that measured nothing, it never replaces a measurement.

A cell of world size N > 1 runs its worker under torchrun inside the job's allocation
(`harness.lab.runner.worker_command`): N / nodes processes on each node, the nodes meeting
through torchrun's c10d rendezvous on the allocation's first host.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from harness import env, schema
from harness.arguments import parse_duration, positive
from harness.config import ConfigError, ResolvedConfig, build_dataclass, read_yaml
from harness.lab.runner import (
    LOG_TAIL_CHARS,
    CellBusy,
    Rendezvous,
    keep_record,
    run_config,
    summary_line,
    worker_command,
    worker_environment,
    world_size,
)
from harness.matrix import LAUNCHER_BLOCK, PlannedRun, allocator_fingerprint
from harness.step.checkpoint import BASE_SOURCE, base_checkpoint_path


@dataclass(frozen=True)
class Launcher:
    cluster: str | None  # submitit's executor (AutoExecutor's `cluster`); None: the bench's own process
    poll_s: float        # how often --wait asks after the jobs


LAUNCHERS = {
    "local": Launcher(None, 0),
    "slurm": Launcher("slurm", 30),
    "submitit-local": Launcher("local", 1),
}
SUBMITIT_FOLDER = "submitit"  # under results/.jobs/: one folder per job (%j: its id)
# Where a folder is visible to one node only: results/ there would never reach the submitting machine.
NODE_LOCAL_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs")
NODE_LOCAL_FOLDERS = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))
# A job's runner stops its worker this long before the job's time limit, so that the record says
# why: submitit signals a SLURM job 90 s before its limit (signal_delay_s) and ends it without a result.
TIME_LIMIT_MARGIN_S = 150
# SLURM's job states (sacct), by what they mean for a cell; any other state ended the job.
SLURM_PENDING = {"PENDING", "REQUEUED", "CONFIGURING", "SUSPENDED", "REQUEUE_HOLD", "UNKNOWN"}
SLURM_RUNNING = {"RUNNING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"}
LIVE = ("pending", "running")


@dataclass
class LauncherSettings:
    """Where jobs go: the matrix file's `launcher:` block, each field replaced by its command-line option."""
    partition: str | None = None
    account: str | None = None
    gpus_per_node: int = 1  # a node's GPUs one job may use (a cell of world size 1 takes one)
    nodes: int = 1          # the most nodes one cell's job may span
    time_limit: str = "1h"  # per job: 90m, 2h, 1h30m or seconds

    @property
    def time_limit_s(self) -> float:
        return parse_duration(self.time_limit)


@dataclass
class JobEntry:
    """One cell's submitted job (results/.jobs/<cell>.json)."""
    launcher: str
    job_id: str
    run_id: str       # the attempt's id: the record the job writes carries it
    folder: str       # submitit's folder of the job (%j stands for its id)
    record: str       # where the submitting machine expects the cell's record
    submitted_at: str
    config: dict      # the cell's resolved configuration in its dict form, as the job got it
    repeat: int = 0


def load_settings(matrix_path: Path, overrides: dict) -> LauncherSettings:
    data = read_yaml(matrix_path).get(LAUNCHER_BLOCK) or {}
    data = {**data, **{key: value for key, value in overrides.items() if value is not None}}
    settings = build_dataclass(LauncherSettings, data, matrix_path, prefix=f"{LAUNCHER_BLOCK}.")
    for name in ("gpus_per_node", "nodes"):
        if (value := getattr(settings, name)) < 1:
            raise ConfigError(matrix_path, f"{LAUNCHER_BLOCK}.{name}", f"must be positive, got {value}")
    try:
        settings.time_limit_s
    except ValueError as error:
        raise ConfigError(matrix_path, f"{LAUNCHER_BLOCK}.time_limit", str(error)) from None
    return settings


def allocation(config: ResolvedConfig, settings: LauncherSettings) -> dict:
    """submitit's resources for one cell: its world size's GPUs, on as few nodes as hold them."""
    size = world_size(config)
    if config.experiment.device != "cuda":
        return {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1}
    per_node = settings.gpus_per_node
    nodes = math.ceil(size / per_node)
    if nodes > settings.nodes:
        raise ConfigError("harness bench", "--nodes", f"{config.name} has world size {size}: {nodes} nodes of "
                          f"{per_node} GPUs, more than the {settings.nodes} allowed")
    return {"nodes": nodes, "gpus_per_node": min(size, per_node), "tasks_per_node": 1}


def check_shared_filesystem(out_dir: Path) -> None:
    """results/ must be where the nodes write and the submitting machine reads: not a node's own folder."""
    import psutil

    path = out_dir.resolve()
    mounts = [m for m in psutil.disk_partitions(all=True) if path.is_relative_to(m.mountpoint)]
    mount = max(mounts, key=lambda m: len(m.mountpoint), default=None)
    local = next((str(f) for f in NODE_LOCAL_FOLDERS if path.is_relative_to(f)), None)
    if mount is not None and mount.fstype in NODE_LOCAL_FILESYSTEMS:
        local = f"a {mount.fstype} mounted at {mount.mountpoint}"
    if local:
        raise ConfigError("harness bench", "--out", f"{path} is on {local}, which each node has its own of: "
                          "cluster jobs need results/ on a filesystem the nodes share")


def measure_cell(config: dict, out_dir: str, repeat: int, timeout_s: float | None, run_id: str,
                 allocator: str | None = None) -> dict:
    """The body of one cell's job, on its node: the cell (the dict form it crossed to the node in) measured as
    the local launcher measures it, under its block's allocator setting (harness.matrix)."""
    import submitit

    config = ResolvedConfig.from_dict(config)
    job = submitit.JobEnvironment()
    rendezvous = None
    if world_size(config) > 1:
        rendezvous = Rendezvous(host=job.hostnames[0], nodes=job.num_nodes, job_id=job.job_id)
        if job.global_rank > 0:  # another node of the cell: its share of the processes; node 0 records
            return _other_node(config, rendezvous, allocator)
    try:
        path, record = run_config(config, out_dir, repeat, timeout_s, run_id=run_id, rendezvous=rendezvous,
                                  allocator=allocator)
    except CellBusy as busy:  # measured by another process right now: that one writes the record
        return {"busy": str(busy)}
    return {"record": str(path), "status": record.status}


def _other_node(config: ResolvedConfig, rendezvous: Rendezvous, allocator: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        config_file = schema.write_atomic(Path(folder) / "config.json", config.as_dict())
        command = worker_command(config, str(config_file), Path(folder) / "record.json", rendezvous)
        return {"returncode": subprocess.run(command, env=worker_environment(allocator)).returncode}


def _submitit():
    """submitit, an optional dependency (the `cluster` extra): only the cluster launchers need it."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("harness bench", "--launcher", "submitit is not installed "
                          "(pip install -e '.[cluster]', or pip install submitit)") from None
    return submitit


def make_executor(launcher: str, out_dir: Path, settings: LauncherSettings):
    submitit = _submitit()
    folder = out_dir.resolve() / schema.JOBS_FOLDER / SUBMITIT_FOLDER / "%j"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=LAUNCHERS[launcher].cluster)
    except RuntimeError as error:  # no SLURM here
        raise ConfigError("harness bench", "--launcher", f"{launcher}: {error} (--launcher submitit-local runs "
                          "the same code path on this machine)") from None
    executor.update_parameters(timeout_min=math.ceil(settings.time_limit_s / 60),
                               slurm_partition=settings.partition, slurm_account=settings.account)
    return executor


def entry_path(out_dir: Path, record: Path) -> Path:
    return out_dir / schema.JOBS_FOLDER / record.name


def read_entry(out_dir: Path, record: Path) -> JobEntry | None:
    path = entry_path(out_dir, record)
    if not path.exists():
        return None
    import json

    try:
        return JobEntry(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise schema.RecordError(path, f"not a job entry this code can read ({error})") from None


def job_states(entries: list[JobEntry]) -> dict[str, tuple[str, str]]:
    """(state, detail) per job id: pending, running, finished (the job returned) or failed (it did not)."""
    if not entries:
        return {}
    submitit = _submitit()
    from submitit.core.utils import JobPaths, pickle_load

    slurm = [e for e in entries if e.launcher == "slurm"]
    if slurm:  # one sacct call for every job
        for entry in slurm:
            submitit.SlurmJob(entry.folder, entry.job_id)
        submitit.SlurmJob.watcher.update()
    states = {}
    for entry in entries:
        result = JobPaths(entry.folder, entry.job_id, 0).result_pickle
        if result.exists():
            outcome, value = pickle_load(result)
            states[entry.job_id] = ("finished", "") if outcome == "success" else ("failed", str(value))
        elif entry.launcher == "slurm":
            state = submitit.SlurmJob.watcher.get_state(entry.job_id, mode="cache").split()[0].upper()
            states[entry.job_id] = ("pending" if state in SLURM_PENDING else
                                    "running" if state in SLURM_RUNNING else "failed", state)
        else:
            states[entry.job_id] = ("running", "") if _controller_alive(entry.job_id) else ("failed", "process gone")
    return states


def _controller_alive(job_id: str) -> bool:
    """submitit's local job id is its controller's process id; the controller lives as long as the job."""
    import psutil

    try:
        process = psutil.Process(int(job_id))
        return process.status() != psutil.STATUS_ZOMBIE and "submitit.local._local" in process.cmdline()
    except (psutil.Error, ValueError):
        return False


def job_record(out_dir: Path, entry: JobEntry) -> Path | None:
    """The record this very job wrote (or was given), wherever it landed."""
    name = Path(entry.record).name
    stem = Path(name).stem
    candidates = [p for p in out_dir.glob(f"*/{name}") if p.parent.name not in schema.NOT_RUN_FOLDERS]
    candidates += out_dir.glob(f"{schema.ATTEMPTS_FOLDER}/*/{stem}.{entry.run_id[:12]}.json")
    for path in candidates:
        try:
            if schema.read(path, kind="run").config.get("run_id") == entry.run_id:
                return path
        except (OSError, ValueError):
            continue
    return None


def gather(out_dir: Path, entries: list[JobEntry], states: dict) -> int:
    """A `failed` record, with its log's tail, for each job that ended without writing one; how many."""
    written = 0
    for entry in entries:
        state, detail = states[entry.job_id]
        if state != "failed" or job_record(out_dir, entry) is not None:
            continue
        try:
            keep_record(Path(entry.record), _failed_record(entry, detail))
            written += 1
        except CellBusy:  # measured now by another process: this job is gathered next time
            continue
    return written


def _failed_record(entry: JobEntry, detail: str) -> schema.RunRecord:
    from submitit.core.utils import JobPaths

    paths = JobPaths(entry.folder, entry.job_id, 0)
    log = "".join(p.read_text(errors="replace") for p in (paths.stdout, paths.stderr) if p.exists())
    config = {**entry.config, "run_id": entry.run_id}  # the dict form the job got, as its record would keep it
    reason = detail.strip().splitlines()[-1] if detail.strip() else "no reason given"
    how = f"{entry.launcher} job {entry.job_id} ended without a record ({reason})"
    return schema.RunRecord(status="failed", experiment=config["name"], model=config["model"], config=config,
                            config_hash=config["config_hash"], finished_at=env.now(),
                            error=schema.RunError("JobFailed", how, log_tail=log[-LOG_TAIL_CHARS:],
                                                  traceback=detail or None))


def current_record(run: PlannedRun, out_dir: Path, versions: dict) -> schema.RunRecord | None:
    """A measurement of this cell made with this software, on whatever device the jobs were given
    (the submitting machine cannot know which GPU a job will get)."""
    for path in out_dir.glob(f"*/{run.path.name}"):
        if path.parent.name in schema.NOT_RUN_FOLDERS:
            continue
        try:
            record = schema.read(path, kind="run")
        except (OSError, ValueError):
            continue
        # the job's own device (and, on a CPU, what it runs natively) with this software
        machine = {key: (record.environment or {}).get(key) for key in ("device_name", "cpu")}
        if record.status in schema.MEASURED and record.fingerprint == allocator_fingerprint(
                {**machine, "versions": versions}, run.allocator):
            return record
    return None


def _entries(planned: list[PlannedRun], out_dir: Path) -> dict[Path, JobEntry]:
    return {run.path: entry for run in planned if (entry := read_entry(out_dir, run.path)) is not None}


def launch(planned: list[PlannedRun], launcher: str, settings: LauncherSettings, out_dir: Path, *,
           force: bool = False, timeout_s: float | None = None, wait: bool = False, stream=sys.stdout) -> int:
    """Submit a job for each cell without a current record or a live job; with `wait`, wait for them all."""
    if launcher == "slurm":
        check_shared_filesystem(out_dir)
    allocations = {run.path: allocation(run.config, settings) for run in planned}  # refused before any job
    versions = env.software_versions()
    entries = _entries(planned, out_dir)
    states = job_states(list(entries.values()))
    if gathered := gather(out_dir, list(entries.values()), states):
        print(f"{gathered} jobs ended without a record: recorded as failed", file=stream)
    executor = None
    limit = timeout_s or max(settings.time_limit_s - TIME_LIMIT_MARGIN_S, settings.time_limit_s / 2)
    submitted = []
    for index, run in enumerate(planned, 1):
        label = f"[{index}/{len(planned)}] {run.path.stem}"
        entry = entries.get(run.path)
        state = states[entry.job_id][0] if entry else None
        if state in LIVE:  # never a second job for one cell, --force or not
            print(f"{label}: job {entry.job_id} {state}, not submitted again", file=stream, flush=True)
            continue
        if not force and (record := current_record(run, out_dir, versions)) is not None:
            print(f"{label}: done before, skipped ({record.status})", file=stream, flush=True)
            continue
        cell = run.config.experiment
        if cell.model == BASE_SOURCE and base_checkpoint_path(cell.device) is None:
            print(f"{label}: not submitted: the base model is not pretrained yet "
                  f"(`harness base --device {cell.device}` on a node of the cluster)", file=stream)
            continue
        executor = executor or make_executor(launcher, out_dir, settings)
        executor.update_parameters(name=f"harness-{run.path.stem}"[:100], **allocations[run.path])
        run_id = uuid.uuid4().hex
        config = run.config.as_dict()
        job = executor.submit(measure_cell, config, str(out_dir.resolve()), run.repeat, limit, run_id, run.allocator)
        entry = JobEntry(launcher=launcher, job_id=str(job.job_id), run_id=run_id,
                         folder=str(executor.folder), record=str(run.path.resolve()), submitted_at=env.now(),
                         config=config, repeat=run.repeat)
        schema.write_atomic(entry_path(out_dir, run.path), dataclasses.asdict(entry))
        entries[run.path] = entry
        submitted.append(entry)
        print(f"{label}: submitted, {launcher} job {job.job_id}", file=stream, flush=True)
    print(f"{len(submitted)} jobs submitted through submitit ({launcher}); "
          "`harness bench --status` lists them; the same command resumes", file=stream, flush=True)
    if not wait:
        return 0
    return wait_for(planned, out_dir, stream)


def wait_for(planned: list[PlannedRun], out_dir: Path, stream=sys.stdout) -> int:
    """Wait until no cell's job is pending or running, gather, and print each cell's record."""
    entries = list(_entries(planned, out_dir).values())
    poll = min((LAUNCHERS[e.launcher].poll_s for e in entries), default=1)
    while True:
        states = job_states(entries)
        if not any(state in LIVE for state, _ in states.values()):
            break
        time.sleep(poll)
    gather(out_dir, entries, states)
    finished = True
    for entry in entries:
        path = job_record(out_dir, entry)
        record = schema.read(path, kind="run") if path else None
        print(f"  job {entry.job_id}: " + (summary_line(record) if record else "no record (its cell was busy)"),
              file=stream)
        finished &= record is None or record.status in schema.FINISHED
    return 0 if finished else 1


def cell_status(planned: list[PlannedRun], out_dir: Path) -> list[dict]:
    """Each planned cell's state (pending, running, finished, failed or not submitted), job and record."""
    entries = _entries(planned, out_dir)
    states = job_states(list(entries.values()))
    gather(out_dir, list(entries.values()), states)
    rows = []
    for run in planned:
        entry = entries.get(run.path)
        state = states[entry.job_id][0] if entry else None
        record = next(filter(None, (_read(path) for path in out_dir.glob(f"*/{run.path.name}")
                                    if path.parent.name not in schema.NOT_RUN_FOLDERS)), None)
        own = job_record(out_dir, entry) if entry else None
        if state not in LIVE:
            latest = _read(own) if own else record
            state = ("not submitted" if latest is None else
                     "finished" if latest.status in schema.FINISHED else "failed")
        rows.append({"cell": run.path.stem, "state": state, "job": entry.job_id if entry else "",
                     "launcher": entry.launcher if entry else "", "record": record.status if record else "",
                     "submitted": entry.submitted_at if entry else ""})
    return rows


def _read(path: Path) -> schema.RunRecord | None:
    try:
        return schema.read(path, kind="run")
    except (OSError, ValueError):
        return None


def print_status(planned: list[PlannedRun], out_dir: Path, stream=sys.stdout) -> int:
    import pandas as pd

    rows = cell_status(planned, out_dir)
    if not rows:
        print("no cells in this plan", file=stream)
        return 0
    table = pd.DataFrame(rows)
    print(table.to_string(index=False), file=stream)
    counts = table["state"].value_counts()
    print(", ".join(f"{counts.get(state, 0)} {state}" for state in (*LIVE, "finished", "failed", "not submitted")),
          file=stream)
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--launcher", choices=list(LAUNCHERS), default="local",
                        help="local: this process runs each cell (default); slurm: one SLURM job per cell through "
                        "submitit; submitit-local: the same jobs as processes of submitit's local executor")
    parser.add_argument("--status", action="store_true",
                        help="list each cell of the plan: pending, running, finished, failed, with its job id")
    parser.add_argument("--wait", action="store_true", help="with a cluster launcher: wait for the jobs, then "
                        "print their records")
    group = parser.add_argument_group("cluster jobs (default: the matrix file's launcher: block)")
    group.add_argument("--partition", help="SLURM partition")
    group.add_argument("--account", help="SLURM account")
    group.add_argument("--gpus-per-node", type=positive(int), help="GPUs of a node one job may use (default 1)")
    group.add_argument("--nodes", type=positive(int), help="the most nodes one cell's job may span (default 1)")
    group.add_argument("--time-limit", metavar="DURATION", type=duration,
                       help="per job, e.g. 90m, 2h (default 1h)")


def duration(text: str) -> str:
    """A duration as given (the job's time limit), refused here if parse_duration cannot read it."""
    parse_duration(text)
    return text


def settings_overrides(args) -> dict:
    return {"partition": args.partition, "account": args.account, "gpus_per_node": args.gpus_per_node,
            "nodes": args.nodes, "time_limit": args.time_limit}

