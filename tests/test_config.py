"""Experiment files: every shipped file validates; malformed ones name file and field, exit 2."""

import json
import subprocess
import sys

import pytest
from conftest import EXPERIMENTS, ROOT

from harness.config import (
    ConfigError,
    ResolvedConfig,
    config_hash,
    experiment_files,
    load_experiment,
    prepare,
    resolve,
    resolved_config,
)
from harness.techniques import TECHNIQUES


def test_every_experiment_file_loads():
    files = experiment_files(EXPERIMENTS)
    names = {p.stem for p in files}
    # one file per registered technique, plus accumulation and checkpointing variants
    assert set(TECHNIQUES) <= names
    for path in files:
        name, experiment = load_experiment(path)
        assert name == path.stem and experiment.technique in TECHNIQUES
    assert any(load_experiment(p)[1].grad_accum > 1 for p in files)
    assert any(load_experiment(p)[1].gradient_checkpointing for p in files)


def test_include_merges_and_the_including_file_wins(tmp_path):
    (tmp_path / "_base.yaml").write_text("technique: lora\nseq_len: 128\nlora: {r: 8, alpha: 16}\n")
    (tmp_path / "child.yaml").write_text("include: _base.yaml\nlora: {r: 64}\noptimizer: adamw8bit\n")
    name, experiment = load_experiment(tmp_path / "child.yaml")
    assert (name, experiment.seq_len, experiment.lora.r, experiment.lora.alpha) == ("child", 128, 64, 16.0)
    config = resolved_config(name, experiment)
    assert config["optimizer"] == "adamw8bit" and config["adapter"] == "lora" and config["weights"] == "bf16"


def test_hash_changes_with_the_configuration_not_the_description(tmp_path):
    (tmp_path / "a.yaml").write_text("technique: qlora\ndescription: one\n")
    (tmp_path / "b.yaml").write_text("technique: qlora\ndescription: two\n")
    (tmp_path / "c.yaml").write_text("technique: qlora\nlora: {r: 8}\n")
    hashes = [config_hash(resolved_config(*load_experiment(tmp_path / f"{n}.yaml"))) for n in "abc"]
    assert hashes[0] == hashes[1] != hashes[2]


MALFORMED = {
    "unknown key": ("technique: lora\nlearning_rate: 0.1\n", "learning_rate", "unknown key"),
    "nested unknown key": ("technique: lora\nlora: {rank: 8}\n", "lora.rank", "unknown key"),
    "wrong type": ("technique: lora\nseq_len: long\n", "seq_len", "expected int"),
    "bool for int": ("technique: lora\nmicro_batch: true\n", "micro_batch", "boolean"),
    "unknown technique": ("technique: lora-9000\n", "technique", "unknown technique"),
    "unknown optimizer": ("technique: lora\noptimizer: lion\n", "optimizer", "unknown optimizer"),
    "unknown quantization": ("technique: lora\nquantization: int3\n", "quantization", "unknown quantization"),
    "bad choice": ("technique: lora\nweights: fp8\n", "weights", "not allowed"),
    "double quantization of int8": ("technique: int8-lora\ndouble_quant: true\n", "double_quant", "not int8's"),
    "out of range": ("technique: lora\nsteps: 0\n", "steps", "at least 1"),
    "yaml syntax": ("technique: lora\nseq_len: [256\n", "<yaml>", "YAML syntax error"),
    "missing include": ("include: _nowhere.yaml\ntechnique: lora\n", "include", "does not exist"),
    "missing technique": ("seq_len: 128\n", "technique", "required"),
    "full fine-tuning of a quantized base": ("technique: qlora\nadapter: none\n", "adapter", "cannot be fully"),
    "fp16 without loss scaling": ("technique: fp16-mixed\nloss_scaling: false\n", "loss_scaling", "loss scaling"),
    "accumulating with the step in backward": ("technique: bf16-pure\noptimizer_in_backward: true\ngrad_accum: 2\n",
                                                "optimizer_in_backward", "nothing to accumulate"),
    "loss scaling with the step in backward": ("technique: fp16-mixed\noptimizer_in_backward: true\n",
                                               "optimizer_in_backward", "loss scaling"),
    "LoRA+ without an adapter": ("technique: fp32\noptimizer: loraplus\n", "optimizer", "needs an adapter"),
    "evaluation without a held-out split": ("technique: lora\neval_every: 10\n", "data.source", "no held-out split"),
    "evaluation on training text": ("technique: lora\neval_every: 10\ndata: {source: stdlib-tests, eval_split: train}\n",
                                    "data.eval_split", "held-out split is 'eval'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_names_file_and_field(tmp_path, case):
    text, field, message = MALFORMED[case]
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_experiment(path)
    assert caught.value.field_name == field and message in caught.value.message
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("case", ["unknown key", "wrong type", "unknown technique", "yaml syntax", "missing include"])
def test_command_line_exits_2_before_running_anything(tmp_path, case):
    text, field, _ = MALFORMED[case]
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, "-m", "harness", "run", str(path), "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and f"'{field}'" in result.stderr
    assert not out.exists()  # nothing ran, nothing was written


@pytest.mark.parametrize("name", ["qlora", "galore", "fsdp2-lora", "sgd-momentum"])
def test_the_resolved_config_is_one_typed_object_whose_dict_form_the_record_keeps(name):
    resolved = resolve(EXPERIMENTS / f"{name}.yaml", {"model": "tiny-llama", "device": "cpu"})
    assert resolved.technique.optimizer == resolved.experiment.optimizer  # the technique's blocks spelled out
    config = resolved.as_dict()
    assert config == prepare(EXPERIMENTS / f"{name}.yaml", {"model": "tiny-llama", "device": "cpu"})
    assert config["config_hash"] == resolved.config_hash == config_hash({k: v for k, v in config.items()
                                                                          if k != "config_hash"})
    # an attempt's: its run id goes last into the dict form, which reads back as the same object
    attempt = resolved.run("f" * 32)
    assert attempt.as_dict() == {**config, "run_id": "f" * 32} and list(attempt.as_dict())[-1] == "run_id"
    assert ResolvedConfig.from_dict(attempt.as_dict()) == attempt
    # what crosses to the worker and lands in the record reads back as the same typed object
    assert ResolvedConfig.from_dict(json.loads(json.dumps(config))) == resolved
