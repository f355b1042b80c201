"""Which experiment files a plan runs: those it names, or every one where it says `all`."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from conftest import EXPERIMENTS

from harness.matrix import expand, load_matrix


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
