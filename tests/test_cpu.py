"""What the lab does on a CPU that only emulates bf16 and fp16 (AVX2 without AVX512-BF16 or AMX).

Such a CPU's bf16 matrix products fall back to torch's scalar loops, about 15 to 180 times slower
than fp32: the lab asks torch what the CPU runs natively, records it, and lets it decide what
the CPU plan runs. These tests emulate both kinds of CPU by replacing torch's answer.
"""

import io
import json

import pytest
from conftest import EXPERIMENTS

from harness import env, schema
from harness.lab.bench import run_matrix
from harness.matrix import expand, load_matrix
from harness.report.load import load_results, runs_frame
from harness.report.render import _cpu_text
from harness.report.tables import runs_table
from harness.step import checkpoint

MATRIX = load_matrix(EXPERIMENTS / "matrix.yaml")
AVX2 = {"capability": "AVX2", "bf16_native": False, "fp16_native": False}
AMX = {"capability": "AVX512", "bf16_native": True, "fp16_native": True}


@pytest.fixture
def cpu_like(monkeypatch):
    """Make the lab see a CPU with the given features (torch's own answer replaced)."""
    def use(features: dict):
        monkeypatch.setattr(env, "cpu_features", lambda: dict(features))
    return use


def test_the_cpu_features_are_torchs_own_report():
    import torch

    features = env.cpu_features()
    assert features == {"capability": torch.backends.cpu.get_cpu_capability(),
                        "bf16_native": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                        "fp16_native": torch.ops.mkldnn._is_mkldnn_fp16_supported()}
    assert env.current_environment("cpu")["cpu"] == features
    assert "cpu" not in env.current_environment("cuda") and env.emulated_dtypes("cuda") == frozenset()
    assert env.run_environment(torch.device("cpu"))["cpu"] == features


def test_the_same_cpu_with_bf16_emulated_is_another_environment(cpu_like):
    cpu_like(AMX)
    native = env.current_environment("cpu")
    assert env.emulated_dtypes("cpu") == frozenset()
    cpu_like(AVX2)
    emulated = env.current_environment("cpu")
    assert env.emulated_dtypes("cpu") == {"bf16", "fp16"}
    assert native["device_name"] == emulated["device_name"]
    assert env.fingerprint(native) != env.fingerprint(emulated)  # a record of one is not current on the other
    # a GPU record's fingerprint is what it was before CPUs were described
    gpu = {"device_name": "NVIDIA H200", "versions": {"torch": "2.9"}}
    assert env.fingerprint(gpu) == env.fingerprint({**gpu, "cpu": None})


def test_an_emulating_cpu_pretrains_the_base_in_fp32_and_its_name_says_so(cpu_like):
    recipe = checkpoint.RECIPES["cpu"]
    cpu_like(AMX)
    assert checkpoint.recipe_for("cpu") == recipe
    # the base the committed fine-tunes name is found again where bf16 is native
    assert checkpoint.recipe_id(recipe) == "tiny-llama-8e686b3b83"
    cpu_like(AVX2)
    emulated = checkpoint.recipe_for("cpu")
    assert emulated.technique == "fp32" and emulated == checkpoint.pretrained_here(recipe, "cpu")
    assert {**vars(emulated), "technique": recipe.technique} == vars(recipe)  # only the precision differs
    assert checkpoint.recipe_id(emulated).startswith("tiny-llama-fp32-")
    assert checkpoint.checkpoint_dir(emulated) != checkpoint.checkpoint_dir(recipe)
    assert checkpoint.recipe_for("cuda") == checkpoint.RECIPES["cuda"]  # a GPU emulates nothing


def _cells(runs):
    """Each planned cell by its block and place in the block."""
    return {(r.config.name, r.config.experiment.model, r.config.experiment.engine, r.config.experiment.grad_accum,
             r.note): r for r in runs}


def test_an_emulating_cpu_runs_its_half_precision_cells_shorter_or_leaves_them_to_another_machine(tmp_path):
    native = _cells(expand(MATRIX, "cpu", EXPERIMENTS, tmp_path)[0])
    emulated = _cells(expand(MATRIX, "cpu", EXPERIMENTS, tmp_path, emulated=frozenset({"bf16", "fp16"}))[0])
    assert native.keys() == emulated.keys()  # the same cells, each run, shortened or left with its reason
    assert not any(r.shortened or r.left_to for r in native.values())
    kinds = {}
    for key, run in emulated.items():
        config, plain = run.config, native[key].config
        if run.left_to:  # left to another machine: the cell as the block has it, and why
            assert config == plain and "this CPU emulates" in run.left_to and not run.shortened, key
            kinds.setdefault("left", set()).add((key[1], key[2], config.technique.compute_dtype))
        elif run.shortened:  # the memory step and one timed step at a smaller shape, the rest as the block has it
            cell = config.experiment
            assert (cell.seq_len, cell.micro_batch, cell.warmup_steps, cell.steps) == (64, 2, 0, 1)
            assert "emulate" in run.shortened and cell.grad_accum == plain.experiment.grad_accum, key
            assert config.config_hash != plain.config_hash
            kinds.setdefault("shortened", set()).add((key[1], config.technique.compute_dtype))
        else:  # what it always was: fp32 outside a block that is shortened as a whole
            assert config == plain and config.technique.compute_dtype == "fp32", key
            kinds.setdefault("as it is", set()).add((key[1], key[2]))
    # the tiny preset's cells run shorter (the technique table as a whole, fp32 too); the loops' speed
    # comparison runs fp32 in both loops and leaves its half-precision cells to another machine; the loss
    # comparisons on the base, comparisons like with like, leave every cell, fp32 references included
    assert kinds["shortened"] == {("tiny-llama", "bf16"), ("tiny-llama", "fp16"), ("tiny-llama", "fp32")}
    assert kinds["as it is"] == {("tiny-llama", "harness"), ("tiny-llama", "trainer")}
    assert {(model, engine) for model, engine, dtype in kinds["left"] if dtype != "fp32"} == {
        ("base", "harness"), ("tiny-llama", "harness"), ("tiny-llama", "trainer")}
    assert {(model, engine) for model, engine, dtype in kinds["left"] if dtype == "fp32"} == {("base", "harness")}
    # the command line still decides over the rule
    chosen = expand(MATRIX, "cpu", EXPERIMENTS, tmp_path, emulated=frozenset({"bf16"}), experiments=["lora"],
                    seq_lens=[128])[0]
    assert {r.config.experiment.seq_len for r in chosen if r.shortened} == {128}


def _left_run(tmp_path):
    runs = expand(MATRIX, "cpu", EXPERIMENTS, tmp_path / "results", emulated=frozenset({"bf16"}),
                  experiments=["lora"], models=["base"])[0]
    run = next(r for r in runs if r.left_to)
    return run


def test_a_cell_left_to_another_machine_is_a_skipped_record_saying_why(tmp_path, cpu_like):
    cpu_like(AVX2)
    run = _left_run(tmp_path)
    environment = env.current_environment("cpu")
    output = io.StringIO()
    [record] = run_matrix([run], env.fingerprint(environment), environment=environment, stream=output)
    assert record.status == "skipped" and record.error.type == "EmulatedHere"
    assert record.emulated == run.left_to == record.error.message and record.environment["cpu"] == AVX2
    on_disk = schema.read(run.path, kind="run")
    assert on_disk.status == "skipped" and on_disk.config_hash == run.config.config_hash
    assert f"skipped: {run.left_to}" in output.getvalue()
    # the report says which CPU and why, without a traceback
    runs = runs_frame(load_results(tmp_path / "results"))
    text = _cpu_text(runs)
    assert "1 record on AVX2 (bf16 emulated)" in text and run.left_to in text
    row = runs_table(runs).rows[0]
    assert any("AVX2, bf16 emulated" in cell.detail for cell in row)
    assert any("left to another machine" in cell.detail for cell in row)


def test_a_measurement_made_elsewhere_stays_where_this_cpu_leaves_the_cell(tmp_path, cpu_like):
    cpu_like(AVX2)
    run = _left_run(tmp_path)
    measured = {"status": "ok", "experiment": "lora", "model": "base", "config": run.config.as_dict(),
                "config_hash": run.config.config_hash, "kind": "run", "schema_version": 1,
                "environment": {"device_name": env.device_name("cpu"), "cpu": AMX}}
    schema.write_atomic(run.path, measured)
    before = run.path.read_bytes()
    environment = env.current_environment("cpu")
    output = io.StringIO()
    assert run_matrix([run], env.fingerprint(environment), environment=environment, stream=output) == []
    assert "the measurement made elsewhere stays" in output.getvalue() and run.path.read_bytes() == before
    assert not list((tmp_path / "results").rglob("*.attempt.json"))
    assert not (tmp_path / "results" / schema.ATTEMPTS_FOLDER).exists()
    assert json.loads(before)["environment"]["cpu"]["bf16_native"] is True


def test_trainer_arguments_are_validated_alike_on_every_machine(monkeypatch):
    """TrainingArguments refuses bf16 where it finds none unless the run is on a CPU (a CPU without native
    bf16 answers so): validation builds the user's arguments with the lab's own fields as no device decides
    them, since the engine sets the precision and device itself."""
    import transformers.training_args

    from harness.config import prepare

    pytest.importorskip("trl")
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *_, **__: False)
    for engine in ("trainer", "trl-sft"):
        config = prepare(EXPERIMENTS / "lora.yaml", {"engine": engine, "device": "cpu",
                                                     "training_args": {"max_grad_norm": 1.0}})
        assert config["training_args"] == {"max_grad_norm": 1.0}
