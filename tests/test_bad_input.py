"""Bad command-line values and model names: a clear message naming the flag or field, exit status 2."""

import pytest

from harness.cli import build_parser
from harness.config import ConfigError
from harness.runner import prepare

from conftest import EXPERIMENTS

BAD_FLAGS = [
    (["bench", "--budget-gb", "0"], "--budget-gb: must be a positive number of GB"),
    (["bench", "--budget-gb", "inf"], "--budget-gb: expected a finite number"),
    (["bench", "--seq-len", "0"], "--seq-len: must be at least 2"),
    (["bench", "--repeat", "0"], "--repeat: must be positive"),
    (["bench", "--timeout", "-1"], "--timeout: must be positive"),
    (["bench", "--time-budget", "5x"], "--time-budget: invalid"),
    (["bench", "--device-gb", "-80"], "--device-gb: must be positive"),
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
