"""Cells of several ranks: one record from every rank's measurement, a failing rank named, no rank left behind."""

import dataclasses
import os
import signal
import threading
import time

import pytest
from conftest import EXPERIMENTS, QUICK, run_dict

from harness import schema
from harness.config import resolve
from harness.lab.runner import cell_log_path
from harness.measure.ranks import FAIL_RANK_VARIABLE, combine

TWO_RANKS = {**QUICK, "world_size": 2}


def _rank_processes(out) -> list:
    """The ranks measuring a cell under `out` (their command line names the attempt's path)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "harness.measure.worker" in cmdline and "torch.distributed.run" not in cmdline \
                and any(str(out) in part for part in cmdline):
            found.append(process)
    return found


def _gone(processes) -> bool:
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=30)
    return all(p.status() == psutil.STATUS_ZOMBIE for p in alive)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["fsdp2", "zero3"])
def test_two_ranks_make_one_record_with_the_highest_peaks_and_every_rank(tmp_path, experiment):
    path, record = run_dict(resolve(EXPERIMENTS / f"{experiment}.yaml", TWO_RANKS), tmp_path)
    assert record["status"] == "ok", record["error"]
    ranks, memory = record["ranks"], record["memory"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for key in ("peak_allocated", "tracked_step_peak"):
        assert memory[key] == max(r["memory"][key] for r in ranks) > 0
    assert sum(memory["breakdown_at_peak"].values()) == memory["tracked_step_peak"]
    assert record["host_peak_rss_bytes"] == max(r["host_peak_rss_bytes"] for r in ranks)
    per_rank = QUICK["seq_len"] * QUICK["micro_batch"]
    assert record["throughput"]["tokens_per_step"] == 2 * per_rank  # global: both ranks' tokens
    assert record["sharded_by"]["library"] == ("deepspeed" if experiment == "zero3" else "torch")
    if experiment == "zero3":  # DeepSpeed's collectives on gloo: its shared-memory op neither compiled nor loaded
        assert record["sharded_by"]["collectives"].startswith("gloo")
        log = cell_log_path(tmp_path, path).read_text()
        assert "Setting accelerator to CPU" in log and "shm_comm" not in log, log
    # each rank holds half the weights: fp32 shards (FSDP2), bf16 partitions (ZeRO-3)
    total = record["parameters"]["total"]
    weight_bytes = 2 if experiment == "zero3" else 4
    assert all(r["memory"]["breakdown_at_peak"]["weights"] == weight_bytes * total // 2 for r in ranks)
    # each rank trained on its own slice of the global batch
    assert ranks[0]["final_loss"] != ranks[1]["final_loss"]
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_cell_naming_it_and_no_rank_is_left(tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_RANK_VARIABLE, "1")
    path, record = run_dict(resolve(EXPERIMENTS / "fsdp2.yaml", TWO_RANKS), tmp_path)
    assert record["status"] == "failed"
    assert record["error"]["type"] == "InjectedFailure" and record["error"]["rank"] == 1
    assert schema.read(path).error.rank == 1
    assert not list(tmp_path.rglob("*.tmp"))  # the ranks' own records are gone, the attempt became the record
    assert not _rank_processes(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torchrun killed", "timed out"])
def test_no_rank_outlives_its_cell(tmp_path, how):
    """Killing torchrun alone takes its ranks with it (they die with their parent); a timed-out cell kills
    torchrun and every rank under it."""
    import psutil

    config = resolve(EXPERIMENTS / "fsdp2.yaml", {**TWO_RANKS, "steps": 5000})  # far longer than its time limit
    seen, done = [], threading.Event()

    def watch():  # the ranks, once both are running; then torchrun itself, if it is the one to kill
        while len(seen) < 2 and not done.is_set():
            seen[:] = _rank_processes(tmp_path)
            time.sleep(0.2)
        if how == "torchrun killed":
            time.sleep(3)  # past the ranks' start-up
            [torchrun] = {p.parent() for p in seen}
            os.kill(torchrun.pid, signal.SIGKILL)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        _, record = run_dict(config, tmp_path, timeout_s=15 if how == "timed out" else 300)
    finally:
        done.set()
        watcher.join()
    assert len(seen) == 2 and record["status"] == "failed"
    assert record["error"]["type"] == "ProcessDied" and record["error"]["returncode"] == -signal.SIGKILL
    assert _gone(seen), [p.pid for p in seen if psutil.pid_exists(p.pid)]


def _rank_record(rank: int, peak: int, weights: int, median: float, losses: list[float]) -> schema.RunRecord:
    breakdown = dict.fromkeys(schema.CATEGORIES, 0) | {"weights": weights, "activations": peak - weights}
    memory = schema.Memory("bytes", "cpu-tracked-tensors", "", peak, breakdown, {"weights": weights}, peak,
                           {"forward": peak}, {"forward": {"peak_allocated": peak}})
    throughput = schema.Throughput(100, {"median": median}, 100 / median, 1.0, 2, 1, False)
    loss = schema.Loss(losses, losses[-1], 1, [], None)
    return schema.RunRecord("ok", "fsdp2", "tiny-llama", {"world_size": 2}, "h", memory=memory,
                            throughput=throughput, loss=loss, host_peak_rss_bytes=1000 + rank, duration_s=5.0)


def test_the_cell_is_its_highest_rank_and_counts_every_rank_s_tokens():
    records = [_rank_record(0, 900, 300, 0.5, [8.0, 7.0]), _rank_record(1, 1000, 200, 1.0, [6.0, 5.0])]
    cell = combine(records)
    assert cell.memory.peak_allocated == cell.memory.tracked_step_peak == 1000
    assert cell.memory.breakdown_at_peak == records[1].memory.breakdown_at_peak  # the binding rank's: it adds up
    assert cell.host_peak_rss_bytes == 1001
    assert cell.throughput.tokens_per_step == 200 and cell.throughput.tokens_per_s == 200  # slowest rank's pace
    assert cell.loss.per_step == [7.0, 6.0] and cell.loss.final == 6.0
    assert [r["rank"] for r in cell.ranks] == [0, 1] and cell.ranks[0]["memory"]["peak_allocated"] == 900
    assert dataclasses.asdict(records[0].memory)["peak_allocated"] == 900  # the ranks' own records are untouched


def test_each_rank_gets_its_slice_of_the_global_batch():
    import numpy as np

    from harness.step.data import Batches

    alone = Batches(np.arange(10_000), 8, 2, 3, seed=0)
    ranks = [alone.for_rank(rank, 2) for rank in range(2)]
    for step in range(2):
        global_batch = [alone.for_rank(0, 1).step(2 * step + k, "cpu") for k in range(2)]  # two steps of one rank
        sequences = {tuple(s.tolist()) for batch in global_batch for micro in batch for s in micro}
        mine = [{tuple(s.tolist()) for micro in r.step(step, "cpu") for s in micro} for r in ranks]
        assert not mine[0] & mine[1] and mine[0] | mine[1] == sequences
    assert [b.tolist() for b in alone.for_rank(0, 1).step(1, "cpu")] == [b.tolist() for b in alone.step(1, "cpu")]


def test_world_sizes_expand_to_cells_and_gpus_bound_them_on_cuda(tmp_path):
    import yaml

    from harness.matrix import expand, load_matrix

    path = tmp_path / "matrix.yaml"
    block = {"experiments": ["fsdp2"], "models": ["tiny-llama"], "world_sizes": [1, 2, 4]}
    path.write_text(yaml.safe_dump({"cpu": [block], "cuda": [block, {**block, "min_devices": 8}]}))
    matrix = load_matrix(path)

    def sizes(device_type, devices):
        planned, skipped = expand(matrix, device_type, EXPERIMENTS, tmp_path, devices=devices)
        return sorted(run.config.experiment.world_size for run in planned), skipped

    assert sizes("cpu", None)[0] == [1, 2, 4]  # gloo processes, however many cores
    assert sizes("cuda", None)[0] == [1, 2, 4]  # a cluster's jobs get the GPUs they ask for
    planned, skipped = sizes("cuda", 2)
    assert planned == [1, 2] and "world size 4: this machine has 2 GPUs" in skipped[0]
    assert "needs 8 GPUs" in skipped[-1]


def test_run_nproc_is_the_cell_s_world_size():
    from harness.cli import _overrides, build_parser

    args = build_parser().parse_args(["run", str(EXPERIMENTS / "fsdp2.yaml"), "--nproc", "2"])
    assert _overrides(args)["world_size"] == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", str(EXPERIMENTS / "fsdp2.yaml"), "--nproc", "0"])
