"""Core guarantees: accumulation equivalence, 4-bit weight bytes, batches, OOM and crash schema."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import EXPERIMENTS, QUICK, altered, run_dict

from harness import env, schema
from harness.config import LoraSettings, resolve
from harness.measure.memory import quant_constant_tensors
from harness.step.data import Batches, sequence_batch
from harness.step.models import build_base_model, prepare_for_training, resolve_source
from harness.step.train import Progress, train_step
from harness.techniques import TECHNIQUES


def _gradients(micro_batches):
    """Gradients of one train_step from the same initial fp32 model (optimizer step does nothing)."""
    source = resolve_source("tiny-llama")
    model = prepare_for_training(build_base_model(source, TECHNIQUES["fp32"], torch.device("cpu"), seed=0),
                                 TECHNIQUES["fp32"], LoraSettings(), gradient_checkpointing=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    captured = {}

    def capture():
        captured.update({n: p.grad.clone() for n, p in model.named_parameters()})

    loss = train_step(model, optimizer, micro_batches, "none", None, Progress(), after_backward=capture)
    return float(loss), captured


def test_accumulating_k_micro_batches_equals_one_batch_of_k_times_m():
    """k=4 micro-batches of m=2 vs one batch of 8 sequences: gradients equal to fp32 round-off."""
    stream = torch.randint(0, 4096, (20_000,)).numpy()
    k, m = 4, 2
    accumulated = Batches(stream, 32, m, k, seed=1).step(0, torch.device("cpu"))
    whole = Batches(stream, 32, k * m, 1, seed=1).step(0, torch.device("cpu"))
    assert torch.equal(torch.cat(accumulated), whole[0])  # same sequences, split differently
    loss_k, grads_k = _gradients(accumulated)
    loss_1, grads_1 = _gradients(whole)
    assert loss_k == pytest.approx(loss_1, rel=1e-5)
    # Stated tolerance: relative 1e-4 of each tensor's norm (fp32 summation order differs).
    for name, grad in grads_1.items():
        error = (grads_k[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 1e-4, (name, float(error))


def test_batches_depend_only_on_seed_and_index():
    stream = torch.arange(10_000).numpy()
    a = sequence_batch(stream, 16, first=5, count=3, seed=7)
    b = sequence_batch(stream, 16, first=0, count=8, seed=7)[5:]
    assert torch.equal(a, b) and not torch.equal(a, sequence_batch(stream, 16, 5, 3, seed=8))


def _linear_bytes(model):
    weights = sum(p.untyped_storage().nbytes() for n, p in model.named_parameters()
                  if n.endswith("proj.weight"))
    constants = sum(t.untyped_storage().nbytes() for t in quant_constant_tensors(model))
    return weights, constants


def test_nf4_weights_are_a_quarter_of_bf16_plus_the_quantization_constants():
    source = resolve_source("tiny-llama")
    bf16 = build_base_model(source, TECHNIQUES["lora"], torch.device("cpu"), seed=0)
    nf4 = build_base_model(source, TECHNIQUES["qlora"], torch.device("cpu"), seed=0)
    bf16_bytes, none = _linear_bytes(bf16)
    packed, constants = _linear_bytes(nf4)
    assert none == 0
    n = bf16_bytes // 2  # quantized parameters
    assert packed == n // 2  # two 4-bit codes per byte
    # Double quantization (QLoRA §3): one 8-bit absmax per block of 64 weights, one fp32 scale
    # per 256 of those, plus per tensor a 16-entry NF4 code, a 256-entry 8-bit code and an offset.
    tensors = sum(1 for name, _ in bf16.named_parameters() if name.endswith("proj.weight"))
    expected = n // 64 + 4 * -(-n // 64 // 256) + tensors * (16 * 4 + 256 * 4 + 4)
    assert constants == pytest.approx(expected, rel=0.01)
    ratio = (packed + constants) / bf16_bytes
    assert ratio == pytest.approx((0.5 + 1 / 64) / 2, rel=0.05)  # about 0.258 of bf16 at this size


def test_an_oom_is_a_record_and_the_caller_goes_on(tmp_path):
    """On CPU the memory cap is enforced on tracked tensor bytes: 0.04 GiB holds the model, not a step."""
    config = resolve(EXPERIMENTS / "qlora.yaml", {**QUICK, "seq_len": 256, "budget_gb": 0.04})
    path, record = run_dict(config, tmp_path)
    assert record["status"] == "oom", record.get("error")
    error = record["error"]
    assert error["phase"] in ("forward", "backward") and error["step"] == 0
    assert error["memory_reached_bytes"] > record["budget"]["cap_bytes"] == int(0.04 * 2**30)
    assert json.loads(path.read_text())["status"] == "oom"
    # the next run is unaffected
    _, after = run_dict(resolve(EXPERIMENTS / "lora.yaml", QUICK), tmp_path)
    assert after["status"] == "ok"


def test_a_process_that_dies_leaves_a_failed_record(tmp_path):
    config = resolve(EXPERIMENTS / "fp32.yaml", {**QUICK, "steps": 400})  # a run that cannot end in time
    path, record = run_dict(config, tmp_path, timeout_s=0.5)
    assert record["status"] == "failed" and record["error"]["type"] == "ProcessDied"
    assert "signal 9" in record["error"]["message"]
    assert json.loads(path.read_text()) == record


def test_records_are_written_atomically_and_never_shared(tmp_path):
    path = schema.write_atomic(tmp_path / "r.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    cpu = env.device_name("cpu")
    paths = {schema.record_path(tmp_path, env.device_slug(device), "lora", "tiny-llama", digest)
             for device in (cpu, "NVIDIA H100 80GB HBM3") for digest in ("a" * 64, "b" * 64)}
    assert len(paths) == 4  # neither two configurations nor two devices share a record file
    assert env.device_slug(cpu) == "cpu"


def _git(folder, *arguments):
    return subprocess.run(["git", "-c", "user.name=lab", "-c", "user.email=lab@example.org", *arguments],
                          cwd=folder, check=True, capture_output=True, text=True).stdout.strip()


def _git_state_of_copy(project):
    """git_state as the copy's own package reports it, in a process that imports the copy."""
    code = "import json; from harness import env; print(json.dumps([str(env.PACKAGE_ROOT), env.git_state()]))"
    done = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(project)})
    package, state = json.loads(done.stdout)
    assert package == str((project / "harness").resolve())
    return state


def test_a_copy_of_the_project_inside_another_repository_names_no_commit(tmp_path):
    outer = tmp_path / "outer"
    project = outer / "vendor" / "lab"
    shutil.copytree(env.PACKAGE_ROOT, project / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(env.PACKAGE_ROOT.parent / "pyproject.toml", project)
    _git(outer, "init", "-q")
    _git(outer, "add", ".")
    _git(outer, "commit", "-qm", "a repository that holds a copy of the lab")
    # the outer repository's commit and clean state say nothing of this code; its digest still does
    assert _git_state_of_copy(project) == {"commit": None, "dirty": None, "code_digest": env.code_digest()}
    _git(project, "init", "-q")  # the same copy as a repository of its own names its commit and its changes
    _git(project, "add", ".")
    _git(project, "commit", "-qm", "the lab")
    assert _git_state_of_copy(project) == {"commit": _git(project, "rev-parse", "HEAD"), "dirty": False,
                                           "code_digest": env.code_digest()}
    with open(project / "pyproject.toml", "a") as handle:
        handle.write("\n")
    assert _git_state_of_copy(project)["dirty"] is True


def test_failures_inside_the_run_are_recorded(tmp_path):
    # validate refuses a missing model file: it goes missing between validation and the run
    config = altered(resolve(EXPERIMENTS / "lora.yaml", QUICK), model=str(tmp_path / "missing.json"))
    _, record = run_dict(config, tmp_path)
    assert record["status"] == "failed" and record["error"]["phase"] == "load"
    assert "missing.json" in record["error"]["message"]
