"""Which experiment files a plan runs: those it names, or every one where it says `all`."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from conftest import EXPERIMENTS

from harness.matrix import expand, load_matrix
from harness.predict.fit_table import fit_answer


def _planned(experiments: Path, plan: str) -> set[str]:
    matrix = load_matrix(experiments / "matrix.yaml")
    runs, _ = expand(matrix, "cpu" if plan == "cpu" else "cuda", experiments, experiments, plan=plan,
                     device_gb=math.inf)
    return {run.config.name for run in runs}


def test_a_new_experiment_file_joins_the_cpu_plan_only_where_a_plan_names_it(tmp_path):
    experiments = tmp_path / "experiments"
    shutil.copytree(EXPERIMENTS, experiments)
    cpu, cuda = _planned(experiments, "cpu"), _planned(experiments, "cuda")
    (experiments / "my-new-technique.yaml").write_text("include: bf16-pure.yaml\ndescription: a new file\n")
    assert _planned(experiments, "cpu") == cpu  # make bench on a CPU runs what it ran
    assert _planned(experiments, "cuda") == cuda | {"my-new-technique"}  # the cuda plan's blocks say `all`


def _boundary_matrix(tmp_path, block: str) -> tuple[Path, dict]:
    experiments = tmp_path / "experiments"
    shutil.copytree(EXPERIMENTS, experiments)
    text = (experiments / "matrix.yaml").read_text()
    (experiments / "matrix.yaml").write_text(text + f"probe:\n{block}")
    return experiments, load_matrix(experiments / "matrix.yaml")


def test_the_boundary_plan_probes_the_fit_answer_of_the_predictor_as_it_is():
    from harness.cards import card_bytes
    from harness.predict.search import setup

    runs, skipped = expand(load_matrix(EXPERIMENTS / "matrix.yaml"), "cuda", EXPERIMENTS, EXPERIMENTS,
                           plan="boundary", device_gb=math.inf, fit_answer=fit_answer)
    assert not skipped
    probes: dict[tuple, list[int]] = {}
    for run in runs:
        cfg = run.config.experiment
        probes.setdefault((run.config.name, cfg.model, cfg.budget_gb, run.allocator), []).append(cfg.seq_len)
    assert sum(allocator is None for *_, allocator in probes) >= 6  # the six configurations, each with
    # its answer and a probe above it; and one again with expandable segments, filed apart
    assert {allocator for *_, allocator in probes} == {None, "expandable_segments"}
    assert all(("__expandable_segments__" in run.path.name) == (run.allocator is not None) for run in runs)
    for (name, model, card_gb, allocator), (answer, above) in probes.items():
        found = setup(EXPERIMENTS / f"{name}.yaml", model, allocator=allocator or "default")
        # the answer is the longest sequence whose predicted device bytes fit the card as sold
        assert found.device(answer, 1) <= card_bytes(card_gb) < found.device(answer + 1, 1), (name, model)
        assert above == math.floor(answer * 1.03)


def test_fit_multiples_need_a_budget_and_no_sequence_lengths_of_their_own(tmp_path):
    from harness.config import ConfigError

    block = "  - experiments: [lora]\n    models: [mistral-7b]\n    fit_multiples: [1.0, 1.03]\n"
    experiments, matrix = _boundary_matrix(tmp_path, block)
    with pytest.raises(ConfigError, match=r"probe\[0\]\.fit_multiples.*needs budgets_gb"):
        expand(matrix, "cuda", experiments, experiments, plan="probe", fit_answer=fit_answer)
    experiments, matrix = _boundary_matrix(tmp_path / "both", block + "    budgets_gb: [24]\n    seq_lens: [512]\n")
    with pytest.raises(ConfigError, match="give seq_lens or fit_multiples, not both"):
        expand(matrix, "cuda", experiments, experiments, plan="probe", fit_answer=fit_answer)


def test_a_fit_answer_the_context_ends_has_no_boundary_to_probe(tmp_path):
    experiments, matrix = _boundary_matrix(
        tmp_path, "  - experiments: [lora]\n    models: [tinyllama-1.1b]\n    fit_multiples: [1.0, 1.03]\n"
                  "    budgets_gb: [80]\n")
    runs, skipped = expand(matrix, "cuda", experiments, experiments, plan="probe", fit_answer=fit_answer)
    assert runs == [] and "the model's context (2,048 tokens)" in skipped[0]
    # a sequence given on the command line stands over the block's multiples
    runs, _ = expand(matrix, "cuda", experiments, experiments, plan="probe", seq_lens=[256], fit_answer=fit_answer)
    assert [run.config.experiment.seq_len for run in runs] == [256]


def test_an_allocator_setting_is_a_cuda_blocks_and_its_fit_answer_is_the_one_with_that_setting(tmp_path):
    from harness.config import ConfigError
    from harness.lab.runner import cell_path

    block = ("  - experiments: [lora]\n    models: [mistral-7b]\n    fit_multiples: [1.0]\n    budgets_gb: [24]\n"
             "    allocator: expandable_segments\n")
    experiments, matrix = _boundary_matrix(tmp_path, block + block.replace("    allocator: expandable_segments\n", ""))
    asked = []

    def answer(*args, allocator="default", **kwargs):
        asked.append(allocator)
        return fit_answer(*args, allocator=allocator, **kwargs)

    runs, _ = expand(matrix, "cuda", experiments, experiments, plan="probe", fit_answer=answer)
    assert asked == ["expandable_segments", "default"]
    expandable, default = runs
    assert (expandable.allocator, default.allocator) == ("expandable_segments", None)
    assert expandable.config.experiment.seq_len > default.config.experiment.seq_len  # the answer the setting buys
    # the runner files the record where the plan looks for it
    assert cell_path(expandable.config, experiments, 0, "expandable_segments").name == expandable.path.name
    # one configuration under two settings: two runs, two records
    fixed = block.replace("fit_multiples: [1.0]", "seq_lens: [512]")
    default_block = fixed.replace("    allocator: expandable_segments\n", "")
    experiments, matrix = _boundary_matrix(tmp_path / "fixed", fixed + default_block)
    expandable, default = expand(matrix, "cuda", experiments, experiments, plan="probe")[0]
    assert expandable.config == default.config
    model_part, _, hash_part = default.path.name.rpartition("__")
    assert expandable.path == default.path.with_name(f"{model_part}__expandable_segments__{hash_part}")
    # a CPU has no caching allocator to set: the block is left out, and says why
    runs, skipped = expand(matrix, "cpu", experiments, experiments, plan="probe", fit_answer=answer)
    assert [run.allocator for run in runs] == [None] and "CUDA's caching allocator" in skipped[0]
    experiments, matrix = _boundary_matrix(tmp_path / "typo", block.replace("expandable_segments", "expandable"))
    with pytest.raises(ConfigError, match=r"probe\[0\]\.allocator.*unknown setting 'expandable'"):
        expand(matrix, "cuda", experiments, experiments, plan="probe", fit_answer=answer)
