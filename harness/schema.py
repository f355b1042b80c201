"""The record format: every kind of record the lab writes, as typed dataclasses, in one place.

A run's measurement, a memory prediction, a probe's facts and the pretraining of the lab's
base model are each one JSON file under results/, written atomically through `write` and
read back through `read`, which checks the kind and the version and names the file when
either is unknown. The memory categories and the file naming live here too. Importing this
module does not import torch: the report reads records without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.blocks.optimizers import optimizer_settings
from harness.blocks.training import BLOCKS as TRAINING_BLOCKS

# -- facts every record kind shares --------------------------------------------------------

# What is alive at a step's peak, by category: what persists across steps, then what a step makes.
PERSISTENT = ("weights", "quant_constants", "gradients", "optimizer_state")
# What sharding adds (FSDP2): the unsharded parameters of the layers in flight (all-gather buffers)
# and the unsharded gradients being reduced (reduce-scatter buffers). Unsharded runs have none.
SHARDING_BUFFERS = ("all_gather", "reduce_scatter")
CATEGORIES = (*PERSISTENT, "activations", *SHARDING_BUFFERS, "other")
PHASES = ("load", "forward", "backward", "optimizer")

STATUSES = ("ok", "oom", "skipped", "failed")
# Results rather than errors: a measurement, an out-of-memory, or a run its machine cannot do
# (a missing optional package, said in the record). Only ok and oom records are final.
FINISHED = ("ok", "oom", "skipped")
MEASURED = ("ok", "oom")

# Folders of results/ that hold something other than run records.
ATTEMPTS_FOLDER = "attempts"  # attempts that measured nothing, kept beside a cell's measurement
PREDICTIONS_FOLDER, PROBES_FOLDER, BASE_FOLDER = "predictions", "probes", "base"
SPEED_FOLDER = "speed"  # under PREDICTIONS_FOLDER: <device slug>/<run record file>, each run's predicted speed
MICROBENCH_FOLDER, LOGS_FOLDER, LOCKS_FOLDER = "microbench", "logs", ".locks"
FITS_FOLDER = "fits"  # what fits each card, predicted (harness.predict.solve)
JOBS_FOLDER = ".jobs"  # cluster jobs submitted per cell, and submitit's own files (harness.lab.launcher)
# Records whose own folder could not be written, kept in the lab's cache instead (write_or_set_aside).
UNSAVED_FOLDER = "unsaved"
ATTEMPT_SUFFIX = ".attempt.json"  # a worker's record before it becomes the cell's (harness.lab.runner)
NOT_RUN_FOLDERS = {ATTEMPTS_FOLDER, PREDICTIONS_FOLDER, PROBES_FOLDER, BASE_FOLDER, MICROBENCH_FOLDER,
                   LOGS_FOLDER, LOCKS_FOLDER, FITS_FOLDER, JOBS_FOLDER, UNSAVED_FOLDER}


class RecordError(ValueError):
    """A file under results/ that is not a record this code can read: names the file."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


# -- record kinds ---------------------------------------------------------------------------
# Every kind has KIND and VERSION. A field added later gets a default, so that older files of
# the same version still read; keys this code does not know are kept in `extra` (and written
# back), so a newer writer of the same version loses nothing.

@dataclass
class RunError:
    type: str
    message: str
    phase: str | None = None
    step: int | None = None
    memory_reached_bytes: int | None = None   # oom: how far the run got
    package: str | None = None                # skipped: the missing optional package
    returncode: int | None = None             # a worker that died without a record
    timeout_s: float | None = None
    log_tail: str | None = None
    traceback: str | None = None
    rank: int | None = None                   # a cell of several ranks: the rank whose failure this is


@dataclass
class Memory:
    unit: str
    source: str                 # cuda | cpu-tracked-tensors
    note: str
    peak_allocated: int
    breakdown_at_peak: dict[str, int]
    persistent: dict[str, int]
    tracked_step_peak: int
    tracked_phase_peaks: dict[str, int]
    phases: dict[str, dict[str, int]]
    peak_reserved: int | None = None
    peak_device_used: int | None = None
    device_used_before_load: int | None = None
    # Host bytes alive at most in the tracked step on a GPU (activations offloaded to the CPU)
    host_peak: int | None = None


@dataclass
class Throughput:
    # Tokens and tokens/s count every rank's tokens (global) in a cell of several ranks, whose step time is
    # its slowest rank's; each rank's own are in RunRecord.ranks. MFU is per device.
    tokens_per_step: int
    step_time_s: dict[str, float | list[float]]  # median, spread, ... and `all`: every timed step's
    tokens_per_s: float
    load_seconds: float
    timed_steps: int
    warmup_steps: int
    timing_includes_tracking: bool
    mfu: dict | None = None


@dataclass
class Loss:
    per_step: list[float]
    final: float | None
    warmup_steps: int
    eval: list[dict]
    eval_final: float | None


@dataclass
class Parameters:
    total: int
    trainable: int
    trainable_pct: float | None = None


@dataclass
class RunRecord:
    """One cell of the matrix: an experiment on a model and a device, measured (or why not)."""
    KIND: typing.ClassVar[str] = "run"
    VERSION: typing.ClassVar[int] = 1
    status: str
    experiment: str
    model: str
    config: dict
    config_hash: str
    kind: str = KIND
    schema_version: int = VERSION
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    environment: dict | None = None
    fingerprint: str | None = None
    budget: dict | None = None
    data: dict | None = None
    parameters: Parameters | None = None
    random_init: bool | None = None
    memory: Memory | None = None
    throughput: Throughput | None = None
    adapter_bytes_on_disk: int | None = None
    loss: Loss | None = None
    host_peak_rss_bytes: int | None = None
    error: RunError | None = None
    shared_gpu: str | None = None  # another process held the GPU during the run (who)
    # On a CPU that only emulates the cell's compute dtype (bf16, fp16): how the plan shortened the run, or
    # why it left the cell to a machine that computes in that dtype (then the record is `skipped`).
    emulated: str | None = None
    # The training loop that ran the steps (harness.engines): its name, library and version, the
    # arguments it was given, the optimizer class it built, and how it differs from the lab's own loop.
    engine: dict | None = None
    # A sharded run: the library that sharded it, its version and method (DeepSpeed: the config it was given).
    sharded_by: dict | None = None
    # A cell of several ranks (world_size > 1): each rank's own figures (rank, memory peaks and breakdown,
    # host_peak_rss_bytes, tokens_per_s, step_time_s, final_loss). Then `memory`'s peaks and
    # host_peak_rss_bytes are the highest over ranks (harness.measure.ranks), and `loss` the ranks' mean.
    ranks: list[dict] | None = None
    # The model's own code ran (trust_remote_code, in this run only): its source and the classes of its auto_map.
    remote_code: dict | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Prediction:
    """The memory of one training step predicted without running it (analytic or simulated)."""
    KIND: typing.ClassVar[str] = "prediction"
    VERSION: typing.ClassVar[int] = 1
    method: str                 # analytic | simulated
    experiment: str
    model: str
    seq_len: int
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    technique: dict
    device_type: str            # the code path predicted
    total_bytes: int
    categories: dict[str, int]
    persistent: dict[str, int]
    kind: str = KIND
    schema_version: int = VERSION
    versions: dict | None = None
    predictor: str | None = None  # digest of the code that predicted
    parameters: dict | None = None
    phase_peaks: dict | None = None
    peak_at: str | None = None
    seconds: float | None = None
    host_bytes: int | None = None  # host memory the step uses beside the device's (offloaded activations)
    world_size: int = 1  # ranks the step is sharded over: the bytes are one rank's
    # What the card must hold (CUDA): the caching allocator's peak reserved bytes (harness.predict.allocator)
    # and those plus what lives outside it (harness.device_memory); None in older predictions.
    reserved_bytes: int | None = None
    device_bytes: int | None = None
    allocator: str | None = None  # the allocator setting predicted: default | expandable_segments
    # Predicted speed on one card (harness.predict.speed): gpu, method (kernels | analytic), tokens_per_s,
    # step_time_s and its terms; None where no card was asked for.
    speed: dict | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ProbeRecord:
    """Facts a claim rests on, computed by one probe; the facts themselves are the probe's own."""
    KIND: typing.ClassVar[str] = "probe"
    VERSION: typing.ClassVar[int] = 1
    probe: str
    device: str
    created: str
    versions: dict
    kind: str = KIND
    schema_version: int = VERSION
    extra: dict = field(default_factory=dict)


@dataclass
class BaseRecord:
    """The pretraining of the lab's own base model."""
    KIND: typing.ClassVar[str] = "base"
    VERSION: typing.ClassVar[int] = 1
    recipe: dict
    recipe_id: str
    technique: str
    data: dict
    parameters: int
    tokens_trained: int
    uniform_loss: float
    train_loss: list[float]
    held_out: list[dict]
    final_held_out_loss: float
    seconds: float
    device_type: str
    environment: dict
    git: dict
    finished_at: str
    kind: str = KIND
    schema_version: int = VERSION
    weights_digest: str | None = None  # sha256 of the saved weights: the base's portable identity
    extra: dict = field(default_factory=dict)

    @property
    def identity(self) -> str:
        return base_identity(self.recipe_id, self.weights_digest)


def base_identity(recipe_id: str, weights_digest: str | None) -> str:
    """A pretrained base's portable name: its recipe, and the digest of its weights (the same recipe
    pretrained on another CPU gives other weights, so another base; bit-identical ones are one)."""
    return f"{recipe_id}@{weights_digest}"


@dataclass
class FitTable:
    """What fits each card, predicted: per model, technique and card, the longest sequence (at
    micro-batch 1) and the largest micro-batch (at a fixed sequence length), with and without
    gradient checkpointing, and peak-against-sequence curves."""
    KIND: typing.ClassVar[str] = "fit_table"
    VERSION: typing.ClassVar[int] = 1
    method: str                 # how the answers were found (the analytic search)
    device_type: str            # the code path predicted
    cards: dict[str, dict]      # nominal GB -> {"card_bytes", "cap_bytes"}
    micro_batch_seq_len: int    # the sequence length the micro-batch answers are for
    reference_shape: list[int]  # (sequence length, micro-batch) of each row's reference_peak_bytes
    rows: list[dict]            # experiment, model, gradient_checkpointing, card_gb, max_seq_len, ...
    curves: list[dict]          # experiment, model, gradient_checkpointing, seq_len, total_bytes
    cases: list[dict]           # case (a named configuration), experiment, model, card_gb, max_seq_len
    kind: str = KIND
    schema_version: int = VERSION
    versions: dict | None = None
    predictor: str | None = None  # digest of the code that predicted
    seconds: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class GpuCountTable:
    """How many GPUs, predicted: per model, way of training, sequence length and card, the smallest world
    size whose per-rank step fits, with that rank's breakdown (harness.predict.gpus)."""
    KIND: typing.ClassVar[str] = "gpu_count_table"
    VERSION: typing.ClassVar[int] = 1
    method: str                 # how the answers were found (the analytic search; simulated_* checks some)
    device_type: str            # the code path predicted
    world_sizes: list[int]      # the world sizes searched
    cards: dict[str, dict]      # nominal GB -> {"card_bytes", "cap_bytes"}
    rows: list[dict]            # row, experiment, model, seq_len, card_gb, world_size, analytic_bytes, ...
    kind: str = KIND
    schema_version: int = VERSION
    versions: dict | None = None
    predictor: str | None = None  # digest of the code that predicted
    seconds: float | None = None
    extra: dict = field(default_factory=dict)


KINDS: dict[str, type] = {cls.KIND: cls for cls in (RunRecord, Prediction, ProbeRecord, BaseRecord, FitTable,
                                                     GpuCountTable)}
Record = RunRecord | Prediction | ProbeRecord | BaseRecord | FitTable | GpuCountTable


# -- conversion -----------------------------------------------------------------------------

def _build(cls: type, data: dict, path: Path) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    kwargs = {}
    for name in names & data.keys():
        kwargs[name] = _value(hints[name], data[name], path, name)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.name != "extra"
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecordError(path, f"a {getattr(cls, 'KIND', cls.__name__)} record needs {', '.join(missing)}")
    if "extra" in {f.name for f in dataclasses.fields(cls)}:
        kwargs["extra"] = {k: v for k, v in data.items() if k not in names}
    return cls(**kwargs)


def _value(hint: Any, value: Any, path: Path, name: str) -> Any:
    """Nested sections become their dataclasses; everything else stays as JSON gave it."""
    if value is None:
        return None
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    for option in options:
        if dataclasses.is_dataclass(option):
            if not isinstance(value, dict):
                raise RecordError(path, f"field '{name}': expected an object, got {type(value).__name__}")
            return _build(option, value, path)
    return value


def from_dict(data: Any, path: str | Path = "<record>", kind: str | None = None) -> Record:
    """A typed record from its JSON object; RecordError (naming `path`) if it is not one."""
    path = Path(path)
    if not isinstance(data, dict):
        raise RecordError(path, f"not a JSON object ({type(data).__name__})")
    # Run records of version 1 were written before records named their kind.
    found = data.get("kind") or ("run" if "status" in data and "experiment" in data else None)
    if found not in KINDS:
        raise RecordError(path, f"unknown record kind {found!r}; known: {', '.join(KINDS)}")
    if kind is not None and found != kind:
        raise RecordError(path, f"a {found} record where a {kind} record was expected")
    cls = KINDS[found]
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version > cls.VERSION:
        raise RecordError(path, f"{found} record of schema version {version!r}; this code reads up to "
                          f"version {cls.VERSION} (a newer harness wrote it)")
    return _build(cls, data, path)


def value_problems(record: Record) -> list[str]:
    """What in a record read by `from_dict` is not what this code writes: an unknown status, a value of
    the wrong type, NaN or infinity (a hand-edited or damaged file). `from_dict` keeps JSON's values as
    they are; the report and the runner's rule for replacing a record ask this first."""
    status = getattr(record, "status", STATUSES[0])
    problems = [] if status in STATUSES else [f"field 'status': unknown status {status!r}; "
                                              f"known: {', '.join(STATUSES)}"]
    hints = typing.get_type_hints(type(record))
    for section in dataclasses.fields(record):
        if section.name != "extra":
            _check_value(hints[section.name], getattr(record, section.name), section.name, problems)
    return problems


def _check_value(hint: Any, value: Any, name: str, problems: list[str]) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        found: list[list[str]] = []
        for option in (a for a in args if a is not type(None)):
            found.append([])
            _check_value(option, value, name, found[-1])
            if not found[-1]:
                return
        problems.extend(found[0])
        return
    if dataclasses.is_dataclass(hint):
        for section_field in dataclasses.fields(hint):
            _check_value(typing.get_type_hints(hint)[section_field.name], getattr(value, section_field.name),
                         f"{name}.{section_field.name}", problems)
        return
    if hint in (int, float):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        # an int may come as an integral float (the analytic predictor's sums of products)
        integral = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
        if not number or (hint is int and not integral):
            problems.append(f"field '{name}': expected {hint.__name__}, got {type(value).__name__} {value!r:.40}")
        elif not math.isfinite(value):
            problems.append(f"field '{name}': {value} is not a measurement")
    elif hint in (str, bool) and not isinstance(value, hint):
        problems.append(f"field '{name}': expected {hint.__name__}, got {type(value).__name__} {value!r:.40}")
    elif origin is dict and args:
        if not isinstance(value, dict):
            problems.append(f"field '{name}': expected an object, got {type(value).__name__}")
            return
        for key, item in value.items():
            _check_value(args[1], item, f"{name}.{key}", problems)
    elif origin is list and args and args[0] is not dict:
        if not isinstance(value, list):
            problems.append(f"field '{name}': expected a list, got {type(value).__name__}")
            return
        for index, item in enumerate(value):
            _check_value(args[0], item, f"{name}[{index}]", problems)


def to_dict(record: Record) -> dict:
    """The JSON object of a record: its fields in order, `extra` folded back in."""
    data = dataclasses.asdict(record)
    data.update(data.pop("extra", {}))
    return data


def read(path: str | Path, kind: str | None = None) -> Record:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than the parser goes
        raise RecordError(path, f"not JSON: {error or type(error).__name__}") from None
    return from_dict(data, path, kind)


def write(path: str | Path, record: Record) -> Path:
    return write_atomic(path, to_dict(record))


def write_or_set_aside(path: str | Path, record: Record, aside: Path) -> Path:
    """Write a record; where its folder cannot be written (a full disk, a permission taken away during the
    run), write it to `aside` instead and say so in one line, so that a measurement is never lost."""
    try:
        return write(path, record)
    except OSError as error:
        kept = write(Path(aside) / Path(path).name.lstrip("."), record)
        print(f"could not write {path} ({error.strerror or error}): the record is kept at {kept}", file=sys.stderr,
              flush=True)
        return kept


def write_atomic(path: str | Path, data: dict) -> Path:
    """Write to a temporary file in the same folder, fsync, rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's file is the owner's alone; a record is read like any file
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- file naming ----------------------------------------------------------------------------

def model_slug(model: str) -> str:
    """A file-name part for a model name, a hub id or a path."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in model)[-60:]


def record_path(out_dir: str | Path, device_slug: str, name: str, model: str, config_hash: str,
                repeat: int = 0) -> Path:
    """One file per (device, experiment, model, resolved configuration, repeat): two
    configurations never share a file, nor do two devices."""
    suffix = f"-r{repeat}" if repeat else ""
    return Path(out_dir) / device_slug / f"{name}__{model_slug(model)}__{config_hash[:12]}{suffix}.json"


def prediction_path(out_dir: str | Path, experiment: str, model: str, seq_len: int, micro_batch: int,
                    device_type: str, method: str, world_size: int = 1) -> Path:
    ranks = f"_w{world_size}" if world_size > 1 else ""
    return (Path(out_dir) / PREDICTIONS_FOLDER /
            f"{experiment}__{model_slug(model)}__s{seq_len}_b{micro_batch}{ranks}_{device_type}__{method}.json")


def fit_table_path(out_dir: str | Path, device_type: str = "cuda") -> Path:
    return Path(out_dir) / FITS_FOLDER / f"what-fits__{device_type}.json"


def gpu_table_path(out_dir: str | Path, device_type: str = "cuda") -> Path:
    return Path(out_dir) / FITS_FOLDER / f"how-many-gpus__{device_type}.json"


def base_record_path(out_dir: str | Path, device_slug: str, identity: str) -> Path:
    """Where a base's pretraining record goes: one file per base (base_identity), so that the same
    recipe pretrained on two machines into other weights keeps both records."""
    return Path(out_dir) / BASE_FOLDER / f"{device_slug}__{identity}.json"


def beside_attempt(attempt: Path, what: str) -> Path:
    """A file of a torchrun worker's, named after its cell like a record's interrupted write
    ('.<cell>.json.<attempt>.<what>.tmp'): a killed run's is cleaned like one."""
    stem, attempt_id = attempt.name[1:].removesuffix(ATTEMPT_SUFFIX).rsplit(".", 1)
    return attempt.with_name(f".{stem}.json.{attempt_id}.{what}.tmp")


def rank_record_path(attempt: Path, rank: int) -> Path:
    """Where a rank of a cell of several ranks writes its record when it did not end ok (harness.measure.ranks)."""
    return beside_attempt(attempt, f"rank{rank}")


def attempt_path(record: Path, attempt_id: str) -> Path:
    """Where an attempt that measured nothing goes when its cell keeps a measurement."""
    return record.parent.parent / ATTEMPTS_FOLDER / record.parent.name / f"{record.stem}.{attempt_id[:12]}.json"


def find_records(folder: str | Path) -> list[Path]:
    """Every run record under a folder (temporary files of interrupted writes start with '.')."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("*/*.json")
                  if not p.name.startswith(".") and p.parent.name not in NOT_RUN_FOLDERS)


# -- one configuration, whatever the record's file ------------------------------------------

# Config fields added after records were made, with the value every earlier record ran with:
# at that value they are left out of a configuration's identity (its hash, harness.config),
# so that adding a field does not make earlier measurements look like other configurations.
# A section of None is a top-level field. Every optimizer's own setting came after the first records,
# at the default its descriptor gives it (harness.blocks.optimizers).
# So did every training block (harness.blocks.training), off.
ADDED_LATER = {("lora", "use_dora"): False, ("lora", "use_rslora"): False, ("lora", "init_lora_weights"): True,
               ("lora", "peft"): {}, (None, "engine"): "harness", (None, "training_args"): {},
               (None, "sharding"): "none", (None, "cpu_offload"): False, (None, "world_size"): 1,
               **{("optim", setting.name): setting.default for setting in optimizer_settings()},
               **{(None, name): False for name in TRAINING_BLOCKS}}
# Config keys that differ between two records of the same configuration: which attempt, which
# hash (computed from the rest), which copy of the same pretrained base.
# what a record's config says that does not decide what is measured: ids, prose, and the experiment file's name
# (lora-ga4 is lora at accumulation 4: one measurement under two names, as harness.config.config_hash has it)
_VOLATILE_CONFIG_KEYS = ("run_id", "config_hash", "base_checkpoint", "description", "summary", "name")


def canonical_config(config: dict) -> dict:
    """A resolved config without the later-added fields that hold their original value."""
    canonical = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for (section, key), original in ADDED_LATER.items():
        fields = canonical if section is None else canonical.get(section)
        if isinstance(fields, dict) and fields.get(key, original) == original:
            fields.pop(key, None)
    return canonical


def configuration_key(record: dict, device_slug: str) -> str:
    """Two run records (as JSON objects) of one configuration on one device share this key, whatever
    experiment file named it; the report keeps the newest."""
    config = {k: v for k, v in canonical_config(record.get("config") or {}).items()
              if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps([device_slug, record.get("model"), config], sort_keys=True, default=str)
