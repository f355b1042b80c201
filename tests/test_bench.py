"""`harness bench`: matrix expansion, overrides, budgets, resume after SIGKILL, OOM rows."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import EXPERIMENTS, QUICK, ROOT, run_dict

from harness.config import ConfigError, experiment_files
from harness.matrix import expand, load_matrix
from harness.cards import card_bytes
from harness.measure.budget import budget_cap_bytes
from harness.techniques import TECHNIQUES

pytestmark = pytest.mark.slow  # real training steps in subprocesses; `make test-fast` skips them

MATRIX = load_matrix(EXPERIMENTS / "matrix.yaml")


def _runs(tmp_path, device="cpu", **options):
    return expand(MATRIX, device, EXPERIMENTS, tmp_path, **options)[0]


def _plan(tmp_path, device="cpu", **options):
    """The cells of the lab's own loop (the same cells in other loops: tests/test_engines.py)."""
    runs, skipped = expand(MATRIX, device, EXPERIMENTS, tmp_path, **options)
    return [(r.config.name, r.config.experiment.model, r.config.experiment.grad_accum, r.config.experiment.budget_gb,
             r.config.experiment.seq_len) for r in runs if r.config.experiment.engine == "harness"], skipped


def test_cpu_matrix_runs_every_experiment_on_tiny_llama_and_an_accumulation_series(tmp_path):
    plan, skipped = _plan(tmp_path)
    # every experiment but those no cpu block names: the recombinations of what the tiny block runs (the
    # rank sweep, the checkpointed and the other sharded variants) and the optimizers added since
    left_out = {"lora-r8", "lora-r64", "lora-r256", "lora-gc", "int8-lora-gc", "bf16-pure-gc", "fsdp2-gc",
                "fsdp2-offload", "fsdp2-offload-gc", "fsdp2-lora", "zero2", "zero3-offload", "sgd-momentum",
                "adafactor"}
    assert {p.stem for p in experiment_files(EXPERIMENTS)} - left_out == {name for name, *_ in plan}
    assert {model for _, model, *_ in plan} == {"tiny-llama", "base"} and not skipped
    techniques = set(TECHNIQUES) | {"loraplus"}  # every registered technique's file, and LoRA+
    assert {name for name, model, *_ in plan if model == "base"} == techniques  # loss parity on the base
    # the tiny block's LoRA run is the series' k=1 cell (same workload): planned once; the other k=1 cell
    # is the Trainer cross-check's own, over more timed steps
    assert sorted(k for name, model, k, *_ in plan if name == "lora" and model == "tiny-llama") == [1, 1, 2, 4, 8]
    finetunes = [run for run in _runs(tmp_path) if run.config.experiment.model == "base"]
    # each loss comparison: same data, steps and effective batch for every technique in it, and its
    # own fp32 reference; fp16 autocast (slow on a CPU) has a short comparison of its own
    comparisons: dict[tuple, set] = {}
    for r in finetunes:
        cell = r.config.experiment
        key = (cell.data.source, cell.steps, cell.micro_batch * cell.grad_accum, cell.eval_every)
        comparisons.setdefault(key, set()).add(r.config.name)
    assert sorted(map(sorted, comparisons.values())) == [sorted(techniques - {"fp16-mixed"}), ["fp16-mixed", "fp32"]]
    assert all(source == "stdlib-tests" and every > 0 for source, _, _, every in comparisons)


def test_cuda_matrix_follows_the_card_size(tmp_path):
    small, skipped = _plan(tmp_path, "cuda", device_gb=40)
    large, none_skipped = _plan(tmp_path, "cuda", device_gb=80)
    assert "mixtral-8x7b" not in {m for _, m, *_ in small} and len(skipped) == 1
    assert "mixtral-8x7b" in {m for _, m, *_ in large} and not none_skipped
    assert {m for _, m, *_ in small} == {"tinyllama-1.1b", "llama-2-7b", "mistral-7b", "llama-3.1-8b",
                                        "llama-3.2-3b", "base"}
    assert {(n, b) for n, m, _, b, _ in small if m == "mistral-7b"} == {("qlora", 16.0), ("qlora-gc", 16.0)}
    # Llama-3.1-8B at the longest sequence `predict --solve` found from tensor bytes for a 24 GB card (24 GiB:
    # a card's GB as sold, harness.cards.card_bytes)
    assert {(n, b, s) for n, m, _, b, s in small if m == "llama-3.1-8b"} == {("qlora-r32-gc", 24.0, 7627)}
    assert {s for _, m, *_, s in small if m not in ("base", "llama-2-7b", "llama-3.1-8b", "llama-3.2-3b")} == {
        512, 2048}
    # 7B at 512 (the documents'), 2048 and, for speed at micro-batch 2, 4096
    assert {s for _, m, *_, s in small if m == "llama-2-7b"} == {512, 2048, 4096}
    # the optimisation ladder, at torchtune's configuration
    assert {s for _, m, *_, s in small if m == "llama-3.2-3b"} == {4096}


def test_command_line_replacements(tmp_path):
    plan, _ = _plan(tmp_path, models=["llama-2-7b"], experiments=["qlora", "lora"], budgets_gb=[16.0],
                    seq_lens=[128])
    assert {(m, b, s) for _, m, _, b, s in plan} == {("llama-2-7b", 16.0, 128)}
    assert {n for n, *_ in plan} == {"qlora", "lora"}
    with pytest.raises(ConfigError, match="no experiment file"):
        _plan(tmp_path, experiments=["nonesuch"])


def test_repeats_get_their_own_records(tmp_path):
    runs, _ = expand(MATRIX, "cpu", EXPERIMENTS, tmp_path, experiments=["fp32"], repeat=3)
    # fp32 on the tiny preset (and again, with more timed steps, in the lab's loop and in Trainer), twice
    # on the base
    configurations = {r.config.config_hash for r in runs}
    assert len(configurations) == 5 and len(runs) == 15 and len({r.path for r in runs}) == 15
    for config in configurations:
        assert sorted(r.repeat for r in runs if r.config.config_hash == config) == [0, 1, 2]


def test_budget_arithmetic():
    from harness.device_memory import outside_allocator_bytes

    # a card's GB is its size as sold: binary, 24 GiB for a "24 GB" card; the H200 its measured bytes
    assert card_bytes(24) == 24 * 2**30 and card_bytes(141) == 150_109_880_320 and card_bytes(0.5) == 2**29
    assert budget_cap_bytes(16, "cuda") == 16 * 2**30 - outside_allocator_bytes()
    assert budget_cap_bytes(24, "cuda") - budget_cap_bytes(16, "cuda") == 8 * 2**30
    assert budget_cap_bytes(16, "cpu") == 16 * 2**30  # no CUDA context on a CPU
    assert budget_cap_bytes(0.1, "cuda") == 0


def _write_matrix(tmp_path, blocks):
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({"cpu": blocks, "cuda": []}))
    return path


def _bench(matrix, out, *extra, **popen):
    command = [sys.executable, "-m", "harness", "bench", "--matrix", str(matrix), "--out", str(out),
               "--experiments-dir", str(EXPERIMENTS), "--device", "cpu", *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def _workers(out):
    """The processes measuring a cell under `out`: forked ones carry the worker's name, new
    interpreters the worker's module; both hold the cell's lock and log open."""
    import psutil

    from harness.lab.runner import WORKER_NAME

    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] != WORKER_NAME and "harness.measure.worker" not in (process.info["cmdline"] or []):
            continue
        try:
            files = [f.path for f in process.open_files()]
        except psutil.Error:
            continue
        if any(path.startswith(str(out)) for path in files):
            found.append(process)
    return found


def _records(out):
    from harness.schema import find_records

    return find_records(out)  # a worker's attempt file (".*.attempt.json") becomes a record only when it ends


def test_a_matrix_killed_with_sigkill_resumes_with_exactly_the_missing_runs(tmp_path):
    matrix = _write_matrix(tmp_path, [{"experiments": ["lora", "qlora", "bf16-pure"], "models": ["tiny-llama"],
                                       "set": QUICK}])
    out = tmp_path / "results"
    process = _bench(matrix, out, start_new_session=True)
    deadline = time.time() + 300
    while not _records(out) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the bench and the run it had started
    process.wait()
    first = _records(out)
    assert len(first) == 1, first
    first_bytes = first[0].read_bytes()
    assert not [p for p in out.rglob("*.tmp")] or all(p.name.startswith(".") for p in out.rglob("*.tmp"))

    output = _bench(matrix, out).communicate(timeout=600)[0]
    finished = _records(out)
    assert len(finished) == 3, output
    assert first[0].read_bytes() == first_bytes  # the finished record was kept, not redone
    assert output.count("skipped") == 1
    assert all(json.loads(p.read_text())["status"] == "ok" for p in finished)
    assert not list(out.rglob("*.tmp"))

    again = _bench(matrix, out).communicate(timeout=300)[0]
    assert again.count("skipped") == 3 and _records(out) == finished  # nothing new to do


def test_an_oom_inside_a_matrix_is_a_row_and_the_matrix_completes(tmp_path):
    matrix = _write_matrix(tmp_path, [
        {"experiments": ["qlora"], "models": ["tiny-llama"], "budgets_gb": [0.04],
         "set": {**QUICK, "seq_len": 256}},
        {"experiments": ["lora"], "models": ["tiny-llama"], "set": QUICK}])
    out = tmp_path / "results"
    process = _bench(matrix, out)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    statuses = sorted(json.loads(p.read_text())["status"] for p in _records(out))
    assert statuses == ["ok", "oom"]
    table = output[output.index("experiment"):]
    assert "oom (forward)" in table or "oom (backward)" in table
    assert "lora" in table and "ok" in table


def test_one_worker_per_cell_and_it_dies_with_its_parent(tmp_path):
    """kill -9 of the bench alone takes its worker with it; a cell being measured is never started twice."""
    import psutil

    from harness.config import resolve
    from harness.lab.runner import WORKER_NAME, CellBusy, cell_lock

    matrix = _write_matrix(tmp_path, [{"experiments": ["lora"], "models": ["tiny-llama"],
                                       "set": {**QUICK, "steps": 400}}])
    out = tmp_path / "results"
    process = _bench(matrix, out, start_new_session=True)
    deadline = time.time() + 120
    while not _workers(out) and time.time() < deadline:
        time.sleep(0.1)
    [worker] = _workers(out)  # on a CPU, forked from the fork server the bench started
    assert worker.name() == WORKER_NAME
    assert any(f.path.endswith(".lock") for f in worker.open_files())  # it holds the cell's lock too
    os.kill(process.pid, signal.SIGKILL)  # the parent alone
    process.wait()
    worker.wait(timeout=30)  # the kernel killed it with its parent
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
    assert not _records(out)  # nothing half-written counts as a record
    config = resolve(EXPERIMENTS / "lora.yaml", QUICK)
    path, _ = run_dict(config, out)  # its lock was released with it
    with cell_lock(path):  # while another process measures this cell, it is not started again
        with pytest.raises(CellBusy, match="another process is measuring this cell"):
            run_dict(config, out)


def test_a_failed_rerun_never_replaces_a_measurement(tmp_path):
    from harness.config import resolve
    from harness.report.load import load_results, runs_frame

    config = resolve(EXPERIMENTS / "lora.yaml", QUICK)
    out = tmp_path / "results"
    path, first = run_dict(config, out)
    measured = path.read_bytes()
    attempt_path, attempt = run_dict(config, out, timeout_s=0.1)  # killed before it measures anything
    assert first["status"] == "ok" and attempt["status"] == "failed"
    assert path.read_bytes() == measured and attempt_path.parent == out / "attempts" / path.parent.name
    runs = runs_frame(load_results(out))
    assert list(runs["status"]) == ["ok"] and list(runs["failed_attempts"]) == [1]
    assert not list(out.rglob(".*.attempt.json")) and not list(out.rglob("*.tmp"))


def test_a_matrix_killed_at_random_moments_keeps_every_record_whole_and_leaves_nothing(tmp_path):
    """Killed 20 times, at random moments, the bench alone or with its worker: afterwards no record is
    lost, rewritten, duplicated or corrupt, no worker survives its bench, nothing is left behind."""
    import random


    matrix = _write_matrix(tmp_path, [{"experiments": ["lora", "bf16-pure", "qlora"], "models": ["tiny-llama"],
                                       "set": QUICK}])
    out = tmp_path / "results"
    rng = random.Random(0)
    seen: dict = {}

    def workers():
        return _workers(out)

    for attempt in range(20):
        process = _bench(matrix, out, start_new_session=True)
        try:  # a bench that ends before its moment has nothing left to kill: the next attempt starts at once
            process.wait(timeout=rng.uniform(0.5, 8.0))
        except subprocess.TimeoutExpired:
            if attempt % 2:
                os.killpg(process.pid, signal.SIGKILL)  # the whole group
            else:
                os.kill(process.pid, signal.SIGKILL)  # the bench alone: its worker must die with it
        process.wait()
        deadline = time.time() + 30
        while workers() and time.time() < deadline:
            time.sleep(0.1)
        assert not workers(), f"a worker outlived its bench (kill {attempt})"
        for path in _records(out):
            data = path.read_bytes()
            json.loads(data)  # never half-written
            assert seen.setdefault(path, data) == data, f"{path.name} was rewritten (kill {attempt})"
    output = _bench(matrix, out).communicate(timeout=600)[0]
    finished = _records(out)
    assert len(finished) == 3 and len({p.name for p in finished}) == 3, output
    assert all(json.loads(p.read_text())["status"] == "ok" for p in finished)
    assert all(seen.get(p, p.read_bytes()) == p.read_bytes() for p in finished)
    leftovers = [p for p in out.rglob("*") if p.is_file() and (p.name.endswith((".tmp", ".attempt.json")))]
    assert not leftovers and not workers()
