"""Model sources and model building for a technique.

A source is one of:
- a preset name (harness.presets): the exact shape of a known model, random weights;
- a path to a config.json: that shape, random weights;
- a local model folder or a hub id: the real weights (a hub id needs a network).

Random-weight models are built on the meta device and materialised module by module on
the target device, so nothing goes through a checkpoint on disk. For a quantized base
every linear layer is initialised in the compute dtype and handed to bitsandbytes at once,
so at most one layer ever exists in 16 bits and a 7B QLoRA model never does.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from harness.architectures import attention_implementation
from harness.blocks.adapters import ADAPTERS
from harness.blocks.quantizations import QUANTIZATIONS
from harness.errors import ConfigError
from harness.model_files import read_model_config
from harness.presets import PRESETS, preset_config
from harness.step.checkpoint import BASE_SOURCE, resolve_base
from harness.techniques import Technique

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HUB_PROBE_TIMEOUT_S = 3


@dataclass
class ModelSource:
    name: str        # what the user gave
    kind: str        # preset | config | pretrained
    config: object   # a transformers PretrainedConfig
    # The model's own code may run (a real run of an experiment with trust_remote_code): resolve_source's run_code.
    runs_code: bool = False

    @property
    def random_init(self) -> bool:
        return self.kind != "pretrained"


def resolve_source(source: str, trust_remote_code: bool = False, device_type: str = "cpu", *,
                   run_code: bool = False) -> ModelSource:
    """A model source's config. Only a real run passes `run_code` (with the experiment's
    trust_remote_code): everywhere else (validate, predict, a dry run's estimates) a model folder's
    own code never runs and the hub is read from the local cache alone, never the network."""
    from transformers import AutoConfig

    if source == BASE_SOURCE:  # the lab's own pretrained base for this device class
        folder = resolve_base(device_type)
        return ModelSource(str(folder), "pretrained", AutoConfig.from_pretrained(folder))
    if source in PRESETS:
        return ModelSource(source, "preset", _without_dropout(preset_config(source)))
    path = Path(source).expanduser()
    if source.endswith(".json") or source.startswith((".", "/", "~")):
        if not path.exists():
            raise FileNotFoundError(f"model source {source}: no such file or folder")
    if path.is_file() and path.suffix == ".json":
        settings = read_model_config(path, source)
        model_type = settings.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **settings)
        except (ValueError, TypeError) as error:
            raise ConfigError(source, "model", f"transformers cannot build its config: {error}") from None
        _check_shape(config, source)
        return ModelSource(source, "config", _without_dropout(config))
    if path.exists() and not path.is_dir():
        raise ConfigError(source, "model", "is neither a config.json nor a model folder")
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ValueError(f"{path}: a model folder needs weights (*.safetensors); "
                         "for a shape only, give the path of its config.json")
    trust = trust_remote_code and run_code
    if path.is_dir():
        read_model_config(path / "config.json", source)
        config = _code_refused(lambda: AutoConfig.from_pretrained(source, trust_remote_code=trust), source, run_code)
    else:
        config = _code_refused(lambda: _hub_config(source, trust, offline=not run_code), source, run_code)
    _check_shape(config, source)
    return ModelSource(source, "pretrained", config, runs_code=trust)


def _code_refused(load, source: str, run_code: bool):
    """transformers' config, where the model's own configuration code (auto_map) is refused outside a run,
    or where the experiment did not set trust_remote_code: one sentence, not transformers' traceback."""
    from huggingface_hub.errors import HFValidationError

    try:
        return load()
    except HFValidationError as error:
        raise ConfigError(source, "model", f"no preset, file or folder, and not a hub id: {error}") from None
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        where = ("set trust_remote_code: true to run it" if run_code else
                 "it runs only in a real run of an experiment with trust_remote_code: true, never in "
                 "validate, predict or a dry run")
        raise ConfigError(source, "model", f"its configuration is the model's own code (auto_map); {where}") from None


def _without_dropout(config):
    """A random-init model trains without the model's own dropout, as the Llama-style families
    do by default (GPT-2's config says 0.1 for resid_pdrop, embd_pdrop and attn_pdrop): its masks
    would be saved tensors that neither the shape nor the technique decides, and random weights
    learn nothing that dropout would regularise. Pretrained models keep their config's dropout.
    LoRA's own dropout (lora.dropout) is the experiment's and unaffected."""
    for name, value in config.to_dict().items():
        if name.endswith(("dropout", "pdrop")) and type(value) in (int, float) and value > 0:
            setattr(config, name, 0.0)
    return config


# The sizes a shape must have, where a config names them: a zero or negative one is a mistake.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads")


def _check_shape(config, source: str) -> None:
    for name in SHAPE_FIELDS:
        value = getattr(config, name, None)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(source, name, f"must be a positive integer in the model's config (got {value!r})")


def _hub_config(source: str, trust_remote_code: bool, offline: bool = False):
    """A hub id's config: from the hub where it can be reached (never when `offline`), else from the
    local cache, else one sentence at once (transformers would retry for half a minute first)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from transformers import AutoConfig

    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    where = "from here"
    if offline:
        where = "outside a run (validate, predict and a dry run stay offline)"
    elif not constants.HF_HUB_OFFLINE:
        try:
            socket.create_connection((host, 443), timeout=HUB_PROBE_TIMEOUT_S).close()
            return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except OSError:
            pass
    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
    raise ConfigError(source, "model", f"no preset, file or folder is named {source!r}, and as a hub id it "
                      f"cannot be looked up: {host} cannot be reached {where} and the local hub cache "
                      "does not hold it (give a preset, a config.json or a local model folder)")


class SequentialExperts(nn.Module):
    """Mixtral-style experts as one gate/up/down nn.Linear triple per expert.

    transformers stores MoE experts as fused 3-D parameters, which bitsandbytes cannot
    quantize; Mixtral QLoRA as people run it quantizes every expert's linear layers.
    Same computation as the fused module's eager forward, one expert at a time.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn):
        super().__init__()
        self.num_experts = num_experts
        self.act_fn = act_fn
        # Named like a dense MLP's layers so that LoRA's target names match them too.
        self.mlps = nn.ModuleList(nn.ModuleDict({
            "gate_proj": nn.Linear(hidden, intermediate, bias=False),
            "up_proj": nn.Linear(hidden, intermediate, bias=False),
            "down_proj": nn.Linear(intermediate, hidden, bias=False)}) for _ in range(num_experts))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if is_fake(hidden_states):
            return self._balanced_forward(hidden_states, top_k_weights)
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit[:, 0].tolist():
            top_k_pos, token_idx = torch.where(mask[expert])
            state, mlp = hidden_states[token_idx], self.mlps[expert]
            out = self.act_fn(mlp["gate_proj"](state)) * mlp["up_proj"](state)
            out = mlp["down_proj"](out) * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def _balanced_forward(self, hidden_states, top_k_weights):
        """Fake tensors (a simulation) have no values to route by: assume balanced routing.

        Every expert gets tokens * top_k / num_experts tokens, the expected load that
        load-balanced training aims for; the shapes, and so the memory, follow from that.
        """
        tokens, top_k = top_k_weights.shape
        per_expert = -(-tokens * top_k // self.num_experts)
        final = torch.zeros_like(hidden_states)
        token_idx = torch.arange(per_expert, device=hidden_states.device) % tokens
        for expert in range(self.num_experts):
            state, mlp = hidden_states[token_idx], self.mlps[expert]
            out = self.act_fn(mlp["gate_proj"](state)) * mlp["up_proj"](state)
            out = mlp["down_proj"](out) * top_k_weights[token_idx, 0, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def _unfuse_experts(model: nn.Module) -> int:
    """Replace fused 3-D expert parameters (on meta) by per-expert linear layers."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("Experts") and hasattr(module, "gate_up_proj"):
            num, two_inter, hidden = module.gate_up_proj.shape
            with torch.device("meta"):
                new = SequentialExperts(num, hidden, two_inter // 2, module.act_fn).to(module.gate_up_proj.dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
            replaced += 1
    return replaced


def _bnb_config(technique: Technique):
    quantization = QUANTIZATIONS[technique.quantization]
    return quantization.bnb_config(technique, DTYPES[technique.weights]) if quantization is not None else None


def _quantize_linear(module, quantization, device: torch.device, dtype: torch.dtype, std: float) -> None:
    """Initialise one bitsandbytes linear layer in `dtype` and let its quantization quantize it."""
    weight = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device).normal_(0.0, std)
    quantization.quantize(module, weight, device, fake=is_fake(weight))
    if module.bias is not None:
        module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=device))


def quantized_layers() -> dict[type, object]:
    """bitsandbytes' linear layer of each quantization, with its descriptor; none where nothing has imported
    bitsandbytes (then no model has one), which spares a full fine-tune its import (seconds: it compiles kernels)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return {}
    return {getattr(bnb.nn, q.layer): q for q in QUANTIZATIONS.values() if q is not None}


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Give every meta tensor real storage on `device`, one module at a time."""
    torch.manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    quantized = quantized_layers()
    for module in model.modules():
        quantization = next((q for layer, q in quantized.items() if isinstance(module, layer)), None)
        if quantization is not None:
            _quantize_linear(module, quantization, device, dtype, std)
            continue
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not any(t.is_meta for t in own):
            continue
        module.to_empty(device=device, recurse=False)
        for param in module.parameters(recurse=False):
            param._is_hf_initialized = False  # initialise what to_empty left uninitialised
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            model._init_weights(module)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after materialisation: {left[:5]}")


def build_base_model(source: ModelSource, technique: Technique, device: torch.device, seed: int,
                     attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                     materialize: bool = True) -> nn.Module:
    """The model in the technique's dtype and quantization, before adapters.

    materialize=False leaves a random-init model on the meta device (a sharded model is materialised
    after sharding: `materialize_model`)."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[technique.weights]
    trust_remote_code = trust_remote_code and source.runs_code  # never in predict or a simulation
    attn_implementation = attention_implementation(source.config, attn_implementation)
    if technique.quantization != "none":
        import bitsandbytes  # noqa: F401  (missing: the run is skipped, saying so)
    quant_config = _bnb_config(technique)
    if source.kind == "pretrained":
        return AutoModelForCausalLM.from_pretrained(
            source.name, dtype=dtype, quantization_config=quant_config, device_map={"": device},
            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    # The skeleton holds plain meta tensors even inside a simulation's fake mode, so that
    # bitsandbytes' parameter classes can wrap them.
    with unset_fake_temporarily(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(source.config, dtype=dtype,
                                                 attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    # One expert at a time, for every technique: quantizable, LoRA-targetable, and traceable
    # with fake tensors; the parameter bytes are those of the fused layout.
    with unset_fake_temporarily():
        _unfuse_experts(model)
    if quant_config is not None:
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear

        with unset_fake_temporarily():
            model = replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"],
                                            quantization_config=quant_config)
    if materialize:
        materialize_model(model, device, dtype, seed)
    return model


def materialize_model(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Random weights for a model on the meta device, one module at a time, ties restored."""
    _materialize(model, device, dtype, seed)
    if getattr(model.config, "tie_word_embeddings", False):
        # Materialising module by module gave lm_head its own matrix: share the embeddings'
        # again, as a checkpoint of this model loads them (one matrix, one gradient, one state).
        model.tie_weights()


def prepare_for_training(model: nn.Module, technique: Technique, lora, gradient_checkpointing: bool,
                         selective_checkpointing: bool = False, liger_kernels: bool = False) -> nn.Module:
    """Freeze and wrap for the technique: k-bit preparation, checkpointing (all of a layer recomputed,
    or all but attention: TRL's selective policy), adapters (peft), kernels (Liger, as Trainer does)."""
    model.config.use_cache = False
    if technique.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # peft's standard recipe: freeze the base, keep norms and embeddings in fp32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if selective_checkpointing:
        from trl.models.selective_activation_checkpointing import enable_selective_activation_checkpointing

        enable_selective_activation_checkpointing(model)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen base without input-grad hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter = ADAPTERS[technique.adapter]
    if adapter is not None:
        model = adapter.wrap(model, lora)
    if liger_kernels:
        apply_liger(model)
    return model


def apply_liger(model: nn.Module) -> None:
    """What Trainer's use_liger_kernel runs, on the same (peft-wrapped) model. The simulation swaps in
    harness.predict.liger's stand-ins here (Liger's Triton kernels do not run on fake tensors)."""
    import liger_kernel  # noqa: F401  (missing: the run is skipped, saying so)
    from transformers.integrations.liger import apply_liger_kernel

    apply_liger_kernel(model, {})


def parameter_counts(model: nn.Module) -> dict:
    """Total parameters counted as the unquantized model has them (packed 4-bit counts double)."""
    total = trainable = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 keeps a partitioned one empty
        if getattr(param, "quant_state", None) is not None:
            count *= 2  # two 4-bit values per stored byte
        total += count
        if param.requires_grad:
            trainable += count
    return {"total": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / max(total, 1)}
