"""Run one experiment in a fresh process and make sure a record comes out of it.

Each run gets its own process, so peak statistics and the CUDA context start clean and a
crash cannot poison the next run. On a GPU that process is a new interpreter (a CUDA context
cannot cross a fork, and start-up is small beside a GPU run). On a CPU it is forked from
multiprocessing's fork server, which imports the worker's libraries once: importing torch,
transformers, peft and bitsandbytes takes longer than a CPU-sized run itself. If the process
dies without writing its record (killed, segfault, host out of memory), this side writes a
`failed` record for it.

One worker per cell: a lock file per record, held by this process and its worker (the
operating system releases it when both are gone), and a worker dies with the process that
started it. A record is never replaced by a worse one: an attempt that ends without a
measurement, where the cell has an ok or oom record, is kept in `attempts/` beside it.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import reduction
from pathlib import Path

from harness import env, schema
from harness.config import ResolvedConfig
from harness.matrix import ALLOCATOR_SETTINGS, allocator_record_path

LOG_TAIL_CHARS = 4000
ATTEMPT_SUFFIX = schema.ATTEMPT_SUFFIX
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15  # linux/prctl.h
WORKER_NAME = "harness-worker"  # a forked worker's process name (ps, psutil), as the module is a new one's
WORKER_ENVIRONMENT = {"TOKENIZERS_PARALLELISM": "false"}
# Imported by the fork server: each forked worker starts with them (an absent one is skipped;
# the worker then records the run `skipped` with the reason).
PRELOADED_MODULES = ("harness.measure.worker", "peft", "bitsandbytes")
WORKER_MODULE = "harness.measure.worker"
# torchrun's rendezvous port on a multi-node cell's first node (its nodes meet there); a one-node cell
# takes a free port (_free_local_port).
RENDEZVOUS_PORT = 29500


class CellBusy(Exception):
    """Another process is measuring this cell right now."""


@contextmanager
def cell_lock(record_path: Path):
    """An exclusive lock for one cell; yields the file descriptor, for the worker to inherit."""
    device_folder = record_path.parent
    lock_path = device_folder.parent / schema.LOCKS_FOLDER / device_folder.name / f"{record_path.stem}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CellBusy(f"{record_path.name}: another process is measuring this cell now") from None
        yield fd
    finally:
        os.close(fd)


def _die_with_parent(parent: int):
    """Run in the worker before it starts: the kernel kills it when its parent dies (Linux)."""
    def set_death_signal():
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before the signal was set
            os._exit(1)
    return set_death_signal


class _Descriptor:
    """A file descriptor handed to a forkserver's child (multiprocessing duplicates it there)."""
    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _Descriptor._detach, (reduction.DupFd(self.fd),)

    @staticmethod
    def _detach(duplicate) -> int:
        return duplicate.detach()


def _die_with_runner(lifeline: int) -> None:
    """The read end of a pipe whose write end only the runner holds: end of file means the
    runner is gone, however it ended (the fork server that is this process's parent may outlive it)."""
    def watch():
        os.read(lifeline, 1)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True, name="lifeline").start()


def _forked_worker(config: dict, attempt_path: str, log_path: str, lock: int, lifeline: int) -> None:
    """The body of a forked worker: the same `worker.run` a new interpreter runs. `lock` is the
    cell's lock, held here too, so that the cell stays locked while this process lives."""
    _die_with_runner(lifeline)
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, WORKER_NAME.encode())
    except (OSError, AttributeError):
        pass
    os.environ.update(WORKER_ENVIRONMENT)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 1), os.dup2(log, 2)
    sys.stdout.reconfigure(line_buffering=True), sys.stderr.reconfigure(line_buffering=True)
    from harness.measure import worker

    record = worker.run(config, attempt_path)
    sys.exit(0 if record.status in schema.FINISHED else 1)


MULTIPROCESSING_TEMP = "harness-mp"  # under the temporary folder: one folder per process that starts workers


def _own_multiprocessing_temp() -> None:
    """multiprocessing keeps its fork server's socket in a 'pymp-*' folder that a killed process leaves
    behind. Ours is named after this process instead, and the folders of processes no longer alive are
    removed, so that killed benches leave nothing in the temporary folder for long."""
    import atexit
    import shutil

    import psutil

    base = Path(tempfile.gettempdir()) / MULTIPROCESSING_TEMP
    base.mkdir(exist_ok=True)
    for folder in base.iterdir():
        if not folder.name.isdigit() or not psutil.pid_exists(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
    config = multiprocessing.current_process()._config  # where multiprocessing.util.get_temp_dir keeps it
    if config.get("tempdir"):
        return
    mine = base / str(os.getpid())
    mine.mkdir(exist_ok=True)
    config["tempdir"] = str(mine)
    atexit.register(shutil.rmtree, mine, True)


def _forkserver():
    """multiprocessing's fork server: a fresh interpreter that imports the worker's libraries once
    and computes nothing, so that every fork of it starts clean (a fork of a process whose
    thread pools have run, such as a test runner's, can deadlock)."""
    _own_multiprocessing_temp()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOADED_MODULES))  # a missing one is skipped
    return context


def world_size(config: ResolvedConfig) -> int:
    """How many processes measure a cell together."""
    return config.experiment.world_size


def check_ranks(config: ResolvedConfig, path, field_name: str, force: bool = False) -> None:
    """A cell of N ranks starts N processes: at most one per device here (a GPU each; on a CPU, a core
    each), unless forced. ConfigError names the field that asked for them."""
    from harness.config import ConfigError

    size = world_size(config)
    if size == 1 or force:
        return
    cuda = env.resolve_device(config.experiment.device) == "cuda"
    have = env.gpu_count() if cuda else len(os.sched_getaffinity(0))
    if size > have:
        raise ConfigError(path, field_name, f"{size} ranks, and this machine has {have} "
                          f"{'GPUs' if cuda else 'CPU cores'} for them (--force-ranks starts them anyway)")


@dataclass(frozen=True)
class Rendezvous:
    """Where the processes of one cell meet: its allocation's first host, and the job that holds it."""
    host: str
    nodes: int
    job_id: str
    port: int = RENDEZVOUS_PORT


def _free_local_port() -> int:
    """A port free on this machine now, for a one-node cell's rendezvous: two cells measured at once on
    one machine (two benches, or a test suite's parallel workers) must not meet at the same store. The
    port is released before torchrun binds it; another process taking it in between fails the cell,
    which is recorded as failed and measured again on the next run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def worker_command(config: ResolvedConfig, config_arg: str, attempt_path: Path,
                   rendezvous: Rendezvous | None = None) -> list[str]:
    """The command of a worker in a new interpreter: `python -m harness.measure.worker CONFIG RECORD`.

    A cell of world size N > 1 is the same module under torchrun, N processes spread over the
    rendezvous' nodes (N / nodes on each), meeting through torchrun's c10d rendezvous on the first
    host; each node runs this same command (harness.lab.launcher starts it on every node of a job).
    """
    module = ["-m", WORKER_MODULE, config_arg, str(attempt_path)]
    size = world_size(config)
    if size == 1:
        return [sys.executable, *module]
    rendezvous = rendezvous or Rendezvous(host="localhost", nodes=1, job_id=uuid.uuid4().hex[:12],
                                          port=_free_local_port())
    if size % rendezvous.nodes:
        raise ValueError(f"world_size {size} does not split evenly over {rendezvous.nodes} nodes")
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={rendezvous.nodes}",
            f"--nproc-per-node={size // rendezvous.nodes}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rendezvous.host}:{rendezvous.port}", f"--rdzv-id={rendezvous.job_id}", *module]


def _config_file(attempt_path: Path) -> Path:
    """A torchrun worker's config."""
    return schema.beside_attempt(attempt_path, "config")


def _rank_files(attempt_path: Path, config: ResolvedConfig) -> list[Path]:
    return [schema.rank_record_path(attempt_path, rank) for rank in range(world_size(config))]


def _settle_ranks(attempt_path: Path, config: ResolvedConfig) -> None:
    """Where no rank wrote the cell's record, the record of the rank that ended first without `ok` becomes
    the attempt (the others may have failed only because it did: a peer gone mid-collective); the other
    ranks' go."""
    written = sorted((path.stat().st_mtime_ns, path) for path in _rank_files(attempt_path, config) if path.exists())
    if written and not attempt_path.exists():
        os.replace(written[0][1], attempt_path)
    for leftover in _rank_files(attempt_path, config):
        leftover.unlink(missing_ok=True)


def worker_environment(allocator: str | None = None) -> dict[str, str]:
    """A CUDA worker's environment: this process's, with the allocator setting a cell asks for in place of any
    PYTORCH_CUDA_ALLOC_CONF of its own (the worker's record says which it ran under: harness.env)."""
    setting = {} if allocator is None else {"PYTORCH_CUDA_ALLOC_CONF": ALLOCATOR_SETTINGS[allocator]}
    return {**os.environ, "PYTHONUNBUFFERED": "1", **WORKER_ENVIRONMENT, **setting}


def _start_worker(config: ResolvedConfig, attempt_path: Path, log, lock: int,
                  rendezvous: Rendezvous | None = None, allocator: str | None = None):
    """Start the worker process, which gets the configuration's dict form; returns a function that waits for
    it (None: timed out) and one that kills it."""
    if env.resolve_device(config.experiment.device) == "cpu" and world_size(config) == 1:
        lifeline, held = os.pipe()  # `held` stays here: its end of file tells the worker this process is gone
        process = _forkserver().Process(target=_forked_worker, args=(
            config.as_dict(), str(attempt_path), log.name, _Descriptor(lock), _Descriptor(lifeline)))
        process.start()
        os.close(lifeline)

        def wait(timeout):
            nonlocal held
            process.join(timeout)
            if process.exitcode is not None and held is not None:
                os.close(held)
                held = None
            return process.exitcode
        return wait, process.kill
    # The config goes through a pipe: nothing is left behind in /tmp by a killed run. torchrun's
    # processes do not share one standard input: theirs is a file beside the attempt (a '.tmp', so a
    # killed run's is cleaned like an interrupted write).
    child_env = worker_environment(allocator)
    config_file = None
    if world_size(config) > 1:
        config_file = schema.write_atomic(_config_file(attempt_path), config.as_dict())
    command = worker_command(config, str(config_file or "-"), attempt_path, rendezvous)
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=child_env,
                               pass_fds=(lock,), preexec_fn=_die_with_parent(os.getpid()))
    if config_file is None:
        process.stdin.write(json.dumps(config.as_dict()).encode())
    process.stdin.close()

    def wait(timeout):
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
    return wait, lambda: _kill_tree(process.pid)


def _kill_tree(pid: int) -> None:
    """Kill a worker and every process under it: torchrun starts each rank in a session of its own, so its
    process group would not reach them (a rank also dies with torchrun: harness.measure.ranks)."""
    import psutil

    try:
        processes = [psutil.Process(pid)]
        processes += processes[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def cell_path(config: ResolvedConfig, out_dir: str | Path, repeat: int = 0, allocator: str | None = None) -> Path:
    """Where this machine's record of a cell goes (under an allocator setting: harness.matrix)."""
    return allocator_record_path(schema.record_path(
        out_dir, env.device_slug(env.device_name(config.experiment.device)), config.name, config.experiment.model,
        config.config_hash, repeat), allocator)


def cell_log_path(out_dir: Path, record_path: Path) -> Path:
    """Where a cell's worker writes its output: beside the records, under logs/<device>/."""
    return out_dir / schema.LOGS_FOLDER / record_path.parent.name / (record_path.stem + ".log")


def run_config(config: ResolvedConfig, out_dir: str | Path = "results", repeat: int = 0,
               timeout_s: float | None = None, run_id: str | None = None,
               rendezvous: Rendezvous | None = None, allocator: str | None = None) -> tuple[Path, schema.RunRecord]:
    """Run a resolved config in a child process; returns (where its record went, the record).

    That is the cell's record path, or attempts/ where the run measured nothing and the cell
    keeps an earlier measurement. Raises CellBusy if another process is running the same cell.
    `run_id` names the attempt (a cluster job's, so that the job's record can be told apart).
    `allocator`: a CUDA caching allocator setting (harness.matrix.ALLOCATOR_SETTINGS) the worker runs under,
    its record filed apart from the default setting's.
    """
    if allocator is not None and env.resolve_device(config.experiment.device) != "cuda":
        raise ValueError(f"{config.name}: the allocator setting {allocator} is CUDA's caching allocator's; "
                         f"this cell runs on {config.experiment.device}")
    out_dir = Path(out_dir)
    path = cell_path(config, out_dir, repeat, allocator)
    check_writable(out_dir, path)
    log_file = cell_log_path(out_dir, path)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    run_id = run_id or uuid.uuid4().hex
    attempt_path = path.with_name(f".{path.stem}.{run_id[:12]}{ATTEMPT_SUFFIX}")
    config = config.run(run_id)
    with cell_lock(path) as lock, open(log_file, "w") as log:
        wait = kill = None
        try:
            wait, kill = _start_worker(config, attempt_path, log, lock, rendezvous, allocator)
            returncode = wait(timeout_s)
            if returncode is None:  # out of time
                kill()
                returncode = wait(None)
        except BaseException:  # Ctrl-C or an error here: no worker outlives this process
            if kill is not None:
                kill()
                wait(None)
            attempt_path.unlink(missing_ok=True)
            raise
        finally:
            _config_file(attempt_path).unlink(missing_ok=True)
        _settle_ranks(attempt_path, config)
        record = _read_or_none(attempt_path)
        try:
            if record is None or record.config.get("run_id") != run_id:
                record = _lost_record(config, returncode, log_file, timeout_s)
                schema.write(attempt_path, record)
            landed = _keep_the_better(path, attempt_path, record)
        except OSError as error:  # the folder was writable when the run started: keep what it measured elsewhere
            landed = schema.write_or_set_aside(out_dir / schema.UNSAVED_FOLDER / path.name, record,
                                               env.cache_dir() / schema.UNSAVED_FOLDER)
            print(f"could not file {path} ({error.strerror or error}): the record is kept at {landed}",
                  file=sys.stderr, flush=True)
    return landed, record


def check_writable(out_dir: Path, record_path: Path) -> None:
    """The folders a run writes (its record's, its log's, its lock's, attempts/) exist and take a file,
    before anything is measured: ConfigError names the one that does not."""
    from harness.config import ConfigError

    device = record_path.parent.name
    attempts = out_dir / schema.ATTEMPTS_FOLDER / device  # made when an attempt first goes there
    for folder in (record_path.parent, out_dir / schema.LOGS_FOLDER / device, out_dir / schema.LOCKS_FOLDER / device,
                   *([attempts] if attempts.exists() else [])):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            raise ConfigError(folder, "--out", f"cannot be written ({error.strerror or error}); nothing was "
                              "measured") from None


def remove_stale_attempts(out_dir: Path) -> None:
    """Attempts and interrupted writes left by a runner killed mid-run (its cell's lock is free
    again): the cell resumes. Those of a cell being measured (by a cluster job, or another bench)
    are its runner's own and stay."""
    for leftover in cell_leftovers(out_dir):  # ".<cell>.json.<random>.tmp"
        _remove_unless_busy(leftover, leftover.with_name(leftover.name[1:].split(".json.", 1)[0] + ".json"))
    for attempt in Path(out_dir).rglob(f".*{ATTEMPT_SUFFIX}"):
        _remove_unless_busy(attempt, attempt.with_name(attempt.name[1:].rsplit(".", 3)[0] + ".json"))


def cell_leftovers(out_dir: Path) -> list[Path]:
    """Temporary files in the folders of run records: a record's interrupted write, a worker's config."""
    return [p for p in Path(out_dir).glob("*/.*.tmp") if p.parent.name not in schema.NOT_RUN_FOLDERS]


def _remove_unless_busy(leftover: Path, record_path: Path) -> None:
    try:
        with cell_lock(record_path):
            leftover.unlink(missing_ok=True)
    except CellBusy:
        pass


def keep_record(path: Path, record: schema.RunRecord) -> Path:
    """Write a record made outside a worker (a cluster job that died without one) by the rule
    every attempt follows: it never replaces a measurement. Raises CellBusy while the cell is measured."""
    with cell_lock(path):
        attempt = path.with_name(f".{path.stem}.{record.config['run_id'][:12]}{ATTEMPT_SUFFIX}")
        schema.write(attempt, record)
        return _keep_the_better(path, attempt, record)


def _read_or_none(path: Path) -> schema.RunRecord | None:
    """A worker's attempt (None where it left none, or half a file)."""
    try:
        return schema.read(path, kind="run") if path.exists() else None
    except (OSError, schema.RecordError):
        return None


def why_kept(path: Path) -> str | None:
    """Why the record at `path` may not be replaced by anything but itself: a file this code cannot read
    completely (a newer harness's, damaged, hand-edited) is kept as it is; None where it may be replaced."""
    if not path.exists():
        return None
    try:
        existing = schema.read(path, kind="run")
    except (OSError, schema.RecordError) as error:
        return f"the cell's file is no record this code can read ({str(error).removeprefix(f'{path}: ')})"
    problems = schema.value_problems(existing)
    own_hash = existing.config.get("config_hash", existing.config_hash)  # records before configs carried it
    if own_hash != existing.config_hash or not path.stem.split("__")[-1].startswith(existing.config_hash[:12]):
        problems.append("its configuration hash is not its file's")
    if problems:
        return f"the cell's record is not as this code writes it ({'; '.join(problems)[:300]})"
    return None


def _keep_the_better(path: Path, attempt_path: Path, record: schema.RunRecord) -> Path:
    """The attempt becomes the cell's record only where it replaces nothing of value: no record, or a
    readable one that measured nothing, or a measurement replaced by a newer one. Otherwise the attempt
    goes to attempts/ beside it, and its `kept_because` says why in one line."""
    why = why_kept(path)
    if why is None and path.exists() and record.status not in schema.MEASURED:
        existing = schema.read(path, kind="run")
        if existing.status in schema.MEASURED:
            why = f"this attempt measured nothing ({record.status}) and the cell keeps its {existing.status} record"
    if why is not None:
        record.extra["kept_because"] = why
        schema.write(attempt_path, record)
        path = schema.attempt_path(path, record.config["run_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(attempt_path, path)
    return path


def _lost_record(config: ResolvedConfig, returncode: int, log_path: Path, timeout_s: float | None) -> schema.RunRecord:
    """The record of a process that ended without writing its own."""
    tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log_path.exists() else ""
    if returncode < 0:
        how = f"the run's process was killed by signal {-returncode}"
        if -returncode == 9:
            how += " (a time limit, or the host ran out of memory)"
    else:
        how = f"the run's process exited with status {returncode} without writing a record"
    return schema.RunRecord(status="failed", experiment=config.name, model=config.experiment.model,
                            config=config.as_dict(), config_hash=config.config_hash, finished_at=env.now(),
                            error=schema.RunError("ProcessDied", how, returncode=returncode, timeout_s=timeout_s,
                                                  log_tail=tail))


def summary_line(record: schema.RunRecord) -> str:
    """One line with the headline figures of a record."""
    name = f"{record.experiment} @ {record.model}"
    engine = record.config.get("engine", "harness")
    name += f" in {engine}" if engine != "harness" else ""
    if record.status == "ok":
        return (f"{name}: ok, peak {record.memory.peak_allocated / 2**30:.3f} GiB ({record.memory.source}), "
                f"{record.throughput.tokens_per_s:.0f} tokens/s, final loss {record.loss.final:.4f}")
    error = record.error or schema.RunError("?", "")
    ranks = record.config.get("world_size") or 1  # a record made before world_size existed ran on one
    name += f" (rank {error.rank} of {ranks})" if error.rank is not None else ""
    if record.status == "oom":
        reached = error.memory_reached_bytes
        reached_text = f", reached {reached / 2**30:.3f} GiB" if reached else ""
        return f"{name}: OOM in {error.phase} at step {error.step}{reached_text}"
    if record.status == "skipped":
        return f"{name}: skipped: {error.message}"
    return f"{name}: failed: {error.type}: {error.message[:200]}"
