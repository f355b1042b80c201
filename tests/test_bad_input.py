"""Bad command-line values and model names: a clear message naming the flag or field, exit status 2."""

import pytest
from conftest import EXPERIMENTS

from harness.cli import build_parser
from harness.config import ConfigError, prepare

BAD_FLAGS = [
    (["bench", "--budget-gb", "0"], "--budget-gb: must be a positive number of GB"),
    (["bench", "--budget-gb", "inf"], "--budget-gb: expected a finite number"),
    (["bench", "--seq-len", "0"], "--seq-len: must be at least 2"),
    (["bench", "--repeat", "0"], "--repeat: must be positive"),
    (["bench", "--timeout", "-1"], "--timeout: must be positive"),
    (["bench", "--time-budget", "5x"], "--time-budget: invalid"),
    (["bench", "--device-gb", "-80"], "--device-gb: must be positive"),
    (["bench", "--nodes", "0"], "--nodes: must be positive"),
    (["bench", "--gpus-per-node", "two"], "--gpus-per-node: expected an integer"),
    (["bench", "--time-limit", "soon"], "--time-limit: invalid duration value"),
    (["bench", "--launcher", "kubernetes"], "--launcher: invalid choice"),
    (["run", "experiments/lora.yaml", "--timeout", "-1"], "--timeout: must be positive"),
    (["run", "experiments/lora.yaml", "--budget-gb", "-3"], "--budget-gb: must be a positive number of GB"),
    (["predict", "--budget-gb", "-3"], "--budget-gb: must be a positive number of GB"),
    (["predict", "--seq", "abc"], "--seq: expected an integer"),
    (["predict", "--batch", "0"], "--batch: must be at least 1"),
    (["report", "--results", "/nonexistent"], "--results: no such folder"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_command_line_values_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("typo, suggestion", [("tiny_llama", "'tiny-llama'"), ("llama2-7b", "'llama-2-7b'"),
                                              ("Mistral-7b", "'mistral-7b'")])
def test_a_model_name_close_to_a_preset_is_a_typo_said_at_once(typo, suggestion):
    with pytest.raises(ConfigError, match=f"field 'model'.*did you mean {suggestion}"):
        prepare(EXPERIMENTS / "lora.yaml", {"model": typo})


def test_names_that_may_be_hub_ids_or_paths_are_left_to_resolve():
    for model in ("tiny-llama", "meta-llama/Llama-2-7b-hf", "gpt2"):
        assert prepare(EXPERIMENTS / "lora.yaml", {"model": model})["model"] == model


BAD_FILES = [
    ("technique: lora\nlora: {target_modules: [foo]}\n", "lora.target_modules", "no linear layer named 'foo'"),
    ("technique: lora\nlora: {target_modules: []}\n", "lora.target_modules", "names no module"),
    ("technique: lora\ndata: {source: /nope}\n", "data.source", "no such file or folder"),
    ("technique: lora\noptim: {eps: -1}\n", "optim.eps", "must be positive"),
    ("technique: lora\noptim: {weight_decay: -0.1}\n", "optim.weight_decay", "must be >= 0"),
    ("technique: lora\nlora: {alpha: -5}\n", "lora.alpha", "must be positive"),
    ("technique: lora\ndouble_quant: true\n", "double_quant", "NF4's"),
    ("technique: fp16-mixed\nweights: fp16\n", "loss_scaling", "fp32 master weights"),
    ("technique: lora\nsteps: 3\nsteps: 4\n", "<yaml>", "key 'steps' is given twice"),
    ("technique: lora\nbudget_gb: .inf\n", "budget_gb", "positive number of GB"),
    ("technique: lora\nmodel: tiny_llama\n", "model", "did you mean 'tiny-llama'"),
    ("technique: qlora\nlora: {target_modules: [gate]}\n", "lora.target_modules", "no linear layer named 'gate'"),
    ("technique: lora\nseq_len: 4096\n", "seq_len", "longer than tiny-llama's context of 2048 tokens"),
    ("technique: lora\nmodel: phi-3-mini\nlora: {target_modules: [q_proj]}\n", "lora.target_modules",
     "phi-3-mini (phi3) has no linear layer named 'q_proj'"),
]


@pytest.mark.parametrize("text, field, message", BAD_FILES, ids=[f for _, f, _ in BAD_FILES])
def test_validate_refuses_what_a_run_would_fail_on(tmp_path, text, field, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        prepare(path)
    assert error.value.field_name == field and message in error.value.message and str(path) in str(error.value)


def test_files_that_are_no_experiment_text(tmp_path):
    folder_include = tmp_path / "folder.yaml"
    folder_include.write_text(f"include: {tmp_path}\ntechnique: lora\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"technique: lora\n\xff\xfe\n")
    for path, field, message in ((folder_include, "include", "is a folder"), (binary, "<file>", "is not UTF-8"),
                                 (tmp_path, "<file>", "is a folder")):
        with pytest.raises(ConfigError) as error:
            prepare(path)
        assert error.value.field_name == field and message in error.value.message


def test_what_yaml_reads_as_text_but_a_user_means_as_a_number_is_taken(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("technique: lora\noptim: {lr: 1e-4}\nlora: {target_modules: [q_proj, v_proj]}\n")
    assert prepare(path)["optim"]["lr"] == 1e-4
    path.write_text("technique: lora\noptim: {lr: fast}\n")
    with pytest.raises(ConfigError, match="optim.lr"):
        prepare(path)


def test_validate_reports_every_bad_file_and_a_missing_folder(tmp_path, capsys):
    from harness.cli import cmd_validate

    for index, (text, _, _) in enumerate(BAD_FILES[:3]):
        (tmp_path / f"bad{index}.yaml").write_text(text)
    (tmp_path / "good.yaml").write_text("technique: lora\n")
    parser = build_parser()
    assert cmd_validate(parser.parse_args(["validate", "--folder", str(tmp_path)])) == 2
    err = capsys.readouterr().err
    assert all(f"bad{i}.yaml" in err for i in range(3)) and "3 of 4 experiment files are not valid" in err
    with pytest.raises(ConfigError, match="--folder.*no such folder"):
        cmd_validate(parser.parse_args(["validate", "--folder", str(tmp_path / "nonexistent")]))


def test_a_hub_id_without_a_network_is_one_sentence_at_once(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # as on a machine with no network
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "harness", "predict", "--model", "someone/no-such-model",
                           "--experiment", "lora"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and time.monotonic() - started < 60
    assert done.stderr.strip().startswith("error: someone/no-such-model: field 'model': no preset, file or folder")
    assert "cannot be reached" in done.stderr and "Traceback" not in done.stderr


def test_a_config_with_an_impossible_shape_is_refused(tmp_path):
    import json

    from harness.step.models import resolve_source

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": -3, "hidden_size": 256,
                                "intermediate_size": 704, "num_attention_heads": 8, "vocab_size": 4096}))
    with pytest.raises(ConfigError, match="num_hidden_layers.*must be a positive integer"):
        resolve_source(str(path))
