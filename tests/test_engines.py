"""Engines: the same cell in the lab's loop, transformers' Trainer and TRL's SFTTrainer, measured alike."""

import dataclasses
import json
import math

import pytest
from conftest import EXPERIMENTS, QUICK, run_dict

from harness import schema
from harness.blocks.optimizers import OPTIMIZERS, galore_targets
from harness.config import ConfigError, load_experiment, prepare, resolve, resolve_technique
from harness.engines.arguments import (
    BLOCKS,
    OPTIM_NAMES,
    OWNED,
    NotMapped,
    arguments_class,
    checkpointing_fields,
    mapped_arguments,
)
from harness.matrix import expand, load_matrix
from harness.report import engines as report_engines
from harness.report.load import load_results
from harness.techniques import TECHNIQUES

BASE_TECHNIQUES = sorted(TECHNIQUES)


# -- experiment files --------------------------------------------------------------------------

def _experiment(tmp_path, text: str):
    path = tmp_path / "e.yaml"
    path.write_text(text)
    return load_experiment(path)[1]


@pytest.mark.parametrize("text, field, words", [
    ("technique: lora\nengine: keras\n", "engine", "not allowed"),
    ("technique: lora\ntraining_args: {max_grad_norm: 1.0}\n", "training_args", "engine: trainer"),
    ("technique: lora\nengine: trainer\ntraining_args: {max_grad_nrom: 1.0}\n", "training_args.max_grad_nrom",
     "not a field"),
    ("technique: lora\nengine: trainer\ntraining_args: {per_device_train_batch_size: 8}\n",
     "training_args.per_device_train_batch_size", "micro_batch"),
    ("technique: lora\nengine: trainer\ntraining_args: {optim: adamw_torch}\n", "training_args.optim", "optimizer"),
    ("technique: lora\nengine: trainer\ntraining_args: {use_liger_kernel: true}\n", "training_args.use_liger_kernel",
     "liger_kernels"),
    ("technique: lora\nengine: trl-sft\ntraining_args: {activation_offloading: true}\n",
     "training_args.activation_offloading", "activation_offloading"),
    ("technique: lora\nengine: trainer\ntraining_args: {optim_args: rank=4}\n", "training_args.optim_args",
     "galore_rank"),
    ("technique: lora\nengine: trainer\ntraining_args: {torch_compile_mode: max-autotune}\n",
     "training_args.torch_compile_mode", "compile"),
])
def test_engine_and_training_args_are_checked(tmp_path, text, field, words):
    with pytest.raises(ConfigError) as error:
        _experiment(tmp_path, text)
    assert error.value.field_name == field and words in error.value.message


def test_a_users_own_training_arguments_pass_through(tmp_path):
    cfg = _experiment(tmp_path, "technique: lora\nengine: trainer\n"
                                "training_args: {max_grad_norm: 1.0, lr_scheduler_type: cosine}\n")
    arguments, notes = _mapped(cfg, "trainer", "cpu", tmp_path)
    assert arguments["max_grad_norm"] == 1.0 and arguments["lr_scheduler_type"] == "cosine"
    assert any("training_args" in note for note in notes)


def test_the_engine_is_part_of_the_configuration_and_harness_keeps_every_earlier_hash():
    lab = prepare(EXPERIMENTS / "lora.yaml", QUICK)
    trainer = prepare(EXPERIMENTS / "lora.yaml", {**QUICK, "engine": "trainer"})
    assert lab["engine"] == "harness" and trainer["engine"] == "trainer"
    assert lab["config_hash"] != trainer["config_hash"]
    earlier = {k: v for k, v in lab.items() if k not in ("engine", "training_args", "config_hash")}
    from harness.config import config_hash
    assert config_hash(earlier) == lab["config_hash"]


# -- the mapping to TrainingArguments ----------------------------------------------------------

def _model_config(cfg):
    from harness.step.models import resolve_source

    return resolve_source(cfg.model).config


def _mapped(cfg, engine: str, device: str, tmp_path) -> tuple[dict, list[str]]:
    return mapped_arguments(cfg, resolve_technique(cfg), engine, device, str(tmp_path), _model_config(cfg))


@pytest.mark.parametrize("name", BASE_TECHNIQUES + ["loraplus", "lora-gc", "lora-ga4"])
def test_every_base_technique_maps_to_real_training_arguments(tmp_path, name):
    from transformers import TrainingArguments

    cfg = load_experiment(EXPERIMENTS / f"{name}.yaml")[1]
    technique = resolve_technique(cfg)
    for device in ("cpu", "cuda") if technique.autocast != "fp16" else ("cuda",):  # fp16 on CPU: below
        arguments, _ = _mapped(cfg, "trainer", device, tmp_path)
        assert set(arguments) <= {f.name for f in dataclasses.fields(TrainingArguments)}
        assert arguments["bf16"] == (technique.autocast == "bf16")
        assert arguments["fp16"] == (technique.autocast == "fp16")
        assert arguments["per_device_train_batch_size"] == cfg.micro_batch
        assert arguments["gradient_accumulation_steps"] == cfg.grad_accum
        assert arguments[checkpointing_fields()[0]] == cfg.gradient_checkpointing
        assert arguments["max_steps"] == cfg.warmup_steps + cfg.steps + 1  # + the tracked step
        expected = {"adamw": "adamw_torch_fused" if device == "cuda" else "adamw_torch",
                    "adamw8bit": "adamw_bnb_8bit", "paged_adamw8bit": "paged_adamw_8bit"}
        assert arguments.get("optim") == expected.get(technique.optimizer)  # LoRA+: Trainer's optimizers=
    if technique.autocast != "fp16":  # TrainingArguments refuses fp16 without a GPU
        TrainingArguments(**_mapped(cfg, "trainer", "cpu", tmp_path)[0])


def test_what_trainer_cannot_express_is_said_not_approximated(tmp_path):
    cfg = load_experiment(EXPERIMENTS / "bf16-pure-gc-optim-in-bwd.yaml")[1]
    with pytest.raises(NotMapped, match="optimizer_in_backward"):
        _mapped(cfg, "trainer", "cpu", tmp_path)
    # accelerate ignores fp16 on a CPU (the run would be fp32 under fp16's name)
    cfg = load_experiment(EXPERIMENTS / "fp16-mixed.yaml")[1]
    with pytest.raises(NotMapped, match="trains in fp32"):
        _mapped(cfg, "trainer", "cpu", tmp_path)
    assert {"per_device_train_batch_size", "optim", "train_sampling_strategy", "logging_steps"} <= set(OWNED)


# Each building block in each engine: the TrainingArguments / SFTConfig fields it sets, or words of
# why that engine has none. "kwargs" stands for this version's checkpointing kwargs field.
BLOCK_CASES = [
    ("liger_kernels", "trainer", {"use_liger_kernel": True}),
    ("liger_kernels", "trl-sft", {"use_liger_kernel": True}),
    ("compile", "trainer", {"torch_compile": True}),
    ("compile", "trl-sft", {"torch_compile": True}),
    ("activation_offloading", "trainer", "no activation offloading"),
    ("activation_offloading", "trl-sft", {"activation_offloading": True}),
    ("selective_checkpointing", "trainer", "no selective checkpointing"),
    ("selective_checkpointing", "trl-sft", {"kwargs": {"use_reentrant": False, "selective": True}}),
    ("optimizer_in_backward", "trl-sft", "no per-parameter optimizer step in backward"),
]


@pytest.mark.parametrize("block, engine, expected", BLOCK_CASES)
def test_each_building_block_maps_to_its_field_or_says_why_not(tmp_path, block, engine, expected):
    if engine == "trl-sft":
        pytest.importorskip("trl")
    # bf16-pure with checkpointing, which every block here may be combined with
    cfg = dataclasses.replace(load_experiment(EXPERIMENTS / "bf16-pure-gc.yaml")[1], **{block: True})
    if isinstance(expected, str):
        with pytest.raises(NotMapped, match=expected):
            _mapped(cfg, engine, "cuda", tmp_path)
        return
    arguments, _ = _mapped(cfg, engine, "cpu", tmp_path)
    kwargs = checkpointing_fields()[1]
    for field, value in expected.items():
        assert arguments[kwargs if field == "kwargs" else field] == value
    built = arguments_class(engine)(**arguments)  # real fields, accepted as they are
    for field, value in expected.items():
        assert getattr(built, kwargs if field == "kwargs" else field) == value


def test_every_block_and_optimizer_has_a_mapping_or_a_reason():
    assert {"selective_checkpointing", "optimizer_in_backward", "activation_offloading", "liger_kernels",
            "compile"} <= set(BLOCKS)
    assert all(set(engines) == {"trainer", "trl-sft"} for engines in BLOCKS.values())
    # every optimizer but LoRA+ (peft's optimizer handed to Trainer) has an `optim` name or why it has none
    assert set(OPTIMIZERS) == set(OPTIM_NAMES) | {"loraplus"} and "loraplus" not in OPTIM_NAMES


@pytest.mark.parametrize("name, optim", [("galore", "galore_adamw"), ("ao-adamw8bit", "adamw_torch_8bit"),
                                         ("ao-adamw4bit", "block_size 256"), ("ao-adamw-fp8", "AdamWFp8"),
                                         ("sgd-momentum", "sgd"), ("adafactor", "transformers' own Adafactor")])
def test_the_optimizers_beyond_the_documents_map_to_trainers_own(tmp_path, name, optim):
    from transformers import TrainingArguments

    cfg = load_experiment(EXPERIMENTS / f"{name}.yaml")[1]
    if " " in optim or optim[0].isupper():  # words of why Trainer has no such optimizer
        with pytest.raises(NotMapped, match=optim):
            _mapped(cfg, "trainer", "cpu", tmp_path)
        return
    arguments, notes = _mapped(cfg, "trainer", "cpu", tmp_path)
    assert arguments["optim"] == optim
    TrainingArguments(**arguments)
    if name == "sgd-momentum":  # Trainer reads SGD's momentum from optim_args
        assert arguments["optim_args"] == "momentum=0.9"
    if name != "galore":
        return
    # Trainer projects the layers the lab's GaLore projects, with the experiment's settings
    assert arguments["optim_target_modules"] == galore_targets(_model_config(cfg))
    assert set(arguments["optim_target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"}
    from transformers.trainer_optimizer import _parse_optim_args

    assert _parse_optim_args(arguments["optim_args"]) == {"rank": str(cfg.optim.galore_rank),
                                                          "update_proj_gap": str(cfg.optim.galore_update_proj_gap),
                                                          "scale": str(cfg.optim.galore_scale)}
    assert any("eps 1e-06" in note for note in notes)  # Trainer's GaLore: galore-torch's eps, not the experiment's


# -- the matrix ----------------------------------------------------------------------------------

def test_make_bench_runs_the_base_techniques_in_both_loops_on_the_same_cells(tmp_path):
    matrix = load_matrix(EXPERIMENTS / "matrix.yaml")
    # on a GPU, also the main techniques at 7B, 2048-4096 x 2 (speed where the GPU sets the step time)
    for device, models in (("cpu", {"tiny-llama"}), ("cuda", {"tinyllama-1.1b", "llama-2-7b"})):
        planned, _ = expand(matrix, device, EXPERIMENTS, tmp_path, device_gb=80)
        trainer = [r for r in planned if r.config.experiment.engine == "trainer"]
        assert trainer and {r.config.experiment.model for r in trainer} == models
        lab = {schema.configuration_key({"experiment": r.config.name, "model": r.config.experiment.model,
                                         "config": {**r.config.as_dict(), "engine": "harness"}}, "x") for r in planned
               if r.config.experiment.engine == "harness"}
        for run in trainer:  # every Trainer cell has the lab's run of the same configuration in the plan
            key = schema.configuration_key({"experiment": run.config.name, "model": run.config.experiment.model,
                                            "config": {**run.config.as_dict(), "engine": "harness"}}, "x")
            assert key in lab, run.config.name
            assert run.config.experiment.steps >= report_engines.MIN_TIMED_STEPS  # enough for a throughput verdict
    cpu = {r.config.name for r in expand(matrix, "cpu", EXPERIMENTS, tmp_path)[0]
           if r.config.experiment.engine == "trainer"}
    assert {"fp32", "bf16-mixed", "lora", "qlora"} <= cpu


# -- the report ----------------------------------------------------------------------------------

def _record(engine: str, peak: int, tokens_per_s: float, loss: float, activations: int, timed_steps: int = 2,
            spread: float = 0.01) -> dict:
    config = {**prepare(EXPERIMENTS / "lora.yaml", {**QUICK, "steps": timed_steps}), "engine": engine}
    return {"kind": "run", "status": "ok", "experiment": "lora", "model": "tiny-llama", "config": config,
            "config_hash": config["config_hash"] + engine, "finished_at": "2026-01-01T00:00:00",
            "memory": {"unit": "bytes", "source": "cpu-tracked-tensors", "note": "", "peak_allocated": peak,
                       "breakdown_at_peak": {"weights": 100, "activations": activations}, "persistent": {},
                       "tracked_step_peak": peak, "tracked_phase_peaks": {}, "phases": {}},
            "throughput": {"tokens_per_step": 128, "step_time_s": {"median": 1.0, "stdev": spread},
                           "tokens_per_s": tokens_per_s, "load_seconds": 1.0, "timed_steps": timed_steps,
                           "warmup_steps": 1,
                           "timing_includes_tracking": False},
            "loss": {"per_step": [loss], "final": loss, "warmup_steps": 1, "eval": [], "eval_final": None}}


def test_the_report_pairs_each_loop_with_ours_and_says_why_they_differ(tmp_path):
    folder = tmp_path / "cpu"
    folder.mkdir()
    for engine, peak, speed, loss, activations in (("harness", 1000, 100.0, 5.0, 900),
                                                   ("trainer", 1200, 80.0, 5.01, 1100)):
        (folder / f"lora-{engine}.json").write_text(json.dumps(_record(engine, peak, speed, loss, activations)))
    results = load_results(tmp_path)
    assert [r["config"]["engine"] for r in results.records] == ["harness"]  # the other tables see ours only
    [comparison] = report_engines.engine_comparisons(results)
    assert comparison.engine == "trainer"
    assert math.isclose(comparison.peak_ratio, 1.2) and math.isclose(comparison.tokens_ratio, 0.8)
    assert math.isclose(comparison.loss_difference, 0.01)
    why = report_engines.why(comparison)
    assert "activations at the peak +0.0 MiB" in why and "throughput:" in why
    table = report_engines.engine_table([comparison])
    assert table.rows[0][3].text == "1.200" and table.rows[0][4].text == "0.80" and "CPU" in table.rows[0][1].text


def test_a_loop_is_paired_with_our_run_on_its_own_machine_shown_or_folded(tmp_path):
    """One cell measured on two CPUs: the newer run (one machine) is shown, the older folded; Trainer on the
    older machine is divided by our run there, never by the other processor's; on a third machine, by none."""
    folder = tmp_path / "cpu"
    folder.mkdir()
    runs = (("harness", "CPU (X)", "AVX512", 1000.0, "2026-01-02"),
            ("harness", "CPU (Y)", "AVX2", 100.0, "2026-01-01"),
            ("trainer", "CPU (Y)", "AVX2", 90.0, "2026-01-01"),
            ("trainer", "CPU (Z)", "AVX2", 10.0, "2026-01-01"))
    for index, (engine, device, capability, speed, finished) in enumerate(runs):
        record = {**_record(engine, 1000, speed, 5.0, 900), "finished_at": finished,
                  "environment": {"device_type": "cpu", "device_name": device, "cpu": {"capability": capability}}}
        if device == "CPU (Z)":
            record["config_hash"] += "z"
        (folder / f"lora-{index}.json").write_text(json.dumps(record))
    results = load_results(tmp_path)
    assert [r["environment"]["device_name"] for r in results.records] == ["CPU (X)"]  # Y's run of the cell is folded
    [comparison] = report_engines.engine_comparisons(results)
    assert comparison.reference["environment"]["device_name"] == "CPU (Y)"
    assert math.isclose(comparison.tokens_ratio, 0.9)  # not 90 / 1000
    [alone] = report_engines.unpaired(results)
    assert "CPU (Z), AVX2" in alone and "cpu/lora-3.json" in alone


@pytest.mark.parametrize("engine, ratio, timed_steps, spread, words, shaded", [
    # 3 timed steps of a narrow spread: Trainer "1.27x faster" is no verdict
    ("trainer", 1.27, 3, 0.01, "3 timed steps, too few for a verdict", False),
    ("trainer", 1.20, 16, 0.15, "within noise: the step times' spread is 21%", False),
    ("trainer", 1.30, 16, 0.02, "our loop is the slower one", True),
    ("trl-sft", 0.50, 16, 0.02, "LM head twice", True),
    ("trainer", 1.05, 16, 0.0, "", False),  # within the tolerance: nothing to say
])
def test_a_throughput_verdict_needs_enough_steps_and_a_ratio_beyond_their_spread(tmp_path, engine, ratio,
                                                                                   timed_steps, spread, words,
                                                                                   shaded):
    folder = tmp_path / "cpu"
    folder.mkdir()
    for name, speed in (("harness", 100.0), (engine, 100.0 * ratio)):
        record = _record(name, 1000, speed, 5.0, 900, timed_steps=timed_steps, spread=spread)
        (folder / f"lora-{name}.json").write_text(json.dumps(record))
    [comparison] = report_engines.engine_comparisons(load_results(tmp_path))
    why = report_engines.why(comparison)
    assert (words in why) if words else why == ""
    assert comparison.throughput_beyond_noise == shaded
    assert (report_engines.engine_table([comparison]).rows[0][4].css == "off") == shaded


# -- real runs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer_records(tmp_path_factory) -> dict:
    """Every base technique in Trainer with the QUICK workload: {name: record}."""
    out = tmp_path_factory.mktemp("results")
    return {name: run_dict(resolve(EXPERIMENTS / f"{name}.yaml", {**QUICK, "engine": "trainer"}), out)[1]
            for name in BASE_TECHNIQUES}


# How far Trainer's final loss may be from ours after the same steps on the same sequences. Full
# fine-tuning computes the same step (equal to the last bit in fp32); LoRA's dropout draws other
# random masks in Trainer, which seeds the generator again when it starts.
LOSS_TOLERANCE = {"fp32": 1e-6, "bf16-pure": 2e-3, "bf16-mixed": 2e-3, "adamw8bit": 2e-3}


@pytest.mark.slow
def test_every_base_technique_runs_in_trainer_measured_like_ours(trainer_records, quick_records):
    fp16 = trainer_records["fp16-mixed"]  # accelerate has no fp16 on a CPU: said, not run as fp32
    assert fp16["status"] == "skipped" and "trains in fp32" in fp16["error"]["message"]
    for name, record in trainer_records.items():
        if name == "fp16-mixed":
            continue
        assert record["status"] == "ok", (name, record.get("error"))
        assert record["engine"]["name"] == "trainer" and record["engine"]["library"].startswith("transformers")
        memory = record["memory"]
        assert set(memory["phases"]) == {"load", "forward", "backward", "optimizer"}, name
        assert sum(memory["breakdown_at_peak"].values()) == memory["tracked_step_peak"]
        assert memory["persistent"]["optimizer_state"] > 0 and memory["persistent"]["gradients"] > 0
        assert record["throughput"]["timed_steps"] == QUICK["steps"]
        losses = record["loss"]["per_step"]
        ours = quick_records[name][1]
        assert len(losses) == len(ours["loss"]["per_step"]) == QUICK["warmup_steps"] + QUICK["steps"] + 1
        # the first step sees the same sequences with the same weights: the same loss
        assert math.isclose(losses[0], ours["loss"]["per_step"][0], rel_tol=1e-3), name
        tolerance = LOSS_TOLERANCE.get(name, 0.02)
        assert abs(record["loss"]["final"] - ours["loss"]["final"]) <= tolerance * ours["loss"]["final"], name
        # the same weights, gradients and optimizer state: the persistent bytes are the same
        assert memory["persistent"]["weights"] == ours["memory"]["persistent"]["weights"], name
        assert record["parameters"] == ours["parameters"], name


@pytest.mark.slow
def test_full_fine_tuning_in_trainer_is_our_step_to_the_last_bit(trainer_records, quick_records):
    assert trainer_records["fp32"]["loss"]["per_step"] == quick_records["fp32"][1]["loss"]["per_step"]


@pytest.mark.slow
def test_sft_trainer_packs_the_same_sequences_and_a_users_arguments_reach_the_trainer(tmp_path, quick_records):
    pytest.importorskip("trl")
    config = resolve(EXPERIMENTS / "lora.yaml", {**QUICK, "engine": "trl-sft",
                                                  "training_args": {"max_grad_norm": 1.0}})
    record = run_dict(config, tmp_path)[1]
    assert record["status"] == "ok", record.get("error")
    assert record["engine"]["name"] == "trl-sft" and record["engine"]["arguments"]["max_grad_norm"] == 1.0
    assert record["engine"]["arguments"]["packing"] is True
    ours = quick_records["lora"][1]["loss"]["per_step"]
    assert math.isclose(record["loss"]["per_step"][0], ours[0], rel_tol=1e-3)


@pytest.mark.slow
def test_a_cell_trainer_cannot_run_is_a_skipped_record_with_the_reason(tmp_path):
    config = resolve(EXPERIMENTS / "bf16-pure-gc-optim-in-bwd.yaml", {**QUICK, "engine": "trainer"})
    record = run_dict(config, tmp_path)[1]
    assert record["status"] == "skipped" and record["error"]["type"] == "NotMapped"
    assert "optimizer_in_backward" in record["error"]["message"]


def test_engine_flags_on_run_and_bench_replace_every_blocks_engine(tmp_path, capsys):
    from harness.cli import build_parser

    assert build_parser().parse_args(["run", "x.yaml", "--engine", "trl-sft"]).engine == "trl-sft"
    assert build_parser().parse_args(["bench", "--engine", "trainer"]).engine == "trainer"
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "x.yaml", "--engine", "keras"])
    assert exit_.value.code == 2
    planned, _ = expand(load_matrix(EXPERIMENTS / "matrix.yaml"), "cpu", EXPERIMENTS, tmp_path, engines=["trainer"])
    assert {r.config.experiment.engine for r in planned} == {"trainer"}


def test_training_args_of_a_missing_library_are_refused_saying_which(tmp_path, monkeypatch):
    import harness.engines.arguments as arguments

    def missing(engine):
        raise ModuleNotFoundError("No module named 'trl'", name="trl")
    monkeypatch.setattr(arguments, "arguments_class", missing)
    with pytest.raises(ConfigError, match="trl is not installed"):
        _experiment(tmp_path, "technique: lora\nengine: trl-sft\ntraining_args: {max_grad_norm: 1.0}\n")


@pytest.mark.slow
def test_held_out_loss_is_evaluated_alike_in_both_loops(tmp_path):
    """bf16 autocast, held-out loss before training, every 2 steps and at the end: the same numbers."""
    workload = {**QUICK, "data": {"source": "stdlib-tests"}, "eval_every": 2, "eval_sequences": 4}
    lab, trainer = (run_dict(resolve(EXPERIMENTS / "bf16-mixed.yaml", {**workload, "engine": engine}), tmp_path)[1]
                    for engine in ("harness", "trainer"))
    assert lab["status"] == trainer["status"] == "ok"
    assert [e["step"] for e in trainer["loss"]["eval"]] == [0, 2, QUICK["warmup_steps"] + QUICK["steps"] + 1]
    assert trainer["loss"]["eval"] == lab["loss"]["eval"] and trainer["loss"]["per_step"] == lab["loss"]["per_step"]


@pytest.mark.slow
@pytest.mark.parametrize("name, module, optimizer", [("galore", "galore_torch", "GaLoreAdamW"),
                                                     ("ao-adamw8bit", "torchao.optim", "AdamW8bit"),
                                                     ("sgd-momentum", "torch.optim", "SGD")])
def test_trainer_builds_the_optimizer_beyond_the_documents_with_the_labs_state(tmp_path, name, module, optimizer):
    import importlib

    expected = getattr(importlib.import_module(module), optimizer)
    # fp32 weights: the optimizer's class and state are the point, not bf16, which some CPUs only emulate
    lab, trainer = (run_dict(resolve(EXPERIMENTS / f"{name}.yaml", {**QUICK, "engine": engine, "weights": "fp32"}),
                             tmp_path)[1] for engine in ("harness", "trainer"))
    assert lab["status"] == trainer["status"] == "ok", (lab.get("error"), trainer.get("error"))
    assert trainer["engine"]["optimizer"] == f"{expected.__module__}.{expected.__qualname__}"
    # The same class over the same trainable tensors keeps the same state, to the byte: its size
    # depends on the tensors' shapes and the optimizer's settings only.
    ours, theirs = (r["memory"]["breakdown_at_peak"]["optimizer_state"] for r in (lab, trainer))
    assert ours > 0 and theirs == ours


@pytest.mark.slow
def test_selective_checkpointing_runs_in_sft_trainer_and_trainer_says_it_has_none(tmp_path):
    pytest.importorskip("trl")
    sft, trainer = (run_dict(resolve(EXPERIMENTS / "bf16-pure-gc-selective.yaml", {**QUICK, "engine": engine}),
                             tmp_path)[1] for engine in ("trl-sft", "trainer"))
    assert sft["status"] == "ok", sft.get("error")
    assert sft["engine"]["arguments"][checkpointing_fields()[1]] == {"use_reentrant": False, "selective": True}
    assert trainer["status"] == "skipped" and "no selective checkpointing" in trainer["error"]["message"]
