"""Every descriptor of a building block is complete: each registry (optimizers, adapters, training blocks,
ways to shard) is walked, and an entry that leaves a fact out, or states one the rest of the lab cannot use,
fails here."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing

import pytest
from conftest import EXPERIMENTS, QUICK, ROOT, run_dict

from harness.blocks.adapters import ADAPTERS
from harness.blocks.optimizers import OPTIMIZERS
from harness.blocks.loss import loss_rules
from harness.blocks.parts import BuiltForTrainer, LossRule, Setting, Unmapped
from harness.blocks.precisions import PRECISIONS
from harness.blocks.quantizations import QUANTIZATIONS
from harness.blocks.training import BLOCKS, SHARDINGS, TRAINER_ENGINES
from harness.config import Experiment, OptimSettings, load_experiment, resolve, resolve_technique
from harness.predict.analytic import shape_of, trainable_tensors
from harness.predict.prediction import predict
from harness.presets import preset_config
from harness.schema import ADDED_LATER
from harness.techniques import TECHNIQUES


def _sentence(text) -> bool:
    return isinstance(text, str) and len(text.split()) >= 3


def _check_loss(loss, shown_by) -> None:
    """A loss rule against an experiment that exists, in the experiment file that shows the block; or why the
    block has none."""
    if isinstance(loss, LossRule):
        assert (EXPERIMENTS / f"{loss.reference}.yaml").exists() and loss.reference != shown_by
        assert 0 < loss.tolerance < 1 and _sentence(loss.why)
        assert shown_by, "a loss rule applies to the experiment that shows the block"
    else:
        assert _sentence(loss)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_descriptor_is_complete(name):
    optimizer = OPTIMIZERS[name]
    assert callable(optimizer.build) and callable(optimizer.state_bytes) and _sentence(optimizer.summary)
    # Trainer: a name (by device type where they differ), the lab's own handed to it, or why none
    trainer = optimizer.trainer
    if isinstance(trainer, (Unmapped, BuiltForTrainer)):
        assert _sentence(trainer.reason)
    elif isinstance(trainer, dict):
        assert set(trainer) == {"cuda", "cpu"} and all(isinstance(v, str) for v in trainer.values())
    else:
        assert isinstance(trainer, str) and trainer
    for reason in (optimizer.not_sharded, optimizer.not_simulated, optimizer.trainer_memory):
        assert reason is None or _sentence(reason)
    _check_loss(optimizer.loss, optimizer.shown_by)
    # the experiment file that runs it does run it
    if optimizer.shown_by:
        _, experiment = load_experiment(EXPERIMENTS / f"{optimizer.shown_by}.yaml")
        assert resolve_technique(experiment).optimizer == name
    # its package is a module this project installs (pyproject's extras) and imports by that name
    if optimizer.package:
        assert optimizer.package.replace("_", "-") in (ROOT / "pyproject.toml").read_text().replace("_", "-")
        assert importlib.util.find_spec(optimizer.package) is not None
    for setting in optimizer.settings:
        assert isinstance(setting, Setting) and isinstance(setting.default, setting.type)
        assert setting.within(setting.default) and _sentence(setting.meaning) and setting.bound
        assert getattr(OptimSettings(), setting.name) == setting.default
        assert ADDED_LATER[("optim", setting.name)] == setting.default  # earlier records keep their identity
    fields = {f.name for f in dataclasses.fields(Experiment)}
    for refusal in optimizer.refusals:
        assert refusal.field in fields and callable(refusal.applies) and _sentence(refusal.why)
    # its step kernel is one the optimizer benchmarks time (harness.predict.speed reads them)
    if optimizer.step_kernel:
        from harness.predict.speed import OPTIMIZER_BENCHMARKS

        assert optimizer.step_kernel in OPTIMIZER_BENCHMARKS
    if optimizer.first_steps:
        words, seconds = optimizer.first_steps
        assert isinstance(words, str) and words and callable(seconds)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_predicts_its_state_at_both_code_paths(name):
    optimizer = OPTIMIZERS[name]
    shape = shape_of(preset_config("tiny-llama"))
    sizes = trainable_tensors(shape, TECHNIQUES["bf16-pure"], Experiment(technique="bf16-pure").lora)
    for device_type in ("cuda", "cpu"):
        state, transient = optimizer.state_bytes(sizes, 2, shape, OptimSettings(), device_type)
        assert isinstance(state, int) and isinstance(transient, int) and state > 0 and transient >= 0


def test_trainer_knows_every_optim_name_the_descriptors_give():
    from transformers.training_args import OptimizerNames

    names = {optimizer.trainer for optimizer in OPTIMIZERS.values() if isinstance(optimizer.trainer, str)}
    names |= {n for optimizer in OPTIMIZERS.values() if isinstance(optimizer.trainer, dict)
              for n in optimizer.trainer.values()}
    assert names <= {member.value for member in OptimizerNames}


def test_an_optimizer_setting_is_one_field_of_the_optim_block_with_its_bound(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("include: " + str(EXPERIMENTS / "sgd-momentum.yaml") + "\noptim: {momentum: 1.5}\n")
    with pytest.raises(Exception, match=re.escape("optim.momentum") + ".*must be in \\[0, 1\\)"):
        load_experiment(path)


@pytest.mark.parametrize("name", [name for name, adapter in ADAPTERS.items() if adapter is not None])
def test_every_adapter_descriptor_is_complete(name):
    adapter = ADAPTERS[name]
    assert callable(adapter.wrap) and _sentence(adapter.summary)
    counts = adapter.trainable_tensors(64, 128, Experiment(technique="lora").lora)
    assert counts and all(isinstance(n, int) and n > 0 for n in counts)
    _check_loss(adapter.loss, adapter.shown_by)
    if adapter.shown_by:
        assert resolve_technique(load_experiment(EXPERIMENTS / f"{adapter.shown_by}.yaml")[1]).adapter == name
    # a variant's file runs this adapter with the variant's `lora:` fields
    for variant in adapter.variants:
        _check_loss(variant.loss, variant.shown_by)
        _, experiment = load_experiment(EXPERIMENTS / f"{variant.shown_by}.yaml")
        assert resolve_technique(experiment).adapter == name and variant.lora
        assert {key: getattr(experiment.lora, key) for key in variant.lora} == variant.lora


@pytest.mark.parametrize("name", list(PRECISIONS))
def test_every_precision_descriptor_is_complete(name):
    precision = PRECISIONS[name]
    assert _sentence(precision.summary)
    _check_loss(precision.loss, precision.shown_by)
    # the experiment file that shows it trains in it
    technique = resolve_technique(load_experiment(EXPERIMENTS / f"{precision.shown_by}.yaml")[1])
    assert (technique.weights, technique.autocast, technique.loss_scaling) == (
        precision.weights, precision.autocast, precision.loss_scaling)


@pytest.mark.parametrize("name", [name for name, quantization in QUANTIZATIONS.items() if quantization is not None])
def test_every_quantization_descriptor_is_complete(name):
    quantization = QUANTIZATIONS[name]
    assert _sentence(quantization.summary) and _sentence(quantization.not_sharded)
    _check_loss(quantization.loss, quantization.shown_by)
    _, experiment = load_experiment(EXPERIMENTS / f"{quantization.shown_by}.yaml")
    technique = resolve_technique(experiment)
    assert technique.quantization == name
    assert quantization.bits in (4, 8) and quantization.kernel_bytes >= 0
    assert quantization.build_seconds_per_billion > 0 and 0 < quantization.speed_share <= 1
    assert quantization.prediction_miss is None or _sentence(quantization.prediction_miss)
    # its storage: fewer bytes than the 16-bit weights, by its bits, and constants beside them
    linears = list(shape_of(preset_config("tiny-llama")).linears().values())
    weights = sum(n_in * n_out * count for n_in, n_out, count in linears)
    for double_quant in (False, True) if quantization.takes_double_quant else (False,):
        stored, constants = quantization.storage(linears, double_quant)
        assert stored == weights * quantization.bits // 8 and 0 < constants < stored
    # transformers' config for bitsandbytes asks for those bits, and puts the layer the descriptor quantizes into
    config = quantization.bnb_config(technique, None)
    assert (config.load_in_4bit, config.load_in_8bit) == (quantization.bits == 4, quantization.bits == 8)
    import bitsandbytes as bnb
    import torch

    from harness.step.models import build_base_model, quantized_layers, resolve_source

    model = build_base_model(resolve_source("tiny-llama"), technique, torch.device("cpu"), seed=0)
    layers = [m for m in model.modules() if isinstance(m, getattr(bnb.nn, quantization.layer))]
    assert len(layers) == sum(count for _, _, count in linears)
    assert quantized_layers()[getattr(bnb.nn, quantization.layer)] is quantization
    # quantized by the descriptor: no 16-bit weight is left in the layer
    assert all(layer.weight.dtype in (torch.int8, torch.uint8) for layer in layers)
    assert quantization.package in (ROOT / "pyproject.toml").read_text()
    # a dequantization kernel is costed by the benchmark of its own that the speed model reads
    if quantization.dequantize_kernel:
        from harness.predict.speed import DEQUANTIZE_BENCHMARKS

        assert quantization.dequantize_kernel in DEQUANTIZE_BENCHMARKS


def test_the_quantization_field_takes_every_registered_quantization_and_no_other(tmp_path):
    from harness.errors import ConfigError

    path = tmp_path / "mine.yaml"
    for name in QUANTIZATIONS:
        path.write_text(f"technique: lora\nquantization: {name}\n")
        assert resolve_technique(load_experiment(path)[1]).quantization == name
    path.write_text("technique: lora\nquantization: int4\n")
    with pytest.raises(ConfigError, match="unknown quantization 'int4'; registered: " + ", ".join(QUANTIZATIONS)):
        load_experiment(path)


def test_every_loss_rule_is_a_descriptors_and_each_experiment_has_one_at_most():
    rules = loss_rules()
    owners = [*PRECISIONS.values(), *QUANTIZATIONS.values(), *ADAPTERS.values(), *OPTIMIZERS.values()]
    owners += [variant for adapter in ADAPTERS.values() if adapter is not None for variant in adapter.variants]
    with_rule = [block for block in owners if block is not None and isinstance(block.loss, LossRule)]
    assert {block.shown_by: block.loss for block in with_rule} == rules and len(with_rule) == len(rules)
    # the report compares with references, so no rule may make the baseline a technique held to another
    assert "fp32" not in rules


def test_a_sharded_experiment_is_refused_with_its_optimizers_own_reason(tmp_path):
    from harness.errors import ConfigError

    path = tmp_path / "sharded.yaml"
    for optimizer, words in (("adamw8bit", "bitsandbytes"), ("galore_adamw", "SVD"), ("adafactor", "row and column")):
        path.write_text(f"include: {EXPERIMENTS / 'fsdp2.yaml'}\noptimizer: {optimizer}\n")
        with pytest.raises(ConfigError, match=f"optimizer.*not with sharding: .*{words}"):
            load_experiment(path)
    path.write_text(f"include: {EXPERIMENTS / 'fsdp2.yaml'}\noptimizer: sgd_momentum\n")
    assert resolve_technique(load_experiment(path)[1]).optimizer == "sgd_momentum"  # SGD steps shards as AdamW


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd-momentum", "adafactor"])
def test_the_optimizers_added_as_one_descriptor_and_one_file_run_as_their_formula_says(tmp_path, name):
    """torch's SGD with momentum and Adafactor: a real CPU run keeps the optimizer state the formula counts,
    to the byte (Adafactor, which fake tensors cannot step, is predicted by the formula alone)."""
    _, record = run_dict(resolve(EXPERIMENTS / f"{name}.yaml", QUICK), tmp_path)
    assert record["status"] == "ok", record.get("error")
    analytic = predict(EXPERIMENTS / f"{name}.yaml", "tiny-llama", QUICK["seq_len"], QUICK["micro_batch"], "analytic",
                       "cpu")
    assert analytic.persistent["optimizer_state"] == record["memory"]["persistent"]["optimizer_state"] > 0


@pytest.mark.parametrize("name", [*BLOCKS, *(f"sharding={way}" for way in SHARDINGS)])
def test_every_training_block_descriptor_is_complete(name):
    field, _, way = name.partition("=")
    block = SHARDINGS[way] if way else BLOCKS[field]
    assert _sentence(block.summary)
    assert set(block.engines) == set(TRAINER_ENGINES)
    for mapping in block.engines.values():
        assert _sentence(mapping.reason) if isinstance(mapping, Unmapped) else (isinstance(mapping, dict) and mapping)
    for reason in (block.cuda_only, block.not_simulated, block.not_sharded):
        assert reason is None or _sentence(reason)
    if block.package:  # one of this project's extras (Liger's is the GPU one)
        assert block.package.replace("_", "-") in (ROOT / "pyproject.toml").read_text().replace("_", "-")
    fields = {f.name: f.default for f in dataclasses.fields(Experiment)}
    for refusal in block.refusals:
        assert refusal.field in fields and callable(refusal.applies) and _sentence(refusal.why)
    default = fields[field]
    if way:  # a value the experiment's field takes
        assert way in typing.get_args(typing.get_type_hints(Experiment)["sharding"])
    else:  # a field that is off by default, as every record made before it ran
        assert default is False and ADDED_LATER[(None, field)] is False


@pytest.mark.parametrize("text, field, words", [
    ("include: bf16-pure-gc-optim-in-bwd.yaml\ngrad_accum: 2\n", "optimizer_in_backward", "nothing to accumulate"),
    ("include: fp16-mixed.yaml\noptimizer_in_backward: true\n", "optimizer_in_backward", "cannot wait"),
    ("include: bf16-pure.yaml\nselective_checkpointing: true\n", "selective_checkpointing", "gradient_checkpointing"),
    ("include: loraplus.yaml\nadapter: none\n", "optimizer", "LoRA\\+ sets the learning rates"),
    ("include: loraplus.yaml\noptimizer_in_backward: true\n", "optimizer_in_backward", "not LoRA\\+"),
    ("include: galore.yaml\ntechnique: lora\n", "optimizer", "full fine-tuning optimizer"),
    ("include: adafactor.yaml\ntechnique: lora\n", "optimizer", "full fine-tuning optimizer"),
])
def test_what_a_block_refuses_is_refused_naming_its_field(tmp_path, text, field, words):
    from harness.errors import ConfigError

    path = tmp_path / "refused.yaml"
    path.write_text(text.replace("include: ", f"include: {EXPERIMENTS}/"))
    with pytest.raises(ConfigError, match=f"field '{field}': .*{words}"):
        load_experiment(path)


def test_without_the_package_a_descriptor_names_a_run_is_skipped_saying_what_needs_it():
    from harness.measure.worker import OPTIONAL_PACKAGES

    assert OPTIONAL_PACKAGES["torchao"] == "optimizer ao_adamw8bit, optimizer ao_adamw4bit, optimizer ao_adamw_fp8"
    assert OPTIONAL_PACKAGES["deepspeed"] == "sharding zero2, sharding zero3"
    assert OPTIONAL_PACKAGES["bitsandbytes"] == ("optimizer adamw8bit, optimizer paged_adamw8bit, optimizer paged_adamw, "
                                                 "quantization int8, quantization nf4")
    assert OPTIONAL_PACKAGES["trl"].endswith("engine trl-sft")
    assert OPTIONAL_PACKAGES["datasets"] == "local text files and hub datasets as data"
    from harness.config import ENGINE_NAMES
    from harness.engines import ENGINES

    assert set(ENGINES) == set(ENGINE_NAMES)  # the experiment field takes every engine there is
    packages = {d.package for d in [*OPTIMIZERS.values(), *BLOCKS.values(), *SHARDINGS.values(), *ENGINES.values(),
                                    *filter(None, QUANTIZATIONS.values())]}
    assert packages - {None} <= set(OPTIONAL_PACKAGES)
