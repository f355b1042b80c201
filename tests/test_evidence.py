"""The GPU evidence pass, checked without a GPU: its plan, its time budget, its missing packages."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXPERIMENTS, QUICK, ROOT

from harness import schema
from harness.blocks.optimizers import svd_flops
from harness.config import ResolvedConfig, resolve
from harness.lab.bench import estimate_runs, new_evidence_first, print_plan, run_matrix
from harness.lab.bench import default_timeout
from harness.arguments import parse_duration
from harness.lab.estimate import Estimate, estimate_run
from harness.step.models import resolve_source
from harness.matrix import PlannedRun, expand, load_matrix

MATRIX = load_matrix(EXPERIMENTS / "matrix.yaml")
BUDGET_S = 11 * 60
BASE_TECHNIQUES = ("fp32", "bf16-pure", "bf16-mixed", "fp16-mixed", "adamw8bit", "lora", "int8-lora", "qlora")


def _evidence(tmp_path, device_gb=141):
    planned, skipped = expand(MATRIX, "cuda", EXPERIMENTS, tmp_path, plan="evidence", device_gb=device_gb)
    estimate_runs(planned, "cuda")
    return planned, skipped


def test_the_evidence_plan_puts_the_documents_7b_claims_first_and_covers_every_base_technique(tmp_path):
    planned, skipped = _evidence(tmp_path)
    cells = [(r.config.name, r.config.experiment.model, r.config.experiment.seq_len, r.config.experiment.micro_batch)
             for r in planned]
    assert cells[0] == ("qlora", "llama-2-7b", 512, 1)
    first_7b = cells[:len(BASE_TECHNIQUES) + 1]  # the ledger's configuration, every base technique
    assert {name for name, model, seq, batch in first_7b if (model, seq, batch) == ("llama-2-7b", 512, 1)} \
        >= set(BASE_TECHNIQUES)
    assert set(BASE_TECHNIQUES) <= {name for name, model, *_ in cells if model == "tinyllama-1.1b"}
    assert not skipped and ("qlora", "mixtral-8x7b", 512, 1) in cells
    small, skipped_small = _evidence(tmp_path, device_gb=40)
    assert "mixtral-8x7b" not in {r.config.experiment.model for r in small} and len(skipped_small) == 1


def test_every_evidence_cell_is_a_cell_of_the_cuda_matrix(tmp_path):
    """So a later `make bench` on a GPU resumes after the evidence pass instead of redoing it."""
    evidence, _ = _evidence(tmp_path)
    cuda, _ = expand(MATRIX, "cuda", EXPERIMENTS, tmp_path, device_gb=141)
    assert {r.path for r in evidence} <= {r.path for r in cuda}


def test_a_new_card_measures_first_what_no_card_has_measured(tmp_path):
    planned, _ = _evidence(tmp_path)
    measured = ROOT / "results" / "nvidia-h200"
    record = json.loads((measured / planned[0].path.name).read_text())
    other_card = tmp_path / "nvidia-h200"
    other_card.mkdir()
    (tmp_path / "cpu").mkdir()
    for run, status in zip(planned[:3], ["ok", "oom", "failed"]):  # a failed record is no measurement
        (other_card / run.path.name).write_text(json.dumps({**record, "status": status}))
    for run in planned[3:5]:  # a record on the CPU is no repeat on a card
        (tmp_path / "cpu" / run.path.name).write_text(json.dumps(record))
    this_card = planned[5].path.parent  # this card's own record, by older code, is a repeat too
    this_card.mkdir()
    (this_card / planned[5].path.name).write_text(json.dumps(record))
    ordered = new_evidence_first(planned)
    assert ordered[-3:] == [planned[0], planned[1], planned[5]]  # repeats last, in the plan's order
    assert ordered[:-3] == planned[2:5] + planned[6:]


def test_the_dry_run_keeps_the_order_and_fits_the_budget(tmp_path):
    planned, _ = _evidence(tmp_path)
    out = io.StringIO()
    left_out = print_plan(planned, "no-records-yet", BUDGET_S, stream=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(planned)
    assert [line.split("]")[0] for line in lines] == [f"  [{i}/{len(planned)}" for i in range(1, len(planned) + 1)]
    started = [run for run in planned if run not in left_out]
    assert started and left_out  # the whole plan takes longer than one lease
    assert sum(run.estimate.seconds for run in started) <= BUDGET_S
    assert all("NOT STARTED" in line for line, run in zip(lines, planned) if run in left_out)
    # a cell is left out only when it does not fit what the cells before it left
    spent = 0.0
    for run in planned:
        if run in left_out:
            assert run.estimate.seconds > BUDGET_S - spent
        else:
            spent += run.estimate.seconds


def test_the_dry_run_command_prints_the_plan_with_estimates():
    output = subprocess.run(["make", "-s", "gpu-evidence", "DRY_RUN=1", f"PY={sys.executable}", "CARD_GB=80",
                             "TIME_BUDGET=8m"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert output.returncode == 0, output.stderr
    text = output.stdout
    assert "plan 'boundary,evidence'" in text and "time budget 480 s" in text and "a 80 GB card" in text
    # the boundary's cells first (on emulated cards), the first of them started (with its estimate); a later
    # cell, of the evidence plan, not
    assert re.search(r"\[1/\d+\] \S+ @ \S+ seq \d+ x1x1 budget \d+ GB: ~", text), text
    assert re.search(r"qlora @ mixtral-8x7b seq 512 x1x1: +\d+ s  NOT STARTED", text), text
    assert "would not start within the budget" in text


def test_estimates_grow_with_the_work():
    planned = {(r.config.name, r.config.experiment.model, r.config.experiment.seq_len): r
               for r in _evidence(Path("/nonexistent"))[0]}
    assert planned["lora", "llama-2-7b", 2048].estimate.flops > planned["lora", "llama-2-7b", 512].estimate.flops
    assert planned["fp32", "llama-2-7b", 512].estimate.seconds > planned["bf16-pure", "llama-2-7b", 512].estimate.seconds
    assert (planned["qlora-gc", "llama-2-7b", 512].estimate.flops
            > planned["qlora", "llama-2-7b", 512].estimate.flops)  # the recomputed forward
    mixtral = planned["qlora", "mixtral-8x7b", 512].estimate
    assert mixtral.build_s > 5 * planned["qlora-gc", "llama-2-7b", 512].estimate.build_s


def test_galore_and_compile_estimates_count_what_makes_their_first_steps_slow():
    model = resolve_source("llama-2-7b").config
    cell = {"model": "llama-2-7b", "seq_len": 2048, "micro_batch": 1, "device": "cuda"}
    plain, galore, compiled = (estimate_run(resolve(EXPERIMENTS / f"{name}.yaml", cell), model)
                               for name in ("bf16-pure", "galore", "bf16-pure-compile"))
    assert plain.first_steps_s == 0 and plain.first_steps == ""
    assert galore.first_steps == "GaLore's SVDs" and compiled.first_steps == "compilation"
    for slow in (galore, compiled):  # the same steps, and their first steps' term on top
        assert slow.flops == plain.flops and slow.first_steps_s > 0
        assert slow.seconds == pytest.approx(plain.seconds + slow.first_steps_s)
        assert slow.first_steps in slow.describe()
    # the SVDs come again every update_proj_gap optimizer steps: 9 steps (the tracked one included) at a gap of 4
    config = resolve(EXPERIMENTS / "galore.yaml", cell)
    config.experiment.optim.galore_update_proj_gap = 4
    assert estimate_run(config, model).first_steps_s == pytest.approx(3 * galore.first_steps_s)


def test_an_svd_costs_of_the_order_of_m_n_min_m_n():
    assert svd_flops(4096, 11008) == svd_flops(11008, 4096)
    assert svd_flops(8192, 22016) == 8 * svd_flops(4096, 11008)
    for m, n in ((4096, 4096), (4096, 11008), (128, 32000)):  # between 6 and 26 times m n min(m, n)
        assert 6 * m * n * min(m, n) <= svd_flops(m, n) <= 26 * m * n * min(m, n)


def test_the_galore_cell_the_h200_stopped_before_a_step_now_has_a_longer_limit():
    """Its record: stopped at its limit before a step finished; the SVDs alone take longer than that limit."""
    record = schema.read(ROOT / "results" / "nvidia-h200" / "galore__llama-2-7b__ad14a6ca2d37.json", "run")
    config = ResolvedConfig.from_dict(record.config)
    estimate = estimate_run(config, resolve_source(record.model).config)
    assert estimate.first_steps_s > record.error.timeout_s
    assert default_timeout(config) > record.error.timeout_s


def test_durations():
    assert parse_duration("11m") == 660 and parse_duration("90s") == 90 and parse_duration("1m30s") == 90
    assert parse_duration("600") == 600 and parse_duration("1h") == 3600 and parse_duration("2.5m") == 150
    for bad in ("", "m", "11x", "-5m", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_the_budget_starts_no_run_it_has_no_time_for(tmp_path, monkeypatch):
    """Runs in order; one over what is left is not started, a later smaller one still is."""
    config = resolve(EXPERIMENTS / "lora.yaml", QUICK)
    planned = [PlannedRun(config, 0, tmp_path / f"{name}.json", "", Estimate(seconds, 0, 0, 0))
               for name, seconds in (("a", 40), ("b", 100), ("c", 30), ("d", 25))]
    started = []

    def fake_run(config, out_dir, repeat, timeout_s, allocator=None):
        started.append(timeout_s)
        return tmp_path / "x.json", schema.RunRecord("ok", "lora", "tiny-llama", config.as_dict(), config.config_hash)

    monkeypatch.setattr("harness.lab.bench.run_config", fake_run)
    monkeypatch.setattr("harness.lab.bench.summary_line", lambda record: "ok")
    out = io.StringIO()
    results = run_matrix(planned, "f", budget_s=80, stream=out)
    assert len(results) == 3 and len(started) == 3  # a, c, d: b (100 s) never fits in 80 s
    assert "[2/4] lora @ tiny-llama" in out.getvalue() and "not started: estimated 100 s" in out.getvalue()
    assert all(timeout <= 80 for timeout in started)  # no run may outlast the budget


def test_a_run_under_an_allocator_setting_sets_it_for_its_worker_and_resumes_by_its_own_record(tmp_path, monkeypatch):
    from harness import env
    from harness.lab.bench import expected_fingerprint, is_current
    from harness.lab.runner import cell_path, run_config, worker_environment

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the user's own, for other runs
    assert worker_environment()["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    assert worker_environment("expandable_segments")["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    config = resolve(EXPERIMENTS / "lora.yaml", QUICK)
    with pytest.raises(ValueError, match="CUDA's caching allocator"):  # a CPU run has none: refused before it starts
        run_config(config, tmp_path, allocator="expandable_segments")
    assert not any(tmp_path.iterdir())
    # the launching process's environment has no setting; the worker's record names the one it ran under
    launching = {"device_name": "NVIDIA H100 80GB HBM3", "versions": {"torch": "2.13.0"}}
    worker = {**launching, "cuda_alloc_conf": "expandable_segments:True"}
    default = PlannedRun(config, 0, cell_path(config, tmp_path), "")
    expandable = PlannedRun(config, 0, cell_path(config, tmp_path, 0, "expandable_segments"), "",
                            allocator="expandable_segments")
    fingerprint = env.fingerprint(launching)
    assert expected_fingerprint(default, fingerprint, launching) == fingerprint
    assert expected_fingerprint(expandable, fingerprint, launching) == env.fingerprint(worker) != fingerprint
    record = schema.RunRecord("ok", "lora", "tiny-llama", config.as_dict(), config.config_hash,
                              environment=worker, fingerprint=env.fingerprint(worker))
    schema.write(expandable.path, record)
    assert is_current(expandable.path, expected_fingerprint(expandable, fingerprint, launching))
    calls = []
    monkeypatch.setattr("harness.lab.bench.run_config", lambda *args, **kwargs: calls.append(kwargs) or (
        default.path, schema.RunRecord("ok", "lora", "tiny-llama", config.as_dict(), config.config_hash)))
    monkeypatch.setattr("harness.lab.bench.summary_line", lambda record: "ok")
    run_matrix([default, expandable], fingerprint, environment=launching, stream=io.StringIO())
    assert [call["allocator"] for call in calls] == [None]  # the expandable run's record is current: not run again


def test_a_missing_optional_package_makes_a_skipped_record_not_a_failure(tmp_path):
    """bitsandbytes hidden from the import system, as on a machine that lacks it."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nfrom importlib.machinery import PathFinder\n\n"
        "class Without(PathFinder):\n    @classmethod\n    def find_spec(cls, name, path=None, target=None):\n"
        "        return None if name.split('.')[0] == 'bitsandbytes' else PathFinder.find_spec(name, path, target)\n\n"
        "sys.meta_path = [Without if f is PathFinder else f for f in sys.meta_path]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), str(ROOT)])}
    out = tmp_path / "results"
    expected = {"qlora": "skipped", "adamw8bit": "skipped", "lora": "ok"}
    # one bench of the three at a small shape (what is tested is the package, not the step)
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(json.dumps({"cpu": [{"experiments": list(expected), "models": ["tiny-llama"],
                                           "set": {"seq_len": 64, "micro_batch": 2, "warmup_steps": 0, "steps": 1}}],
                                  "cuda": []}))
    command = [sys.executable, "-m", "harness", "bench", "--matrix", str(matrix), "--out", str(out),
               "--experiments-dir", str(EXPERIMENTS), "--device", "cpu"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    records = {r["experiment"]: r for r in map(json.loads, map(Path.read_text, schema.find_records(out)))}
    assert {name: record["status"] for name, record in records.items()} == expected, done.stdout
    for name in ("qlora", "adamw8bit"):
        error = records[name]["error"]
        assert error["package"] == "bitsandbytes" and "not installed" in error["message"]
        assert f"{name} @ tiny-llama: skipped: bitsandbytes is not installed" in done.stdout
    assert "skipped" in schema.FINISHED and "skipped" not in schema.MEASURED  # rerun once it is installed


def test_plans_are_checked_by_name(tmp_path):
    from harness.config import ConfigError

    path = tmp_path / "matrix.yaml"
    path.write_text("cpu: []\n")
    with pytest.raises(ConfigError, match="cuda.*is required"):
        load_matrix(path)
    path.write_text("cpu: []\ncuda: []\nevidence: {models: [tiny-llama]}\n")
    with pytest.raises(ConfigError, match="evidence.*expected a list of blocks"):
        load_matrix(path)
    with pytest.raises(ConfigError, match="no such plan; plans: cpu, cpu-full, cuda, evidence"):
        expand(MATRIX, "cuda", EXPERIMENTS, tmp_path, plan="nonesuch")
