"""Experiment files: load YAML (with `include:`), validate every field, resolve the technique.

An experiment file is data. It is read with a safe YAML loader, every key is checked
against the schema below, and the technique and its building blocks are looked up by
registered name only. Any problem raises `ConfigError`, which names the file and the
field; the command line turns it into exit status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from harness import schema
from harness.architectures import ARCHITECTURES, DEFAULT_TARGETS, lora_targets
from harness.blocks.adapters import ADAPTERS
from harness.blocks.optimizers import OPTIMIZERS, optimizer_settings
from harness.blocks.quantizations import QUANTIZATIONS
from harness.blocks.training import blocks_on
from harness.env import resolve_device
from harness.errors import ConfigError
from harness.model_files import read_model_config
from harness.step.checkpoint import BASE_SOURCE, base_identity
from harness.techniques import TECHNIQUES, Technique

# The training loops a run can be measured in (harness.engines registers each).
EngineName = Literal["harness", "trainer", "trl-sft"]
ENGINE_NAMES = typing.get_args(EngineName)
# Files in experiments/ whose name starts with "_" are fragments to include, not experiments.
FRAGMENT_PREFIX = "_"
# The matrix of runs lives beside the experiments (see harness.lab.bench).
MATRIX_FILE = "matrix.yaml"
EXIT_BAD_CONFIG = 2


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # Every linear layer of attention and MLP (per expert in MoE models), as QLoRA does: these
    # Llama names stand for the model family's own (harness.architectures.lora_targets); peft's
    # "all-linear" is accepted too (it also adapts MoE routers).
    target_modules: str | list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # peft's own LoraConfig fields: DoRA (weight-decomposed), rank-stabilised scaling
    # (alpha / sqrt(r)), and the initialisation (true, "gaussian", "pissa", "pissa_niter_4",
    # "olora", ...).
    use_dora: bool = False
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    # Any other LoraConfig field, passed to peft as given (checked against peft's own fields).
    peft: dict = field(default_factory=dict)


@dataclass
class _CommonOptimSettings:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


# The `optim:` block: the settings every optimizer reads, then each optimizer's own (LoRA+'s ratio, GaLore's
# rank, ...), as its descriptor declares them (harness.blocks.optimizers).
OptimSettings = dataclasses.make_dataclass(
    "OptimSettings", [(s.name, s.type, field(default=s.default)) for s in optimizer_settings()],
    bases=(_CommonOptimSettings,), namespace={"__module__": __name__})


@dataclass
class DataSettings:
    # "stdlib" is the offline default corpus ("stdlib-lib" and "stdlib-tests" are its library
    # modules and its tests); otherwise a local file or folder of text, or a hub dataset name
    # (needs a network).
    source: str = "stdlib"
    text_field: str = "text"
    split: str = "train"
    # Held-out documents for `eval_every`: "eval" for the standard library's parts, the
    # dataset's own split name (e.g. "validation") for a hub dataset.
    eval_split: str = "eval"
    # Only this many bytes of text are read and tokenized (enough for a benchmark).
    max_bytes: int = 4_000_000


@dataclass
class Experiment:
    technique: str
    description: str = ""
    model: str = "tiny-llama"
    # Building blocks; None means "the technique's own choice" (see harness.techniques).
    weights: Literal["fp32", "bf16", "fp16"] | None = None
    autocast: Literal["none", "bf16", "fp16"] | None = None
    loss_scaling: bool | None = None
    quantization: str | None = None  # a key of harness.blocks.quantizations.QUANTIZATIONS
    double_quant: bool | None = None
    adapter: str | None = None  # a key of harness.blocks.adapters.ADAPTERS
    optimizer: str | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    data: DataSettings = field(default_factory=DataSettings)
    seq_len: int = 256
    micro_batch: int = 4
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    # With checkpointing: keep attention's outputs instead of recomputing them in backward (TRL's
    # selective checkpointing policy: the SDPA op's outputs are saved, everything else recomputed).
    selective_checkpointing: bool = False
    # Tensors saved for backward go to host memory in forward and come back in backward (TRL's
    # OffloadActivations, what SFTTrainer's activation_offloading runs); a GPU's technique.
    activation_offloading: bool = False
    # Liger's Triton kernels patched into the model: RMSNorm, SwiGLU, RoPE and the fused linear
    # cross-entropy, which never materialises the logits (a GPU's technique).
    liger_kernels: bool = False
    # torch.compile on the model (inductor); memory predictions are eager's.
    compile: bool = False
    # Each parameter steps in a hook as soon as its gradient is complete, so gradients are freed
    # during backward instead of all being alive at the optimizer step (harness.step.train).
    optimizer_in_backward: bool = False
    # Parameters, gradients and optimizer state sharded over the ranks:
    # torch's FSDP2 (fully_shard per decoder layer, harness.step.sharding) or DeepSpeed's ZeRO stage 2 or 3
    # (harness.step.zero).
    sharding: Literal["none", "fsdp2", "zero2", "zero3"] = "none"
    # With sharding: the shards of parameters, gradients and optimizer state live in host memory
    # and the optimizer steps there (FSDP2's CPUOffloadPolicy; ZeRO's offload_optimizer and, for
    # stage 3, offload_param).
    cpu_offload: bool = False
    # How many processes (one GPU each) train together, each on its own micro_batch; above 1 the
    # worker runs under torchrun (a matrix's world_sizes, `run --nproc`, `predict --world-size`).
    world_size: int = 1
    warmup_steps: int = 2
    steps: int = 6
    # Held-out loss every N optimizer steps and at the end (0: none), on this many sequences
    # of the data's eval split.
    eval_every: int = 0
    eval_sequences: int = 32
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    budget_gb: float | None = None
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    trust_remote_code: bool = False
    # Which training loop runs the step (harness.engines): the lab's own, transformers' Trainer or
    # TRL's SFTTrainer, measured by the same meters on the same batches.
    engine: EngineName = "harness"
    # The Trainer engines only: further TrainingArguments (SFTConfig for trl-sft) fields, passed
    # as given; fields the experiment already sets are refused (harness.engines.arguments).
    training_args: dict = field(default_factory=dict)


# Upper bounds: a benchmark measures a few steps on a few sequences; a value past these is a slip of
# the keyboard that would hold the machine for days (a real run's time is limited too: harness.lab.bench).
MAX_STEPS, MAX_SEQUENCES, MAX_BATCH, MAX_RANKS = 100_000, 100_000, 65_536, 65_536
SEED_LIMIT = 2**32  # numpy's and Python's seeds are below it; torch's manual_seed wraps larger ones

# Bounds checked after types: (field, predicate, message).
_RANGES = [
    ("seq_len", lambda v: v >= 2, "must be at least 2"),
    ("micro_batch", lambda v: 1 <= v <= MAX_BATCH, f"must be at least 1 and at most {MAX_BATCH:,}"),
    ("grad_accum", lambda v: 1 <= v <= MAX_BATCH, f"must be at least 1 and at most {MAX_BATCH:,}"),
    ("world_size", lambda v: 1 <= v <= MAX_RANKS, f"must be at least 1 and at most {MAX_RANKS:,}"),
    ("warmup_steps", lambda v: 0 <= v <= MAX_STEPS, f"must be >= 0 and at most {MAX_STEPS:,}"),
    ("steps", lambda v: 1 <= v <= MAX_STEPS, f"must be at least 1 and at most {MAX_STEPS:,} (a measurement, "
     "not a training run)"),
    ("eval_every", lambda v: 0 <= v <= MAX_STEPS, "must be >= 0 (0: no evaluation) and at most the steps' bound"),
    ("eval_sequences", lambda v: 1 <= v <= MAX_SEQUENCES, f"must be at least 1 and at most {MAX_SEQUENCES:,}"),
    ("seed", lambda v: 0 <= v < SEED_LIMIT, "must be from 0 to 2**32 - 1"),
    ("budget_gb", lambda v: v is None or 0 < v < float("inf"), "must be a positive number of GB"),
    ("lora.r", lambda v: v >= 1, "must be at least 1"),
    ("lora.dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("lora.alpha", lambda v: 0 < v < float("inf"), "must be positive"),
    ("optim.lr", lambda v: 0 < v < float("inf"), "must be positive"),
    ("optim.eps", lambda v: 0 < v < float("inf"), "must be positive"),
    *((f"optim.{s.name}", s.within, s.bound) for s in optimizer_settings()),
    ("optim.weight_decay", lambda v: 0 <= v < float("inf"), "must be >= 0"),
    ("optim.betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
    ("data.max_bytes", lambda v: v > 0, "must be positive"),
]


def field_check(field_name: str) -> tuple[Callable[[Any], bool], str]:
    """The bound an experiment field is checked against, for the same value given elsewhere."""
    return next((ok, message) for name, ok, message in _RANGES if name == field_name)


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, path: Path, name: str) -> Any:
    """Check `value` against a type hint; returns the value (ints are accepted for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, path, name)
            except ConfigError as error:
                errors.append(error.message)
        raise ConfigError(path, name, " or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, name, f"{value!r} is not allowed; expected {_type_name(hint)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, name, f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], path, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, path, prefix=f"{name}.")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; it is meant as a number
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(path, name, f"expected true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(path, name, f"expected {hint.__name__}, got a boolean")
    if not isinstance(value, hint):
        raise ConfigError(path, name, f"expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_dataclass(cls: type, data: Any, path: Path, prefix: str = "") -> Any:
    """A dataclass from a mapping, every key and type checked; ConfigError names the field."""
    if not isinstance(data, dict):
        raise ConfigError(path, prefix.rstrip(".") or "<top level>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(path, f"{prefix}{key}", f"unknown key; allowed: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], path, f"{prefix}{k}") for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(path, f"{prefix}{missing[0]}", "is required")
    return cls(**kwargs)


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


# What one experiment or matrix file may hold: YAML's aliases let a few lines stand for billions of
# values (each alias of an alias doubles them), and nesting recurses in the parser; both are refused
# before anything is built from them.
MAX_YAML_CHARS, MAX_YAML_VALUES, MAX_YAML_DEPTH = 1_000_000, 100_000, 64


def _load_yaml(text: str, path: Path) -> Any:
    """The safe loader's document, after its size (aliases expanded) and depth are checked."""
    if len(text) > MAX_YAML_CHARS:
        raise ConfigError(path, "<yaml>", f"{len(text):,} characters: an experiment file is at most "
                          f"{MAX_YAML_CHARS:,}")
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_size(node, path)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(path, "<yaml>", f"nested more than {MAX_YAML_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def _check_yaml_size(root: yaml.Node, path: Path) -> None:
    """Count the values the document stands for, each alias expanded (a shared node is counted once per
    use, from a memo: the count itself never expands anything), and how deep it nests."""
    sizes: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        if finished:
            ancestors.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise ConfigError(path, "<yaml>", f"the value at line {node.start_mark.line + 1} stands for more "
                                  f"than {MAX_YAML_VALUES:,} values through its aliases (an alias of an alias "
                                  "doubles them); write the values out")
            continue
        if id(node) in sizes:
            continue
        if id(node) in ancestors:
            raise ConfigError(path, "<yaml>", f"an alias at line {node.start_mark.line + 1} refers to a value "
                              "that holds it")
        ancestors.add(id(node))
        if len(ancestors) > MAX_YAML_DEPTH:
            raise ConfigError(path, "<yaml>", f"nested more than {MAX_YAML_DEPTH} levels deep")
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)


def read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read one file and everything it includes; the including file wins on conflicts."""
    if path in chain:
        raise ConfigError(chain[-1], "include", f"include cycle through {path}")
    where = (chain[-1], "include") if chain else (path, "<file>")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if chain:
            raise ConfigError(chain[-1], "include", f"included file {path} does not exist") from None
        raise ConfigError(path, "<file>", "file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(*where, f"{path} is a folder, not an experiment file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(*where, f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        data = _load_yaml(text, path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, "<yaml>", f"YAML syntax error{where}: {getattr(error, 'problem', error)}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(path, "<top level>", f"expected a mapping of fields, got {type(data).__name__}")
    include = data.pop("include", None)
    if include is None:
        return data
    includes = include if isinstance(include, list) else [include]
    merged: dict = {}
    for name in includes:
        if not isinstance(name, str):
            raise ConfigError(path, "include", f"expected a file name, got {name!r}")
        merged = _deep_merge(merged, read_yaml((path.parent / name).resolve(), chain + (path,)))
    return _deep_merge(merged, data)


def load_experiment(path: str | Path, overrides: dict | None = None) -> tuple[str, Experiment]:
    """Load and validate one experiment file; returns (name, experiment). Raises ConfigError."""
    path = Path(path).resolve()
    if path.name.startswith("."):
        raise ConfigError(path, "<file>", "a hidden file's name: the experiment's records would be hidden files, "
                          "which results/ readers skip as unfinished writes; give it a name without a leading '.'")
    data = _deep_merge(read_yaml(path), overrides or {})
    experiment = build_dataclass(Experiment, data, path)
    if isinstance(experiment.lora.target_modules, str) and experiment.lora.target_modules != "all-linear":
        experiment.lora.target_modules = [experiment.lora.target_modules]  # one module, not its letters
    _check_semantics(experiment, path)
    _check_model_source(experiment, path)
    _check_library_values(experiment, path)
    return path.stem, experiment


def _lookup(experiment: Experiment, dotted: str) -> Any:
    value: Any = experiment
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check_semantics(experiment: Experiment, path: Path) -> None:
    if experiment.technique not in TECHNIQUES:
        raise ConfigError(path, "technique", f"unknown technique {experiment.technique!r}; "
                          f"registered: {', '.join(sorted(TECHNIQUES))}")
    if experiment.adapter is not None and experiment.adapter not in ADAPTERS:
        raise ConfigError(path, "adapter", f"unknown adapter {experiment.adapter!r}; "
                          f"registered: {', '.join(ADAPTERS)}")
    if experiment.quantization is not None and experiment.quantization not in QUANTIZATIONS:
        raise ConfigError(path, "quantization", f"unknown quantization {experiment.quantization!r}; "
                          f"registered: {', '.join(QUANTIZATIONS)}")
    if experiment.optimizer is not None and experiment.optimizer not in OPTIMIZERS:
        raise ConfigError(path, "optimizer", f"unknown optimizer {experiment.optimizer!r}; "
                          f"registered: {', '.join(sorted(OPTIMIZERS))}")
    for name, ok, message in _RANGES:
        if not ok(_lookup(experiment, name)):
            raise ConfigError(path, name, f"{message} (got {_lookup(experiment, name)!r})")
    _check_model_name(experiment.model, path)
    technique = resolve_technique(experiment)
    if technique.autocast == "fp16" and not technique.loss_scaling:
        raise ConfigError(path, "loss_scaling", "fp16 autocast needs loss scaling (set loss_scaling: true)")
    if technique.quantization != "none" and technique.adapter == "none":
        raise ConfigError(path, "adapter", "a quantized base cannot be fully fine-tuned; use an adapter (lora)")
    quantization = QUANTIZATIONS[technique.quantization]
    if technique.double_quant and not (quantization and quantization.takes_double_quant):
        takes = " or ".join(f"{name.upper()}'s (quantization: {name})" for name, q in QUANTIZATIONS.items()
                            if q and q.takes_double_quant)
        raise ConfigError(path, "double_quant", f"double quantization is {takes}, not {technique.quantization}'s")
    if technique.loss_scaling and technique.weights == "fp16":
        raise ConfigError(path, "loss_scaling", "loss scaling unscales fp32 gradients: it needs fp32 master "
                          "weights (weights: fp32), not fp16 ones")
    # What the training blocks it turns on and its optimizer refuse, as their descriptors say (harness.blocks).
    refusals = [r for _, block in blocks_on(experiment) for r in block.refusals]
    for refusal in refusals + list(OPTIMIZERS[technique.optimizer].refusals):
        if refusal.applies(experiment, technique):
            raise ConfigError(path, refusal.field, refusal.why)
    _check_sharding(experiment, technique, path)
    settings = _model_settings(experiment.model)
    context = settings.get("max_position_embeddings") or settings.get("n_positions")
    if context and experiment.seq_len > context and not settings.get("rope_scaling"):
        raise ConfigError(path, "seq_len", f"{experiment.seq_len} is longer than {experiment.model}'s context of "
                          f"{context} tokens (max_position_embeddings; a model with rope_scaling may go further)")
    if technique.adapter != "none":
        _check_lora_targets(experiment, path, settings.get("model_type"))
        _check_peft_fields(experiment.lora.peft, path)
    _check_training_args(experiment, path)
    source = experiment.data.source
    if source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
        raise ConfigError(path, "data.source", f"no such file or folder: {source}")
    assert technique.quantization in QUANTIZATIONS and technique.adapter in ADAPTERS
    if experiment.eval_every:
        if experiment.data.source == "stdlib":
            raise ConfigError(path, "data.source", "stdlib has no held-out split for eval_every; "
                              "use stdlib-lib or stdlib-tests (or set eval_every: 0)")
        if experiment.data.source.startswith("stdlib-") and experiment.data.eval_split != "eval":
            raise ConfigError(path, "data.eval_split", f"the standard library's held-out split is 'eval' "
                              f"(got {experiment.data.eval_split!r})")


def _check_sharding(experiment: Experiment, technique: Technique, path: Path) -> None:
    """What sharding combines with: harness.step.sharding says why for each refusal."""
    from harness.techniques import SHARDING_EXCLUDES

    if experiment.world_size > 1 and experiment.sharding == "none":
        raise ConfigError(path, "world_size", "several ranks need a sharding (sharding: fsdp2, zero2 or zero3); "
                          "plain data parallelism keeps a whole copy on every rank, which one rank already shows")
    if experiment.cpu_offload and experiment.sharding == "none":
        raise ConfigError(path, "cpu_offload", "offloading moves the shards of a sharded model: it needs a sharding "
                          "(sharding: fsdp2, zero2 or zero3)")
    if experiment.sharding == "none":
        return
    for name, excluded in SHARDING_EXCLUDES.items():
        why = excluded(experiment, technique)
        if why:
            raise ConfigError(path, name, f"not with sharding: {why}")


def _model_settings(model: str) -> dict:
    """A model's config fields without loading anything heavy: a preset's, or those of a local
    config.json or model folder; empty where they cannot be read here (a hub id, the base)."""
    from harness.presets import PRESETS

    if model in PRESETS:
        return PRESETS[model]
    path = Path(model).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if path.suffix != ".json" or not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


class TargetsWarning(UserWarning):
    """LoRA targets that leave some linear layers of each decoder layer out."""


def _check_lora_targets(experiment: Experiment, path: Path, model_type: str | None) -> None:
    """LoRA's target modules must name linear layers the model has (known where its family is);
    targets that leave some of a layer's linear layers out get a warning."""
    from harness.presets import PRESETS

    targets = experiment.lora.target_modules
    if targets == "all-linear" or list(targets) == list(DEFAULT_TARGETS):
        return  # every linear layer of the model's family
    if not targets:
        raise ConfigError(path, "lora.target_modules", "names no module: give at least one (or all-linear)")
    if model_type not in ARCHITECTURES:
        return  # another family's layers are known once its model is built (peft checks them)
    names = ARCHITECTURES[model_type].linear_names()
    moe = PRESETS.get(experiment.model, {}).get("num_local_experts")
    known = set(names) | {"lm_head"} | ({"gate"} if moe else set())
    unknown = [name for name in targets if name not in known]
    if unknown:
        raise ConfigError(path, "lora.target_modules", f"{experiment.model} ({model_type}) has no linear layer named "
                          f"{', '.join(map(repr, unknown))}; its linear layers: {', '.join(sorted(known))}")
    warning = lora_targets(types.SimpleNamespace(model_type=model_type), targets)[1]
    if warning:
        warnings.warn(f"{path}: lora.target_modules: {warning}", TargetsWarning, stacklevel=2)


def _check_peft_fields(extra: dict, path: Path) -> None:
    """`lora.peft` passes fields to peft's LoraConfig: they must be LoraConfig's (read from peft)."""
    if not extra:
        return
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    own = {f.name for f in dataclasses.fields(LoraSettings)} | {"lora_alpha", "lora_dropout", "task_type"}
    for key in extra:
        if key not in known:
            raise ConfigError(path, f"lora.peft.{key}", "not a field of peft's LoraConfig")
        if key in own:
            raise ConfigError(path, f"lora.peft.{key}", "set it in the lora block itself, not under peft")


def _check_training_args(experiment: Experiment, path: Path) -> None:
    """`training_args` are fields of the engine's own arguments class, none the experiment sets itself."""
    if not experiment.training_args:
        return
    if experiment.engine == "harness":
        raise ConfigError(path, "training_args", "the lab's own loop takes no TrainingArguments; "
                          "set engine: trainer (or trl-sft)")
    from harness.engines.arguments import arguments_class, owned_field

    try:
        known = {f.name for f in dataclasses.fields(arguments_class(experiment.engine))}
    except ModuleNotFoundError as missing:
        raise ConfigError(path, "training_args", f"{missing.name} is not installed here, so its arguments' fields "
                          "cannot be checked (the engines extra: pip install -e '.[engines]')") from None
    from harness.engines.arguments import sends_data

    for key in experiment.training_args:
        if sends_data(key):
            raise ConfigError(path, f"training_args.{key}", sends_data(key))
        if key not in known:
            raise ConfigError(path, f"training_args.{key}", f"not a field of {experiment.engine}'s arguments "
                              "(TrainingArguments, or SFTConfig for trl-sft)")
        owner = owned_field(key)
        if owner:
            raise ConfigError(path, f"training_args.{key}", f"the experiment sets it: {owner}")


def _check_model_source(experiment: Experiment, path: Path) -> None:
    """A model file or folder must hold a config.json that parses and names its model type, read as data
    (a model's own code never runs here); a hub id must be one. Nothing is looked up on the network."""
    from harness.presets import PRESETS

    model = experiment.model
    if model in PRESETS or model == BASE_SOURCE:
        return
    where = Path(model).expanduser()
    if not (model.startswith((".", "/", "~")) or model.endswith(".json") or where.exists()):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(model)
        except HFValidationError as error:
            raise ConfigError(path, "model", f"no preset, file or folder, and not a hub id: {error}") from None
        return
    if not where.exists():
        raise ConfigError(path, "model", f"no such file or folder: {model}")
    if where.is_dir():
        where = where / "config.json"
    elif where.suffix != ".json":
        raise ConfigError(path, "model", f"{model} is neither a config.json nor a model folder")
    settings = read_model_config(where, path)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if settings["model_type"] not in CONFIG_MAPPING_NAMES:
        if "auto_map" not in settings:
            raise ConfigError(path, "model", f"{where}: transformers knows no model_type {settings['model_type']!r}")
        if not experiment.trust_remote_code:
            raise ConfigError(path, "trust_remote_code", f"{model}'s configuration is its own code (auto_map): a run "
                              "needs trust_remote_code: true to run it")


def _simple_hint(hint: Any) -> bool:
    """A type hint `_coerce` checks completely (plain values, literals, lists and unions of them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal or hint in (bool, int, float, str, type(None)):
        return True
    if origin in (typing.Union, types.UnionType, list):
        return all(_simple_hint(a) for a in args)
    return False


def _check_library_values(experiment: Experiment, path: Path) -> None:
    """`lora.peft` and `training_args` are handed to peft's LoraConfig and the engine's TrainingArguments
    as given: each value is checked against the class's own type hint (a number given as text becomes
    the number), then the class itself is built, so that its own checks run here and not in a run."""
    import tempfile

    checks = []
    if experiment.lora.peft and resolve_technique(experiment).adapter != "none":
        from peft import LoraConfig

        checks.append(("lora.peft", experiment.lora.peft, LoraConfig, {}))
    if experiment.training_args and experiment.engine != "harness":
        from harness.engines.arguments import arguments_class

        # The lab's own fields as no device decides them: TrainingArguments refuses bf16 where the machine
        # lacks it unless told the run is on a CPU, and SFTConfig turns bf16 on by default (the engine sets
        # the precision and the device itself, harness.engines.arguments).
        checks.append(("training_args", experiment.training_args, arguments_class(experiment.engine),
                       {"output_dir": str(Path(tempfile.gettempdir()) / "harness-validate"), "use_cpu": True,
                        "bf16": False, "fp16": False}))
    for prefix, values, cls, required in checks:
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if _simple_hint(hints.get(key)):
                values[key] = _coerce(value, hints[key], path, f"{prefix}.{key}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(**{**required, **values})
        except Exception as error:  # the library's own check, whatever it raises: one line naming the field
            named = ([key for key in values if key in str(error)]  # the message names the field, or its value
                     or [key for key, value in values.items() if str(value) in str(error)])
            raise ConfigError(path, f"{prefix}.{named[0]}" if named else prefix,
                              f"{cls.__name__} refuses it: {str(error).splitlines()[0][:300]}") from None


def _check_model_name(model: str, path: Path) -> None:
    """A model name that is no preset, file or folder but close to a preset's is a typo, not a
    hub id to look up (which would wait on the network): say so at once."""
    from harness.presets import PRESETS

    names = [*PRESETS, BASE_SOURCE]
    if model in names or "/" in model or Path(model).expanduser().exists():
        return
    close = difflib.get_close_matches(model, names, n=3, cutoff=0.6)
    if close:
        raise ConfigError(path, "model", f"{model!r} is no preset, file or folder; did you mean "
                          f"{' or '.join(repr(c) for c in close)}? (a hub id reads owner/name)")


def resolve_technique(experiment: Experiment) -> Technique:
    """The technique's building blocks with the experiment's explicit choices applied."""
    base = TECHNIQUES[experiment.technique]
    chosen = {f.name: getattr(experiment, f.name) for f in dataclasses.fields(Technique)
              if hasattr(experiment, f.name) and getattr(experiment, f.name) is not None}
    return dataclasses.replace(base, **chosen)


def experiment_of(config: dict) -> Experiment:
    """The typed experiment of a resolved config (as a worker receives it and a record keeps it)."""
    fields = {f.name for f in dataclasses.fields(Experiment)}
    return build_dataclass(Experiment, {k: v for k, v in config.items() if k in fields},
                           Path(f"<config of {config.get('name', '?')}>"))


def resolved_config(name: str, experiment: Experiment) -> dict:
    """Everything that determines a run, with the technique's blocks spelled out; a budgeted one also says
    its card's bytes (harness.measure.budget.card_bytes), so that a run measured when `budget_gb` meant
    another number of bytes is another configuration."""
    config = dataclasses.asdict(experiment)
    config.update(dataclasses.asdict(resolve_technique(experiment)))
    config["name"] = name
    if experiment.budget_gb is not None:
        from harness.cards import card_bytes

        config["budget_card_bytes"] = card_bytes(experiment.budget_gb)
    return config


@dataclass(frozen=True)
class ResolvedConfig:
    """An experiment as it runs, typed: its file's fields on the real device with the technique's blocks
    spelled out, the technique, its name, which pretrained base it fine-tunes and its hash; once a run of it
    starts, that run's id. It goes so from the experiment file to the worker; between processes and in every
    record it is its dict form (`as_dict`), which `from_dict` reads back."""
    name: str
    experiment: Experiment
    technique: Technique
    config_hash: str
    base_checkpoint: str | None = None
    run_id: str | None = None  # the attempt's id (harness.lab.runner), which its record carries

    def as_dict(self) -> dict:
        return {**_hashed_fields(self.name, self.experiment, self.base_checkpoint), "config_hash": self.config_hash,
                **({"run_id": self.run_id} if self.run_id is not None else {})}

    @classmethod
    def from_dict(cls, config: dict) -> ResolvedConfig:
        experiment = experiment_of(config)
        return cls(config["name"], experiment, resolve_technique(experiment), config["config_hash"],
                   config.get("base_checkpoint"), config.get("run_id"))

    def run(self, run_id: str) -> ResolvedConfig:
        """The same configuration as one attempt's."""
        return dataclasses.replace(self, run_id=run_id)

def resolve(path: str | Path, overrides: dict | None = None) -> ResolvedConfig:
    """Validate an experiment file and resolve it: its technique's blocks, the real device (the hash names
    it) and, fine-tuning the lab's base, which pretrained base (a retrained one is a new configuration)."""
    name, experiment = load_experiment(path, overrides)
    technique = resolve_technique(experiment)
    blocks = {k: v for k, v in dataclasses.asdict(technique).items() if k != "summary"}
    experiment = dataclasses.replace(experiment, device=resolve_device(experiment.device), **blocks)
    base = (base_identity(experiment.device) or "not pretrained yet") if experiment.model == BASE_SOURCE else None
    return ResolvedConfig(name, experiment, technique, config_hash(_hashed_fields(name, experiment, base)), base)


def _hashed_fields(name: str, experiment: Experiment, base_checkpoint: str | None) -> dict:
    """A resolved config's dict form before its hash, which is computed from it."""
    config = resolved_config(name, experiment)
    return config if base_checkpoint is None else {**config, "base_checkpoint": base_checkpoint}


def prepare(path: str | Path, overrides: dict | None = None) -> dict:
    """Validate an experiment file and return its resolved config's dict form, with its hash (ConfigError if
    bad)."""
    return resolve(path, overrides).as_dict()


def config_hash(config: dict) -> str:
    """Content hash of what determines the measurement (the description and name do not)."""
    relevant = {k: v for k, v in schema.canonical_config(config).items()
                if k not in ("description", "name", "summary")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def experiment_files(folder: str | Path) -> list[Path]:
    """Experiment files in a folder: every *.yaml but include fragments (leading '_') and the matrix."""
    return sorted(p for p in Path(folder).glob("*.yaml")
                  if not p.name.startswith(FRAGMENT_PREFIX) and p.name != MATRIX_FILE)
