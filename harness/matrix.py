"""The matrix of runs (experiments/matrix.yaml): named plans of blocks, expanded to cells.

Each block is a product of experiments x models x sequence lengths x accumulation steps x
memory budgets x world sizes, with fields set for all of its runs; `expand` turns a plan into resolved,
validated configurations and the record path each lands in. `harness bench` runs them;
`harness predict --claims` predicts them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness import env, schema
from harness.config import (
    MATRIX_FILE,
    ConfigError,
    ResolvedConfig,
    build_dataclass,
    experiment_files,
    read_yaml,
    resolve,
)


@dataclass
class WhereEmulated:
    """What a block does with a cell whose compute dtype this CPU only emulates (harness.env.emulated_dtypes):
    such a step measures the emulation (bf16 about 15 to 180 times slower than fp32 on an AVX2 CPU), so it
    runs shorter (`set`: fields replacing the block's) or not at all here (`skip`), and its record says why."""
    why: str
    set: dict = field(default_factory=dict)
    skip: bool = False
    # Every cell of the block, fp32 included, once one of them computes in an emulated dtype: for a block
    # that is a comparison (its fp32 reference is no use without the others).
    whole_block: bool = False


@dataclass
class MatrixBlock:
    models: list[str]
    experiments: list[str] | str = "all"
    exclude: list[str] = field(default_factory=list)  # experiments left out (of `all`, usually)
    seq_lens: list[int | None] = field(default_factory=lambda: [None])
    grad_accums: list[int | None] = field(default_factory=lambda: [None])
    budgets_gb: list[float | None] = field(default_factory=lambda: [None])
    # Instead of `seq_lens`: sequence lengths as multiples of the fit answer, the fit table's longest sequence on
    # the budget's card at the cell's micro-batch (harness.predict.fit_table.fit_answer: confirmed by simulation
    # where a current confirmation exists, else the analytic search), worked out when the plan is expanded, so the
    # probes follow the current predictor.
    fit_multiples: list[float] = field(default_factory=list)
    # Training loops (harness.engines) each cell runs in: the same configuration in each, measured alike.
    engines: list[str | None] = field(default_factory=lambda: [None])
    # Ranks that train each cell together (the experiments' world_size): one GPU each on CUDA, gloo
    # processes on a CPU.
    world_sizes: list[int | None] = field(default_factory=lambda: [None])
    # Only on a card with at least this much memory (GB as sold, harness.measure.budget).
    min_device_gb: float | None = None
    # On CUDA, only where this many GPUs are: a cell of world size N needs N of them.
    min_devices: int | None = None
    # Experiment fields set for every run of this block (validated like a file's own fields).
    set: dict = field(default_factory=dict)
    note: str = ""
    # On a CPU that only emulates a cell's compute dtype: run it shorter, or leave it to another machine.
    if_emulated: WhereEmulated | None = None
    # The CUDA caching allocator's setting its runs train under (a name of ALLOCATOR_SETTINGS; None: torch's
    # default), set in each worker's PYTORCH_CUDA_ALLOC_CONF; a `fit_multiples` block then multiplies the fit
    # answer under that setting. A CPU has no such allocator: there the block is skipped.
    allocator: str | None = None


# What each allocator setting a block can name puts in a CUDA worker's PYTORCH_CUDA_ALLOC_CONF (the settings
# harness.predict.allocator replays; torch.cuda.memory's documentation names the option).
ALLOCATOR_SETTINGS = {"expandable_segments": "expandable_segments:True"}


# A matrix file maps plan names to ordered lists of blocks. `cpu` and `cuda` are the plans
# `make bench` runs on each device class; any other (e.g. `evidence`) runs with --plan NAME.
Matrix = dict[str, list[MatrixBlock]]
# The one key of a matrix file that is not a plan: where cluster jobs go (harness.lab.launcher).
LAUNCHER_BLOCK = "launcher"


@dataclass
class PlannedRun:
    config: ResolvedConfig  # as the worker gets it (in its dict form, between processes)
    repeat: int
    path: Path
    note: str
    estimate: Any = None  # harness.lab.estimate.Estimate, filled for a time budget or a dry run
    # Why this cell runs shorter than its block says (`if_emulated.set`), or is not run here (`left_to`).
    shortened: str | None = None
    left_to: str | None = None
    allocator: str | None = None  # the block's allocator setting (ALLOCATOR_SETTINGS), None for torch's default


def allocator_fingerprint(environment: dict, allocator: str | None) -> str:
    """The fingerprint (harness.env) a cell's record has where it ran in this environment under its allocator
    setting: a worker's record names the PYTORCH_CUDA_ALLOC_CONF it ran under, which the launching process has
    not."""
    setting = {} if allocator is None else {"cuda_alloc_conf": ALLOCATOR_SETTINGS[allocator]}
    return env.fingerprint({**environment, **setting})


def allocator_record_path(path: Path, allocator: str | None) -> Path:
    """Where a cell's record goes under an allocator setting: beside the default setting's, the setting named
    before the configuration's hash (the two measure one configuration, which its hash alone would file as one;
    the hash stays last, where harness.lab.runner.why_kept reads it)."""
    if allocator is None:
        return path
    head, _, tail = path.stem.rpartition("__")
    return path.with_name(f"{head}__{allocator}__{tail}{path.suffix}")


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
           device_gb: float | None = None, devices: int | None = None,
           emulated: frozenset[str] = frozenset(),
           fit_answer: Callable | None = None) -> tuple[list[PlannedRun], list[str]]:
    """The runs of a plan (default: the device type's own), in order, with command-line replacements applied.

    devices: the GPUs a cell can have (None: as many as it asks for, as on a cluster).
    emulated: the dtypes this device only emulates (harness.env.emulated_dtypes): a block's `if_emulated`
    decides what becomes of its cells computing in one of them.
    fit_answer: the predictor's fit answer (harness.predict.fit_table.fit_answer), which a block's `fit_multiples`
    multiply; the predictor is a layer above this module, so its callers hand it in.
    Returns the runs (duplicates removed) and the notes of blocks skipped on this device.
    """
    plan = plan or device_type
    if plan not in matrix:
        raise ConfigError(experiments_dir / MATRIX_FILE, plan, f"no such plan; plans: {', '.join(matrix)}")
    available = {p.stem: p for p in experiment_files(experiments_dir)}
    planned: dict[Path, PlannedRun] = {}
    skipped = []
    device_slug = env.device_slug(env.device_name(device_type))
    for number, block in enumerate(matrix[plan]):
        if block.min_device_gb and (device_gb or 0) < block.min_device_gb:
            skipped.append(f"{block.note or block.experiments}: needs a card of >= {block.min_device_gb:g} GB")
            continue
        if device_type == "cuda" and block.min_devices and devices is not None and devices < block.min_devices:
            skipped.append(f"{block.note or block.experiments}: needs {block.min_devices} GPUs, this machine has "
                           f"{devices}")
            continue
        if block.allocator is not None and block.allocator not in ALLOCATOR_SETTINGS:
            raise ConfigError(experiments_dir / MATRIX_FILE, f"{plan}[{number}].allocator",
                              f"unknown setting {block.allocator!r}; settings: {', '.join(ALLOCATOR_SETTINGS)}")
        if block.allocator is not None and device_type != "cuda":
            skipped.append(f"{block.note or block.experiments}: sets CUDA's caching allocator ({block.allocator}), "
                           f"which a {device_type} run has none of")
            continue
        names = sorted(available) if block.experiments == "all" else block.experiments
        for name in list(names) + list(experiments or []) + block.exclude:
            if name not in available:
                raise ConfigError(experiments_dir / MATRIX_FILE, "experiments",
                                  f"no experiment file {name}.yaml in {experiments_dir}")
        names = [name for name in names if name not in block.exclude]
        if experiments:  # keep only the chosen experiments of each block
            names = [name for name in names if name in experiments]
        cells = []
        for name, model, given_seq, accum, budget, engine, ranks in itertools.product(
                names, models or block.models, seq_lens or [None], block.grad_accums,
                budgets_gb or block.budgets_gb, engines or block.engines, block.world_sizes):
            overrides = {**block.set, "model": model, "device": device_type}
            for key, value in (("grad_accum", accum), ("budget_gb", budget), ("engine", engine),
                               ("world_size", ranks)):
                if value is not None:
                    overrides[key] = value
            where = f"{plan}[{number}]"
            if given_seq is not None or not block.fit_multiples:
                sequences = [given_seq] if given_seq is not None else block.seq_lens
            else:
                sequences, why_not = _around_fit(available[name], overrides, block, device_type,
                                                 experiments_dir / MATRIX_FILE, where, fit_answer)
                if why_not:
                    skipped.append(f"{block.note or name} ({name} @ {model}): {why_not}")
            for seq in sequences:
                cell = {**overrides, "seq_len": seq} if seq is not None else overrides
                resolved = _resolve_cell(available[name], cell, block, experiments_dir / MATRIX_FILE, where)
                world_size = resolved.experiment.world_size
                if device_type == "cuda" and devices is not None and world_size > devices:
                    skipped.append(f"{name} @ {model} at world size {world_size}: this machine has {devices} GPUs")
                    continue
                cells.append((name, model, cell, resolved))
        rule = block.if_emulated
        # a rule for the whole block (a comparison, like with like) holds for every cell once one is emulated
        whole_block = rule is not None and rule.whole_block and any(c.technique.compute_dtype in emulated
                                                                    for *_, c in cells)
        for name, model, overrides, config in cells:
            shortened = left_to = None
            if rule is not None and (whole_block or config.technique.compute_dtype in emulated):
                if rule.skip:
                    left_to = rule.why
                else:  # the rule's fields replace the block's; the command line's still stand over both
                    shortened = rule.why
                    chosen = {key: overrides[key] for key, given in (("seq_len", seq_lens), ("budget_gb", budgets_gb),
                                                                     ("engine", engines)) if given}
                    config = resolve(available[name], {**overrides, **rule.set, **chosen})
            for index in range(repeat):
                path = allocator_record_path(
                    schema.record_path(out_dir, device_slug, name, model, config.config_hash, index), block.allocator)
                planned.setdefault(path, PlannedRun(config, index, path, block.note, shortened=shortened,
                                                    left_to=left_to, allocator=block.allocator))
    return list(planned.values()), skipped


def _around_fit(path: Path, overrides: dict, block: MatrixBlock, device_type: str, matrix_path: Path,
                where: str, fit_answer: Callable | None) -> tuple[list[int], str | None]:
    """A cell's sequence lengths as its block's `fit_multiples` of the fit answer on its budget's card, or none
    and why (nothing fits; the model's context, not the card, ends the answer)."""
    if block.seq_lens != [None]:
        raise ConfigError(matrix_path, f"{where}.fit_multiples", "give seq_lens or fit_multiples, not both")
    if any(not isinstance(m, (int, float)) or m <= 0 for m in block.fit_multiples):
        raise ConfigError(matrix_path, f"{where}.fit_multiples",
                          f"expected positive numbers (multiples of the fit answer), got {block.fit_multiples}")
    card_gb = overrides.get("budget_gb")
    if card_gb is None:
        raise ConfigError(matrix_path, f"{where}.fit_multiples", "needs budgets_gb: the card whose answer it multiplies")
    if fit_answer is None:
        raise ValueError(f"{matrix_path}: {where} multiplies the fit answer (fit_multiples): expand it with "
                         "fit_answer=harness.predict.fit_table.fit_answer")
    micro_batch = _resolve_cell(path, overrides, block, matrix_path, where).experiment.micro_batch
    fields = {key: value for key, value in overrides.items() if key not in ("model", "device", "budget_gb")}
    answer = fit_answer(path, overrides["model"], fields, device_type, card_gb, micro_batch,
                        allocator=block.allocator or "default")
    if answer.value == 0:
        return [], f"nothing fits a {card_gb:g} GB card at micro-batch {micro_batch} by the fit answer"
    if answer.limited_by != "card":
        return [], f"the fit answer is the model's context ({answer.value:,} tokens), not the card's limit"
    # floored: a probe a fraction above the answer that runs out bounds the answer's shortfall by that fraction
    return sorted({max(1, math.floor(answer.value * multiple)) for multiple in block.fit_multiples}), None


def _resolve_cell(path: Path, overrides: dict, block: MatrixBlock, matrix_path: Path, where: str) -> ResolvedConfig:
    """The cell's resolved configuration; a bad value the block's `set:` gave is the matrix file's fault, not
    the experiment file's, and is said so."""
    try:
        return resolve(path, overrides)
    except ConfigError as error:
        if error.field_name.split(".")[0].split("[")[0] not in block.set:
            raise
        raise ConfigError(matrix_path, f"{where}.set.{error.field_name}",
                          f"{error.message} (set for {path.stem})") from None
