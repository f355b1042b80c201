"""The matrix of runs (experiments/matrix.yaml): named plans of blocks, expanded to cells.

Each block is a product of experiments x models x sequence lengths x accumulation steps x
memory budgets x world sizes, with fields set for all of its runs; `expand` turns a plan into resolved,
validated configurations and the record path each lands in. `harness bench` runs them;
`harness predict --claims` predicts them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import env, schema
from harness.config import (
    MATRIX_FILE,
    ConfigError,
    build_dataclass,
    experiment_files,
    read_yaml,
    resolve,
)


@dataclass
class MatrixBlock:
    models: list[str]
    experiments: list[str] | str = "all"
    exclude: list[str] = field(default_factory=list)  # experiments left out (of `all`, usually)
    seq_lens: list[int | None] = field(default_factory=lambda: [None])
    grad_accums: list[int | None] = field(default_factory=lambda: [None])
    budgets_gb: list[float | None] = field(default_factory=lambda: [None])
    # Training loops (harness.engines) each cell runs in: the same configuration in each, measured alike.
    engines: list[str | None] = field(default_factory=lambda: [None])
    # Ranks that train each cell together (the experiments' world_size): one GPU each on CUDA, gloo
    # processes on a CPU.
    world_sizes: list[int | None] = field(default_factory=lambda: [None])
    # Only on a card with at least this much memory (GB, 1e9 bytes).
    min_device_gb: float | None = None
    # On CUDA, only where this many GPUs are: a cell of world size N needs N of them.
    min_devices: int | None = None
    # Experiment fields set for every run of this block (validated like a file's own fields).
    set: dict = field(default_factory=dict)
    note: str = ""


# A matrix file maps plan names to ordered lists of blocks. `cpu` and `cuda` are the plans
# `make bench` runs on each device class; any other (e.g. `evidence`) runs with --plan NAME.
Matrix = dict[str, list[MatrixBlock]]
# The one key of a matrix file that is not a plan: where cluster jobs go (harness.lab.launcher).
LAUNCHER_BLOCK = "launcher"


@dataclass
class PlannedRun:
    config: dict  # the resolved configuration's dict form (harness.config.ResolvedConfig), as the worker gets it
    repeat: int
    path: Path
    note: str
    estimate: Any = None  # harness.lab.estimate.Estimate, filled for a time budget or a dry run


def load_matrix(path: str | Path) -> Matrix:
    path = Path(path).resolve()
    data = read_yaml(path)
    for device_type in ("cpu", "cuda"):
        if device_type not in data:
            raise ConfigError(path, device_type, "is required (the plan `make bench` runs on that device class)")
    matrix = {}
    for name, blocks in data.items():
        if name == LAUNCHER_BLOCK:
            continue
        if not isinstance(blocks, list):
            raise ConfigError(path, name, f"expected a list of blocks, got {type(blocks).__name__}")
        matrix[name] = [build_dataclass(MatrixBlock, block, path, prefix=f"{name}[{index}].")
                        for index, block in enumerate(blocks)]
    return matrix


def expand(matrix: Matrix, device_type: str, experiments_dir: Path, out_dir: Path, *, plan: str | None = None,
           models=None, experiments=None, budgets_gb=None, seq_lens=None, engines=None, repeat: int = 1,
           device_gb: float | None = None, devices: int | None = None) -> tuple[list[PlannedRun], list[str]]:
    """The runs of a plan (default: the device type's own), in order, with command-line replacements applied.

    devices: the GPUs a cell can have (None: as many as it asks for, as on a cluster).
    Returns the runs (duplicates removed) and the notes of blocks skipped on this device.
    """
    plan = plan or device_type
    if plan not in matrix:
        raise ConfigError(experiments_dir / MATRIX_FILE, plan, f"no such plan; plans: {', '.join(matrix)}")
    available = {p.stem: p for p in experiment_files(experiments_dir)}
    planned: dict[Path, PlannedRun] = {}
    skipped = []
    device_slug = env.device_slug(env.device_name(device_type))
    for block in matrix[plan]:
        if block.min_device_gb and (device_gb or 0) < block.min_device_gb:
            skipped.append(f"{block.note or block.experiments}: needs a card of >= {block.min_device_gb:g} GB")
            continue
        if device_type == "cuda" and block.min_devices and devices is not None and devices < block.min_devices:
            skipped.append(f"{block.note or block.experiments}: needs {block.min_devices} GPUs, this machine has "
                           f"{devices}")
            continue
        names = sorted(available) if block.experiments == "all" else block.experiments
        for name in list(names) + list(experiments or []) + block.exclude:
            if name not in available:
                raise ConfigError(experiments_dir / MATRIX_FILE, "experiments",
                                  f"no experiment file {name}.yaml in {experiments_dir}")
        names = [name for name in names if name not in block.exclude]
        if experiments:  # keep only the chosen experiments of each block
            names = [name for name in names if name in experiments]
        for name, model, seq, accum, budget, engine, ranks in itertools.product(
                names, models or block.models, seq_lens or block.seq_lens, block.grad_accums,
                budgets_gb or block.budgets_gb, engines or block.engines, block.world_sizes):
            overrides = {**block.set, "model": model, "device": device_type}
            for key, value in (("seq_len", seq), ("grad_accum", accum), ("budget_gb", budget), ("engine", engine),
                               ("world_size", ranks)):
                if value is not None:
                    overrides[key] = value
            resolved = resolve(available[name], overrides)
            world_size = resolved.experiment.world_size
            if device_type == "cuda" and devices is not None and world_size > devices:
                skipped.append(f"{name} @ {model} at world size {world_size}: this machine has {devices} GPUs")
                continue
            for index in range(repeat):
                path = schema.record_path(out_dir, device_slug, name, model, resolved.config_hash, index)
                planned.setdefault(path, PlannedRun(resolved.as_dict(), index, path, block.note))
    return list(planned.values()), skipped


