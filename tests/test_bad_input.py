"""The hostile-input suite: what a hostile or careless user can hand the lab, table by table.

Bad flags, experiment files, model sources, records in a shared results tree, a record a rerun must
not replace, faults of the machine: each case is a clear message naming the file and the field (or
flag), exit status 2 where a command would end, and nothing lost, run or sent. Checks are in-process
(validation, the runner's replacement rule, the report's reader): this suite stays fast.
"""

from pathlib import Path

import pytest
from conftest import EXPERIMENTS

from harness.cli import build_parser
from harness.config import ConfigError, ResolvedConfig, prepare, resolve

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
    (["run", "experiments/lora.yaml", "--nproc", "0"], "--nproc: must be at least 1"),
    (["run", "experiments/lora.yaml", "--timeout", "nan"], "--timeout: expected a finite number"),
    (["bench", "--devices", "0"], "--devices: must be positive"),
    (["bench", "--time-budget", "0s"], "--time-budget: invalid"),
    (["bench", "--timeout", "inf"], "--timeout: expected a finite number"),
    (["bench", "--repeat", "1e9"], "--repeat: expected an integer"),
    (["predict", "--seq", "1"], "--seq: must be at least 2"),
    (["predict", "--world-size", "0"], "--world-size: must be at least 1"),
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
    ("technique: lora\nlora: {target_modules: foo}\n", "lora.target_modules", "no linear layer named 'foo'"),
    # what YAML itself can do: a few lines standing for billions of values, nesting, self-reference
    ("technique: lora\nlora:\n  peft:\n    a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)), "<yaml>",
     "through its aliases"),
    ("technique: lora\nengine: trainer\ntraining_args:\n  x0: &x0 [y, y, y, y, y, y, y, y, y, y]\n"
     + "".join(f"  x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]\n" for i in range(1, 9)), "<yaml>",
     "through its aliases"),
    ("technique: lora\nlora: {peft: " + "[" * 20_000 + "]" * 20_000 + "}\n", "<yaml>", "nested more than 64"),
    ("technique: lora\ntraining_args: " + "{a: " * 100 + "1" + "}" * 100 + "\n", "<yaml>", "nested more than 64"),
    ("technique: lora\nlora: {peft: &p {a: *p}}\n", "<yaml>", "refers to a value that holds it"),
    ("technique: lora\ndescription: " + "x" * 1_000_001 + "\n", "<yaml>", "at most 1,000,000"),
    # bounds
    ("technique: lora\nsteps: 1000000000000\n", "steps", "at most 100,000"),
    ("technique: lora\nwarmup_steps: 1000000000\n", "warmup_steps", "at most 100,000"),
    ("technique: lora\neval_sequences: 1000000000\n", "eval_sequences", "at most 100,000"),
    ("technique: lora\nmicro_batch: 100000000\n", "micro_batch", "at most 65,536"),
    ("technique: lora\nworld_size: 1000000\nsharding: fsdp2\n", "world_size", "at most 65,536"),
    ("technique: lora\nseed: -1\n", "seed", "from 0 to 2**32 - 1"),
    ("technique: lora\nseed: 100000000000000000000000\n", "seed", "from 0 to 2**32 - 1"),
    ("technique: lora\nseed: 1e23\n", "seed", "expected int"),
    ("technique: lora\nseq_len: 1\n", "seq_len", "must be at least 2"),
    ("technique: lora\nlora: {dropout: 1}\n", "lora.dropout", "must be in [0, 1)"),
    ("technique: lora\noptim: {betas: [0.9]}\n", "optim.betas", "two numbers in [0, 1)"),
    ("technique: lora\noptim: {lr: .nan}\n", "optim.lr", "must be positive"),
    # types and names
    ("technique: lora\nweights: fp64\n", "weights", "is not allowed"),
    ("technique: lora\ngradient_checkpointing: 'yes'\n", "gradient_checkpointing", "expected true or false"),
    ("technique: lora\nsteps: true\n", "steps", "got a boolean"),
    ("technique: lora\nstepz: 3\n", "stepz", "unknown key"),
    ("technique: lorra\n", "technique", "unknown technique"),
    ("- technique: lora\n", "<top level>", "expected a mapping"),
    ("technique: lora\nsteps: [\n", "<yaml>", "YAML syntax error"),
    ("include: nowhere.yaml\ntechnique: lora\n", "include", "does not exist"),
    ("include: bad.yaml\ntechnique: lora\n", "include", "include cycle"),
    ("technique: lora\noptimizer: sgd\n", "optimizer", "unknown optimizer"),
    # combinations a run would fail on
    ("technique: lora\noptimizer_in_backward: true\ngrad_accum: 2\n", "optimizer_in_backward", "nothing to accumulate"),
    ("technique: lora\nworld_size: 2\n", "world_size", "several ranks need a sharding"),
    ("technique: lora\ncpu_offload: true\n", "cpu_offload", "needs a sharding"),
    ("technique: lora\nselective_checkpointing: true\n", "selective_checkpointing", "gradient_checkpointing: true"),
    ("technique: lora\noptimizer: galore_adamw\n", "optimizer", "full fine-tuning optimizer"),
    ("technique: fp32\noptimizer: loraplus\n", "optimizer", "needs an adapter"),
    ("technique: lora\neval_every: 2\n", "data.source", "no held-out split"),
    ("technique: lora\neval_every: 2\ndata: {source: stdlib-lib, eval_split: test}\n", "data.eval_split",
     "held-out split is 'eval'"),
    # what is handed to peft and to Trainer: checked against their own fields, types and checks
    ("technique: lora\nlora: {peft: {bias: 12345}}\n", "lora.peft.bias", "is not allowed"),
    ("technique: lora\nlora: {peft: {fan_in_fan_out: 'yes'}}\n", "lora.peft.fan_in_fan_out", "true or false"),
    ("technique: lora\nlora: {peft: {no_such_field: 1}}\n", "lora.peft.no_such_field", "not a field of peft"),
    ("technique: lora\nlora: {peft: {r: 8}}\n", "lora.peft.r", "in the lora block itself"),
    ("technique: lora\nengine: trainer\ntraining_args: {max_grad_norm: abc}\n", "training_args.max_grad_norm",
     "expected float"),
    ("technique: lora\nengine: trainer\ntraining_args: {lr_scheduler_type: sideways}\n",
     "training_args.lr_scheduler_type", "TrainingArguments refuses it"),
    ("technique: lora\nengine: trainer\ntraining_args: {warmup_steps: -1}\n", "training_args.warmup_steps",
     "TrainingArguments refuses it"),
    ("technique: lora\nengine: trainer\ntraining_args: {no_such_field: 1}\n", "training_args.no_such_field",
     "not a field of trainer's arguments"),
    ("technique: lora\nengine: trainer\ntraining_args: {learning_rate: 0.1}\n", "training_args.learning_rate",
     "the experiment sets it: optim.lr"),
    ("technique: lora\ntraining_args: {max_grad_norm: 1.0}\n", "training_args", "takes no TrainingArguments"),
    # nothing a run does sends data
    ("technique: lora\nengine: trainer\ntraining_args: {push_to_hub: true, hub_model_id: x/y}\n",
     "training_args.push_to_hub", "sends data"),
    ("technique: lora\nengine: trainer\ntraining_args: {hub_model_id: x/y}\n", "training_args.hub_model_id",
     "sends data"),
    ("technique: lora\nengine: trl-sft\ntraining_args: {report_to: wandb}\n", "training_args.report_to", "sends data"),
    ("technique: lora\nengine: trainer\ntraining_args: {trackio_space_id: x/y}\n", "training_args.trackio_space_id",
     "sends data"),
    # model sources, read as data: exists, parses, names its type (MODEL_FILES below)
    ("technique: lora\nmodel: /etc/passwd\n", "model", "neither a config.json nor a model folder"),
    ("technique: lora\nmodel: /nonexistent/config.json\n", "model", "no such file or folder"),
    ("technique: lora\nmodel: {tmp}/broken.json\n", "model", "not a readable JSON config"),
    ("technique: lora\nmodel: {tmp}/typeless.json\n", "model", "names no model_type"),
    ("technique: lora\nmodel: {tmp}/alien.json\n", "model", "knows no model_type 'no-such-type'"),
    ("technique: lora\nmodel: {tmp}/empty-folder\n", "model", "a folder without a config.json"),
    ("technique: lora\nmodel: {tmp}/coded\n", "trust_remote_code", "its own code (auto_map)"),
    ("technique: lora\nmodel: owner//name\n", "model", "not a hub id"),
]

# Files the model-source cases name ({tmp}); the folder with an auto_map is the remote-code test's too.
MODEL_FILES = {"broken.json": "{not json", "typeless.json": '{"hidden_size": 8}',
               "alien.json": '{"model_type": "no-such-type"}', "empty-folder/README": "no config here",
               "coded/config.json": '{"model_type": "evilnet", '
                                    '"auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}',
               "coded/model.safetensors": ""}


def _plant(tmp_path):
    for name, text in MODEL_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)


@pytest.mark.parametrize("text, field, message", BAD_FILES, ids=[f"{f}: {m}" for _, f, m in BAD_FILES])
def test_validate_refuses_what_a_run_would_fail_on(tmp_path, text, field, message):
    _plant(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("{tmp}", str(tmp_path)))
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


def test_a_hidden_experiment_file_is_refused_and_a_string_target_is_one_module(tmp_path):
    hidden = tmp_path / ".x.yaml"
    hidden.write_text("technique: lora\n")
    with pytest.raises(ConfigError, match="hidden file") as error:
        prepare(hidden)
    assert error.value.field_name == "<file>"
    one = tmp_path / "one.yaml"
    one.write_text("technique: lora\nlora: {target_modules: q_proj}\n")
    assert prepare(one)["lora"]["target_modules"] == ["q_proj"]


# -- the model's own code and the network, outside a run -------------------------------------

def test_a_model_folders_own_code_runs_only_in_a_real_run_that_asked_for_it(tmp_path, monkeypatch):
    """A planted folder whose configuration is code (auto_map) that leaves a mark when it runs: validate,
    a dry run's estimate and predict's source never run it; a run's resolve_source (run_code) does."""
    from harness.lab.bench import estimate_runs
    from harness.matrix import PlannedRun
    from harness.step.models import resolve_source

    _plant(tmp_path)
    mark = tmp_path / "code-ran"
    (tmp_path / "coded" / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(mark)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evilnet'\n")
    experiment = tmp_path / "coded.yaml"
    experiment.write_text(f"technique: lora\nmodel: {tmp_path / 'coded'}\ntrust_remote_code: true\n")
    config = resolve(experiment)  # validate: read as data
    planned = [PlannedRun(config, 0, tmp_path / "x.json", "")]
    estimate_runs(planned, "cpu")  # bench --dry-run
    assert planned[0].estimate is None
    with pytest.raises(ConfigError, match="never in validate, predict or a dry run"):
        resolve_source(str(tmp_path / "coded"), True, "cpu")  # predict's call
    assert not mark.exists()
    monkeypatch.syspath_prepend(str(tmp_path))  # transformers' module cache
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    source = resolve_source(str(tmp_path / "coded"), True, "cpu", run_code=True)  # the worker's call
    assert mark.exists() and source.runs_code  # the planted code was real: a run that asked for it ran it


def test_a_hub_id_outside_a_run_never_reaches_the_network(monkeypatch, tmp_path):
    import socket

    from harness.step.models import resolve_source

    def refuse(*args, **kwargs):
        raise AssertionError("the network was asked")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="cannot be reached outside a run"):
        resolve_source("someone/no-such-model", False, "cpu")


def test_every_trainer_and_trl_argument_that_uploads_or_reports_is_refused_by_name(tmp_path):
    import dataclasses
    import re

    from harness.engines.arguments import arguments_class, sends_data

    sending = re.compile(r"hub|push|report_to|trackio")
    for engine in ("trainer", "trl-sft"):
        names = [f.name for f in dataclasses.fields(arguments_class(engine)) if sending.search(f.name)]
        assert len(names) >= 8  # push_to_hub, hub_model_id, hub_token, ..., report_to, trackio's
        for name in names:
            assert sends_data(name)
            path = tmp_path / f"{engine}.yaml"
            path.write_text(f"technique: lora\nengine: {engine}\ntraining_args: {{{name}: x}}\n")
            with pytest.raises(ConfigError, match="sends data") as error:
                prepare(path)
            assert error.value.field_name == f"training_args.{name}"


# -- bounds and faults of the machine ----------------------------------------------------------

def test_more_ranks_than_this_machine_has_devices_is_refused_unless_forced():
    import os

    from harness.lab.runner import check_ranks

    cores = len(os.sched_getaffinity(0))
    config = resolve(EXPERIMENTS / "fsdp2.yaml", {"world_size": cores + 1, "device": "cpu"})
    with pytest.raises(ConfigError, match=f"{cores + 1} ranks, and this machine has {cores} CPU cores") as error:
        check_ranks(config, "matrix.yaml", "world_sizes")
    assert error.value.field_name == "world_sizes"
    check_ranks(config, "matrix.yaml", "world_sizes", force=True)
    check_ranks(resolve(EXPERIMENTS / "lora.yaml", {"device": "cpu"}), "x.yaml", "world_size")


def test_a_run_without_a_timeout_gets_one_from_its_estimate():
    from harness.lab.bench import BUDGET_OVERRUN_FACTOR, DEFAULT_MIN_TIMEOUT_S, default_timeout
    from harness.lab.estimate import Estimate

    config = resolve(EXPERIMENTS / "lora.yaml", {"device": "cpu"})
    assert default_timeout(config) == DEFAULT_MIN_TIMEOUT_S["cpu"]  # the tiny preset: the CPU's minimum
    long = Estimate(10_000.0, 0, 0, 0)
    assert default_timeout(config, long) == BUDGET_OVERRUN_FACTOR * 10_000.0


@pytest.mark.parametrize("blocked", ["", "cpu", ".locks", "logs/cpu", "attempts/cpu"])
def test_an_output_folder_that_cannot_be_written_is_one_line_before_anything_runs(tmp_path, blocked):
    """A file where a folder of the results tree should be (as root, permissions would not stop a write)."""
    from harness.lab.runner import run_config

    out = tmp_path / "results"
    (out / blocked).parent.mkdir(parents=True, exist_ok=True)
    (out / blocked).write_text("a file where a folder should be")
    config = resolve(EXPERIMENTS / "lora.yaml", {"device": "cpu"})
    with pytest.raises(ConfigError, match="cannot be written.*nothing was measured") as error:
        run_config(config, out)
    assert error.value.field_name == "--out" and (out / blocked).read_text().startswith("a file")
    assert not list(out.rglob("*.json"))  # no record of a run that never started


def test_a_record_that_cannot_be_written_is_kept_elsewhere_and_says_where(tmp_path, capsys):
    from harness import schema

    record = schema.read(next((FIXTURE / "cpu").glob("*.json")), "run")
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    kept = schema.write_or_set_aside(blocked / "cpu" / "x.json", record, tmp_path / "aside")
    assert kept == tmp_path / "aside" / "x.json" and schema.read(kept, "run") == record
    assert f"the record is kept at {kept}" in capsys.readouterr().err


def test_a_measurement_whose_record_cannot_be_filed_is_kept_and_says_where(tmp_path, monkeypatch, capsys):
    """The results folder was writable when the run started and is not when its record is filed: the
    measurement goes to unsaved/ with one line saying where (a worker stands in, writing an ok record)."""
    from harness import schema
    from harness.lab import runner

    _, data = _ok_record()

    def worker(config, attempt_path, log, lock, rendezvous=None, allocator=None):
        schema.write(attempt_path, schema.from_dict({**data, "config": config.as_dict(),
                                                     "config_hash": config.config_hash}))
        return (lambda timeout: 0), (lambda: None)

    def refused(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runner, "_start_worker", worker)
    monkeypatch.setattr(runner, "_keep_the_better", refused)
    out = tmp_path / "results"
    landed, record = runner.run_config(resolve(EXPERIMENTS / "lora.yaml", {"device": "cpu"}), out)
    assert landed.parent == out / schema.UNSAVED_FOLDER and schema.read(landed, "run").status == "ok"
    assert not schema.find_records(out)  # unsaved/ is no folder of run records
    assert f"the record is kept at {landed}" in capsys.readouterr().err


def test_records_are_readable_like_any_file_the_user_writes(tmp_path):
    import os

    from harness import schema

    path = schema.write_atomic(tmp_path / "r.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_killed_benches_leave_no_multiprocessing_folder_behind(tmp_path):
    import tempfile

    from harness.lab.runner import MULTIPROCESSING_TEMP, _own_multiprocessing_temp

    dead = Path(tempfile.gettempdir()) / MULTIPROCESSING_TEMP / "999999999"  # above Linux's pid_max
    dead.mkdir(parents=True, exist_ok=True)
    (dead / "listener-socket").write_text("")
    _own_multiprocessing_temp()
    assert not dead.exists()


def test_a_bad_value_in_a_matrix_blocks_set_names_the_matrix_file(tmp_path):
    import yaml

    from harness.matrix import expand, load_matrix

    (tmp_path / "lora.yaml").write_text((EXPERIMENTS / "lora.yaml").read_text())
    matrix = tmp_path / "matrix.yaml"
    blocks = [{"models": ["tiny-llama"]}, {"models": ["tiny-llama"], "set": {"steps": 0}}]
    matrix.write_text(yaml.safe_dump({"cpu": blocks, "cuda": []}))
    with pytest.raises(ConfigError) as error:
        expand(load_matrix(matrix), "cpu", tmp_path, tmp_path / "results")
    assert error.value.path == str(matrix) and error.value.field_name == "cpu[1].set.steps"
    assert "must be at least 1" in error.value.message and "(set for lora)" in error.value.message


def test_two_benches_at_once_and_a_tiny_budget_say_what_happened(tmp_path, monkeypatch, capsys):
    import io

    from harness.lab.bench import run_matrix
    from harness.lab.estimate import Estimate
    from harness.lab.runner import CellBusy
    from harness.matrix import PlannedRun

    def busy(*args, **kwargs):
        raise CellBusy("x.json: another process is measuring this cell now")

    monkeypatch.setattr("harness.lab.bench.run_config", busy)
    config = resolve(EXPERIMENTS / "lora.yaml", {"device": "cpu"})
    planned = [PlannedRun(config, 0, tmp_path / f"{n}.json", "", Estimate(30, 0, 0, 0)) for n in "ab"]
    out = io.StringIO()
    assert run_matrix(planned, "f", stream=out) == []
    assert "2 of 2 runs not started: measured by another process now" in out.getvalue()
    assert "time budget" not in out.getvalue()
    out = io.StringIO()
    assert run_matrix(planned, "f", budget_s=1, stream=out) == []
    assert "2 of 2 runs not started: not within the time budget" in out.getvalue()


# -- records in a shared results tree: read past, listed, never a traceback --------------------

FIXTURE = Path(__file__).parent / "fixtures" / "report-results"


def _ok_record() -> tuple[str, dict]:
    import json

    path = sorted((FIXTURE / "cpu").glob("lora__*.json"))[0]
    return path.name, json.loads(path.read_text())


def _set(data: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    section = data
    for name in parents:
        section = section[name]
    section[last] = value
    return data


BAD_RECORDS = [
    ("memory.peak_allocated", "lots", "field 'memory.peak_allocated': expected int"),
    ("loss.final", float("nan"), "field 'loss.final': nan is not a measurement"),
    ("throughput.tokens_per_s", float("inf"), "field 'throughput.tokens_per_s': inf is not a measurement"),
    ("status", "great", "unknown status 'great'"),
    ("schema_version", 2, "this code reads up to version 1"),
    ("kind", "recipe", "unknown record kind 'recipe'"),
    ("memory", [1, 2], "field 'memory': expected an object"),
    ("loss.per_step", "falling", "field 'loss.per_step': expected a list"),
    ("parameters.trainable", True, "field 'parameters.trainable': expected int"),
]


@pytest.mark.parametrize("dotted, value, reason", BAD_RECORDS, ids=[d for d, _, _ in BAD_RECORDS])
def test_the_report_lists_and_skips_a_bad_record(tmp_path, dotted, value, reason):
    import json

    from harness.report.load import load_results

    name, data = _ok_record()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / name).write_text(json.dumps(_set(data, dotted, value)))
    results = load_results(tmp_path)
    assert results.records == [] and len(results.skipped) == 1
    assert results.skipped[0].startswith(f"cpu/{name}: ") and reason in results.skipped[0]


@pytest.mark.parametrize("text, reason", [("{not json", "not JSON"), ("[" * 100_000 + "]" * 100_000, "not JSON"),
                                          ("[]", "not a JSON object")], ids=["broken", "deep", "a list"])
def test_the_report_reads_past_a_file_that_is_no_record(tmp_path, text, reason):
    from harness.report.load import load_results

    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "x.json").write_text(text)
    results = load_results(tmp_path)
    assert results.records == [] and reason in results.skipped[0]


def test_the_report_renders_beside_a_bad_record_and_names_it(tmp_path):
    import json
    import shutil

    from harness.report.render import render

    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    name, data = _ok_record()
    bad = f"bad-{name}"
    (results / "cpu" / bad).write_text(json.dumps(_set(data, "memory.peak_allocated", "lots")))
    rendered = render(results, tmp_path / "reports")
    assert f"cpu/{bad}" in rendered.markdown.read_text()


# -- a record is only replaced by a newer measurement that this code reads completely ----------

KEEP_CASES = [  # (what the cell's file is, the attempt's status, kept or replaced)
    ("newer schema", "failed", "kept"),
    ("newer schema", "ok", "kept"),
    ("not JSON", "ok", "kept"),
    ("hand-edited peak", "ok", "kept"),
    ("hash not its file's", "ok", "kept"),
    ("unknown status", "ok", "kept"),
    ("ok", "failed", "kept"),
    ("ok", "skipped", "kept"),
    ("ok", "ok", "replaced"),
    ("failed", "failed", "replaced"),
    ("absent", "failed", "replaced"),
]


def _existing(kind: str, data: dict) -> str | None:
    import json

    edits = {"newer schema": ("schema_version", 2), "hand-edited peak": ("memory.peak_allocated", "lots"),
             "hash not its file's": ("config_hash", "0" * 64), "unknown status": ("status", "great"),
             "failed": ("status", "failed")}
    if kind == "absent":
        return None
    if kind == "not JSON":
        return "{half a rec"
    return json.dumps(_set(data, *edits[kind]) if kind in edits else data)


@pytest.mark.parametrize("existing, status, outcome", KEEP_CASES, ids=[f"{e}, attempt {s}" for e, s, _ in KEEP_CASES])
def test_a_record_is_replaced_only_by_a_newer_measurement_this_code_reads(tmp_path, existing, status, outcome):
    import copy

    from harness import schema
    from harness.lab.runner import _keep_the_better

    name, data = _ok_record()
    cell = tmp_path / "cpu" / name
    cell.parent.mkdir()
    text = _existing(existing, copy.deepcopy(data))
    if text is not None:
        cell.write_text(text)
    attempt = schema.from_dict(_set(_set(copy.deepcopy(data), "status", status), "config.run_id", "a" * 32))
    attempt_path = cell.with_name(f".{cell.stem}.aaaaaaaaaaaa{schema.ATTEMPT_SUFFIX}")
    schema.write(attempt_path, attempt)
    landed = _keep_the_better(cell, attempt_path, attempt)
    assert not attempt_path.exists()
    if outcome == "kept":
        assert cell.read_text() == text and landed == schema.attempt_path(cell, "a" * 32)
        assert schema.read(landed, "run").extra["kept_because"]  # one line saying why
    else:
        assert landed == cell and schema.read(cell, "run").status == status


def test_bench_does_not_rerun_a_record_it_cannot_read(tmp_path, monkeypatch):
    import io

    from harness.lab.bench import run_matrix
    from harness.matrix import PlannedRun

    monkeypatch.setattr("harness.lab.bench.run_config", lambda *a, **k: pytest.fail("a kept record was rerun"))
    name, data = _ok_record()
    path = tmp_path / "cpu" / name
    path.parent.mkdir()
    path.write_text('{"kind": "run", "schema_version": 2}')
    out = io.StringIO()
    assert run_matrix([PlannedRun(ResolvedConfig.from_dict(data["config"]), 0, path, "")], "f", stream=out) == []
    assert "not started: the cell's file is no record this code can read" in out.getvalue()
    assert "1 of 1 runs not started: its record is kept as it is" in out.getvalue()


@pytest.mark.slow
def test_a_run_that_asked_for_a_models_own_code_runs_it_and_its_record_says_so(tmp_path):
    """A real model folder (tiny Llama weights, a tokenizer) whose configuration and model classes are its
    own code: validate reads it as data, a run with trust_remote_code: true runs the code and records it."""
    import json

    from conftest import QUICK, run_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.step.data import corpus_id, corpus_texts, trained_tokenizer

    folder, mark = tmp_path / "model", tmp_path / "code-ran"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=128)).save_pretrained(folder)
    texts = corpus_texts("stdlib", 200_000)
    trained_tokenizer(texts, 512, corpus_id("stdlib", texts)).save_pretrained(folder)
    (folder / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(mark)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evilnet'\n")
    (folder / "modeling_evil.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_evil import EvilConfig\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    settings = json.loads((folder / "config.json").read_text())
    settings.update(model_type="evilnet", architectures=["EvilForCausalLM"], auto_map=auto_map)
    (folder / "config.json").write_text(json.dumps(settings))
    experiment = tmp_path / "evil.yaml"
    experiment.write_text(f"technique: lora\nmodel: {folder}\ntrust_remote_code: true\n")
    config = resolve(experiment, {**QUICK, "seq_len": 64})
    assert not mark.exists()  # validate read it as data
    _, record = run_dict(config, tmp_path / "results")
    assert record["status"] == "ok" and mark.exists()
    assert record["remote_code"] == {"source": str(folder), "auto_map": auto_map}
