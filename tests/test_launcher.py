"""`harness bench --launcher`: cells as submitit jobs, tested through submitit's local executor
(the SLURM code path with processes instead of jobs): submission, resume, one job per cell, a job
killed mid-run, `--status`; and the pieces a cluster alone would exercise (torchrun's command,
allocations, the `launcher:` block, the shared-filesystem check), without one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import EXPERIMENTS, QUICK, ROOT

from harness import env, schema
from harness.config import ConfigError, resolve
from harness.lab import launcher
from harness.lab.launcher import JobEntry, LauncherSettings
from harness.lab.runner import Rendezvous, worker_command
from harness.matrix import load_matrix

LOCAL = "submitit-local"


def _cell(world_size: int, device: str = "cuda"):
    """A sharded cell of this many ranks (experiments/fsdp2.yaml)."""
    return resolve(EXPERIMENTS / "fsdp2.yaml", {"world_size": world_size, "device": device})


def _write_matrix(tmp_path, blocks, **extra):
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({"cpu": blocks, "cuda": [], **extra}))
    return path


def _bench(matrix, out, *extra, **popen):
    """The bench writing to a file: submitit's local jobs inherit its output and keep a pipe open
    until they end, so that reading a pipe to its end would wait for the jobs."""
    command = [sys.executable, "-m", "harness", "bench", "--matrix", str(matrix), "--out", str(out),
               "--experiments-dir", str(EXPERIMENTS), "--device", "cpu", *extra]
    log = open(Path(matrix).parent / "bench.log", "w+")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, **popen)
    process.log = log
    return process


def _output(matrix, out, *extra, timeout=600):
    process = _bench(matrix, out, *extra)
    process.wait(timeout=timeout)
    with process.log as log:
        log.seek(0)
        return process.returncode, log.read()


def _entries(out) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / schema.JOBS_FOLDER).glob("*.json")}


def _status(matrix, out) -> dict[str, tuple[str, str]]:
    """--status as {cell: (state, job id)}."""
    code, output = _output(matrix, out, "--status")
    assert code == 0, output
    rows = {}
    for line in output.splitlines():
        parts = line.split()
        if parts and "__" in parts[0]:
            state = " ".join(parts[1:3]) if parts[1:3] == ["not", "submitted"] else parts[1]
            job = "" if state == "not submitted" else parts[2]
            rows[parts[0]] = (state, job)
    return rows


# -- without a cluster, without a run ------------------------------------------------------

def test_a_cell_of_world_size_above_one_is_its_worker_under_torchrun():
    from torch.distributed.run import get_args_parser

    one = worker_command(resolve(EXPERIMENTS / "lora.yaml"), "-", Path("r.json"))
    assert one == [sys.executable, "-m", "harness.measure.worker", "-", "r.json"]
    command = worker_command(_cell(8), "cell.json", Path("r.json"), Rendezvous("node7", 2, "4242"))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    torchrun = get_args_parser().parse_args(command[3:])  # torchrun's own parser reads it
    assert (torchrun.nnodes, torchrun.nproc_per_node) == ("2", "4")
    assert (torchrun.rdzv_backend, torchrun.rdzv_endpoint, torchrun.rdzv_id) == ("c10d", "node7:29500", "4242")
    assert torchrun.module and torchrun.training_script == "harness.measure.worker"
    assert torchrun.training_script_args == ["cell.json", "r.json"]
    with pytest.raises(ValueError, match="world_size 6 does not split evenly over 4 nodes"):
        worker_command(_cell(6), "cell.json", Path("r.json"), Rendezvous("node7", 4, "1"))


def test_a_job_asks_for_its_world_size_on_as_few_nodes_as_hold_it():
    settings = LauncherSettings(gpus_per_node=4, nodes=2)
    assert launcher.allocation(_cell(1), settings) == {"nodes": 1, "gpus_per_node": 1, "tasks_per_node": 1}
    assert launcher.allocation(_cell(4), settings)["nodes"] == 1
    assert launcher.allocation(_cell(8), settings) == {"nodes": 2, "gpus_per_node": 4, "tasks_per_node": 1}
    with pytest.raises(ConfigError, match="'--nodes'.*fsdp2 has world size 12: 3 nodes of 4 GPUs"):
        launcher.allocation(_cell(12), settings)
    assert launcher.allocation(_cell(1, "cpu"), settings)["gpus_per_node"] == 0


def test_the_launcher_block_is_checked_field_by_field_and_the_command_line_wins(tmp_path):
    blocks = [{"experiments": ["lora"], "models": ["tiny-llama"]}]
    good = _write_matrix(tmp_path, blocks, launcher={"partition": "gpu", "time_limit": "2h", "nodes": 2})
    assert set(load_matrix(good)) == {"cpu", "cuda"}  # the block is not a plan
    settings = launcher.load_settings(good, {"partition": "debug", "account": None})
    assert (settings.partition, settings.nodes, settings.time_limit_s) == ("debug", 2, 7200)
    for block, field in [({"partiton": "gpu"}, "launcher.partiton"), ({"time_limit": "soon"}, "launcher.time_limit"),
                         ({"nodes": 0}, "launcher.nodes"), ({"gpus_per_node": "4"}, "launcher.gpus_per_node")]:
        with pytest.raises(ConfigError, match=f"field '{field}'"):
            launcher.load_settings(_write_matrix(tmp_path, blocks, launcher=block), {})


def test_results_in_a_folder_each_node_has_its_own_of_are_refused_for_slurm(tmp_path):
    with pytest.raises(ConfigError, match="'--out'.*/tmp.*a filesystem the nodes share"):
        launcher.check_shared_filesystem(tmp_path)
    with pytest.raises(ConfigError, match="'--out'.*tmpfs"):
        launcher.check_shared_filesystem(Path("/dev/shm/results"))
    # a disk of the machine's own: the repository's, unless this clone itself lives under /tmp
    disk = Path.home() if str(ROOT).startswith(("/tmp/", "/var/tmp/")) else ROOT
    launcher.check_shared_filesystem(disk / "results")


def test_slurm_without_a_cluster_and_a_time_budget_with_jobs_are_refused_by_name(tmp_path):
    if shutil.which("srun"):
        pytest.skip("this machine is a SLURM node")
    with pytest.raises(ConfigError, match="'--launcher'.*srun.*submitit-local"):
        launcher.make_executor("slurm", tmp_path, LauncherSettings())
    matrix = _write_matrix(tmp_path, [{"experiments": ["lora"], "models": ["tiny-llama"], "set": QUICK}])
    code, output = _output(matrix, tmp_path / "results", "--launcher", LOCAL, "--time-budget", "5m")
    assert code == 2 and "'--time-budget': applies to the local launcher" in output


def _entry(out, record: Path, job_id: str) -> JobEntry:
    from harness.config import prepare

    config = prepare(EXPERIMENTS / "lora.yaml", QUICK)
    entry = JobEntry(launcher=LOCAL, job_id=job_id, run_id="f" * 32,
                     folder=str(out / schema.JOBS_FOLDER / launcher.SUBMITIT_FOLDER / "%j"),
                     record=str(record), submitted_at=env.now(), config=config)
    schema.write_atomic(launcher.entry_path(out, record), entry.__dict__)
    return entry


def test_a_job_gone_without_a_record_becomes_a_failed_record_with_its_log_and_never_replaces_a_measurement(
        tmp_path):
    from submitit.core.utils import JobPaths, cloudpickle_dump

    out = tmp_path / "results"
    measured = next((ROOT / "results" / "cpu").glob("lora__tiny-llama__*.json"))
    cells = [out / "cpu" / "a__tiny-llama__000000000000.json", out / "cpu" / measured.name]
    dead = _entry(out, cells[0], "999999999")  # no such process: its controller is gone
    log = JobPaths(dead.folder, dead.job_id, 0).stdout
    log.parent.mkdir(parents=True)
    log.write_text("submitit INFO - Starting\nthe node caught fire\n")
    errored = _entry(out, cells[1], "999999998")
    errored.run_id = "e" * 32
    schema.write_atomic(launcher.entry_path(out, cells[1]), errored.__dict__)
    result = JobPaths(errored.folder, errored.job_id, 0).result_pickle
    result.parent.mkdir(parents=True)
    cloudpickle_dump(("error", "Traceback ...\nRuntimeError: CUDA error"), result)
    cells[1].parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(measured, cells[1])

    states = launcher.job_states([dead, errored])
    assert states == {"999999999": ("failed", "process gone"),
                      "999999998": ("failed", "Traceback ...\nRuntimeError: CUDA error")}
    assert launcher.gather(out, [dead, errored], states) == 2
    failed = schema.read(cells[0], kind="run")
    assert failed.status == "failed" and failed.error.type == "JobFailed"
    assert "submitit-local job 999999999 ended without a record" in failed.error.message
    assert "the node caught fire" in failed.error.log_tail
    assert failed.config["run_id"] == dead.run_id
    assert cells[1].read_bytes() == measured.read_bytes()  # the measurement stays; the failure is an attempt
    [attempt] = (out / schema.ATTEMPTS_FOLDER / "cpu").glob("*.json")
    assert "RuntimeError: CUDA error" in schema.read(attempt, kind="run").error.message
    assert launcher.gather(out, [dead, errored], states) == 0  # gathered once


# -- through submitit's local executor ------------------------------------------------------

def _controllers(out) -> list:
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "submitit.local._local" in cmdline and any(str(out) in part for part in cmdline):
            found.append(process)
    return found


def _workers_of(out) -> list:
    """Forked workers whose open files (the cell's lock, its log) are under `out`."""
    import psutil

    from harness.lab.runner import WORKER_NAME

    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if process.info["name"] == WORKER_NAME and any(f.path.startswith(str(out)) for f in process.open_files()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def _wait_until(predicate, timeout=300, what="a condition"):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_jobs_outlive_a_killed_bench_each_cell_gets_one_job_and_a_rerun_submits_nothing_done(tmp_path):
    matrix = _write_matrix(tmp_path, [{"experiments": ["lora", "bf16-pure"], "models": ["tiny-llama"],
                                       "set": QUICK}], launcher={"time_limit": "10m"})
    out = tmp_path / "results"
    bench = _bench(matrix, out, "--launcher", LOCAL, "--wait", start_new_session=True)
    _wait_until(lambda: len(_entries(out)) == 2, what="two submissions")
    os.kill(bench.pid, signal.SIGKILL)  # the submitting process alone: its jobs are on their own
    bench.wait()
    bench.log.close()
    first = _entries(out)
    assert len({entry["job_id"] for entry in first.values()}) == 2

    code, output = _output(matrix, out, "--launcher", LOCAL, "--wait")  # resumes: waits, submits nothing twice
    assert code == 0, output
    assert _entries(out) == first, output  # no second job for a cell whose job was running or done
    records = schema.find_records(out)
    assert len(records) == 2, output
    fingerprint = env.fingerprint(env.current_environment("cpu"))
    for path in records:
        record = schema.read(path, kind="run")
        entry = first[path.stem]
        assert record.status == "ok" and record.fingerprint == fingerprint
        assert record.config["run_id"] == entry["run_id"]  # written by that very job
        assert {k: v for k, v in record.config.items() if k != "run_id"} == entry["config"]
        assert record.memory.source == "cpu-tracked-tensors" and record.throughput.timed_steps == QUICK["steps"]
        assert f"job {entry['job_id']}: {record.experiment} @ tiny-llama: ok" in output
    written = {p: p.read_bytes() for p in records}

    code, again = _output(matrix, out, "--launcher", LOCAL)
    assert code == 0 and again.count("done before, skipped (ok)") == 2 and "0 jobs submitted" in again
    assert _entries(out) == first and {p: p.read_bytes() for p in schema.find_records(out)} == written
    assert _status(matrix, out) == {stem: ("finished", entry["job_id"]) for stem, entry in first.items()}
    assert not _controllers(out)


@pytest.mark.slow
def test_a_job_killed_mid_run_is_a_failed_record_with_its_log_and_is_submitted_again(tmp_path):
    import psutil

    from harness.lab.runner import WORKER_NAME

    matrix = _write_matrix(tmp_path, [{"experiments": ["lora"], "models": ["tiny-llama"],
                                       "set": {**QUICK, "steps": 800}}])
    out = tmp_path / "results"
    code, output = _output(matrix, out, "--launcher", LOCAL, "--time-limit", "10m")
    assert code == 0 and "1 jobs submitted" in output, output
    [(cell, entry)] = _entries(out).items()
    controller = psutil.Process(int(entry["job_id"]))  # submitit's local job id: its controller's pid

    def worker():
        try:
            return [p for p in controller.children(recursive=True) if p.name() == WORKER_NAME]
        except psutil.NoSuchProcess:
            raise AssertionError("the job ended before its worker was seen: give the cell more steps") from None
    _wait_until(worker, what="the job's worker")  # measuring now
    assert _status(matrix, out) == {cell: ("running", entry["job_id"])}
    code, output = _output(matrix, out, "--launcher", LOCAL)
    assert f"job {entry['job_id']} running, not submitted again" in output and _entries(out)[cell] == entry

    [task] = controller.children()  # the job's process, which runs the cell (submitit's _submit)
    task.kill()
    controller.wait(timeout=60)
    _wait_until(lambda: not _workers_of(out), timeout=60, what="the worker to die with its job")
    assert _status(matrix, out) == {cell: ("failed", entry["job_id"])}
    [path] = schema.find_records(out)
    record = schema.read(path, kind="run")
    assert record.status == "failed" and record.error.type == "JobFailed"
    assert f"job {entry['job_id']} ended without a record" in record.error.message
    assert "Starting with JobEnvironment" in record.error.log_tail  # the job's own log
    assert record.config["run_id"] == entry["run_id"]

    code, output = _output(matrix, out, "--launcher", LOCAL)  # a failed record is not current: submitted again
    second = _entries(out)[cell]
    assert code == 0 and "submitted, submitit-local job" in output and second["job_id"] != entry["job_id"], output
    assert second["run_id"] != entry["run_id"]
    again = psutil.Process(int(second["job_id"]))
    for process in [*again.children(recursive=True), again]:  # no need to measure it: the first test does
        process.kill()
    again.wait(timeout=60)
    assert _status(matrix, out)[cell] == ("failed", second["job_id"])
    assert schema.read(path, kind="run").config["run_id"] == second["run_id"]  # its own failure, gathered
    _wait_until(lambda: not _workers_of(out), timeout=60, what="no worker left")


def test_a_cluster_cell_under_an_allocator_setting_is_done_by_its_own_record_only(tmp_path):
    from harness.lab.runner import cell_path
    from harness.matrix import PlannedRun

    config = resolve(EXPERIMENTS / "lora.yaml", {**QUICK, "device": "cuda"})
    versions = env.software_versions()
    default = PlannedRun(config, 0, cell_path(config, tmp_path), "")
    expandable = PlannedRun(config, 0, cell_path(config, tmp_path, 0, "expandable_segments"), "",
                            allocator="expandable_segments")
    # the job's record names the device it got and the setting its worker ran under
    environment = {"device_name": "NVIDIA H100 80GB HBM3", "versions": versions,
                   "cuda_alloc_conf": "expandable_segments:True"}
    record = schema.RunRecord("ok", "lora", config.experiment.model, config.as_dict(), config.config_hash,
                              environment=environment, fingerprint=env.fingerprint(environment))
    schema.write(expandable.path, record)
    assert launcher.current_record(expandable, tmp_path, versions).status == "ok"
    assert launcher.current_record(default, tmp_path, versions) is None
    # the same record filed as the default setting's is no current measurement of it
    shutil.copy(expandable.path, default.path)
    assert launcher.current_record(default, tmp_path, versions) is None
