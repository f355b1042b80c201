"""Analytic memory: bytes per category of one training step, from the model's shape alone.

No model is built: parameter counts come from the config, bytes per parameter from the
technique, and activations from a walk through one decoder layer that follows the dtype
of every tensor the runner's code path saves for backward. Each rule below names the code
that makes it true (transformers' decoder layers of the families harness.architectures
describes: Llama, Mistral, Mixtral, Qwen2/3, Gemma/Gemma 2/Gemma 3, Phi-3, GPT-2, GPT-NeoX;
peft's LoRA linear, bitsandbytes' 4-bit and 8-bit matmuls, torch autocast), so where the
simulation (harness.predict.simulate) disagrees, the rule that is off can be found.

Notation: T tokens per micro-batch (batch x sequence), s sequence length, h hidden size, i MLP
size, V vocabulary, E experts, k experts per token. Bytes: fp32 4, bf16/fp16 2, int8 1, NF4 0.5.

The model's own dropout is taken to be off (the lab sets it to 0 in the random-init models it
builds, harness.step.models; a pretrained GPT-2 keeps its config's 0.1, whose masks are not
counted here). Autocast is the device's: on the CUDA path CUDA autocast's, which runs layer_norm
and pow (GPT-2's GELU) in fp32 where CPU autocast keeps 16 bits (_layer_norm_in_fp32, _activation;
the simulation casts the same ops, harness.predict.simulate._cuda_autocast).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from harness.architectures import ARCHITECTURES, Architecture, architecture_of, lora_targets
from harness.blocks.adapters import ADAPTERS
from harness.blocks.optimizers import OPTIMIZERS
from harness.blocks.quantizations import INT8_THRESHOLD, QUANTIZATIONS
from harness.predict import outliers
from harness.schema import CATEGORIES, PERSISTENT

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# transformers' activations (ACT2FN) written in Python: the intermediate-sized tensors their ops
# save (traced). Any other, one torch op, saves one: its input (GELU, SiLU) or its output (ReLU).
ACTIVATION_SAVED = {"gelu_new": 4, "gelu_fast": 7, "gelu_python": 3, "gelu_python_tanh": 4, "gelu_accurate": 4,
                    "quick_gelu": 2}
# Those of them whose Python code calls torch.pow (transformers/activations.py: NewGELUActivation, GELUTanh's
# Python form, AccurateGELUActivation), which CUDA autocast runs in fp32 (harness.predict.simulate._cuda_autocast).
ACTIVATION_POW = frozenset(("gelu_new", "gelu_python_tanh", "gelu_accurate"))
ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int = 0          # 0: a dense MLP
    experts_per_token: int = 0
    tied_embeddings: bool = False
    model_type: str = "llama"  # its family (harness.architectures)
    positions: int = 0        # rows of a learned position embedding (GPT-2's wpe); 0: rotary
    biased: frozenset = frozenset()  # roles of the linear layers with a bias (family.linear_bias)
    activation_saved: int = 1  # intermediate-sized tensors the MLP's activation saves (ACTIVATION_SAVED)
    activation_pow: bool = False  # the activation calls torch.pow (ACTIVATION_POW)
    parallel_residual: bool = False  # attention and MLP read the same input (NeoX's use_parallel_residual)
    attn_softcap: bool = False   # tanh soft-capping of the attention scores (Gemma 2)
    final_softcap: bool = False  # tanh soft-capping of the logits (Gemma 2)
    activation: str = "silu"  # the MLP's activation, by transformers' name (the config's)
    init_std: float = 0.02    # the spread of the weights the lab draws when nothing is downloaded (initializer_range)
    sliding_window: int = 0   # the keys a sliding-window layer attends to (the config's sliding_window); 0: none
    sliding_layers: int = 0   # decoder layers with that window, in a family whose attention is SDPA

    @property
    def family(self) -> Architecture:
        return ARCHITECTURES[self.model_type]

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def masked_layers(self, seq_len: int) -> int:
        """Decoder layers whose SDPA call gets an explicit mask at this length: transformers builds a
        sliding-window mask once the keys reach the window, where SDPA's is_causal no longer says it
        (masking_utils._ignore_causal_mask_sdpa); below the window the mask is None."""
        return self.sliding_layers if self.sliding_window and seq_len >= self.sliding_window else 0

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """(in, out, count in the whole model) of every decoder linear layer, by role (q, k, v or
        qkv, o, gate and up or gate_up or up alone, down; its name is family.name(role))."""
        h, i, n = self.hidden, self.intermediate, self.layers
        mlp_count = n * max(self.experts, 1)
        widths = {"q": (h, self.q_dim), "k": (h, self.kv_dim), "v": (h, self.kv_dim),
                  "qkv": (h, self.q_dim + 2 * self.kv_dim), "o": (self.q_dim, h),
                  "gate": (h, i), "up": (h, i), "gate_up": (h, 2 * i), "down": (i, h)}
        return {role: (*widths[role], n if role in ATTENTION_ROLES else mlp_count) for role in self.family.roles()}

    def named_linears(self) -> list[tuple[str, int, int, int]]:
        """(name, in, out, count) of every decoder linear layer: what LoRA's targets name."""
        return [(self.family.name(role), *sizes) for role, sizes in self.linears().items()]

    def small_tensors(self) -> list[int]:
        """Element counts of the norms' weights (and LayerNorm's biases), the linear layers'
        biases and per-head q/k norms."""
        family = self.family
        norms = (4 if family.sandwich_norms else 2) * self.layers + 1
        sizes = [self.hidden] * (norms * (2 if family.layer_norm else 1))
        if family.qk_norm:
            sizes += [self.head_dim] * (2 * self.layers)
        if family.qkv_bias:
            sizes += [self.q_dim, self.kv_dim, self.kv_dim] * self.layers
        sizes += [n_out for role, (_, n_out, count) in self.linears().items() if role in self.biased
                  for _ in range(count)]
        return sizes

    def parameters(self) -> dict[str, int]:
        """Parameter counts by group: decoder linears (quantizable), embeddings (with learned
        positions), norms and biases, router."""
        linear = sum(n_in * n_out * count for n_in, n_out, count in self.linears().values())
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.positions * self.hidden
        norms = sum(self.small_tensors())
        router = self.layers * self.hidden * self.experts if self.experts else 0
        return {"linear": linear, "embeddings": embeddings, "norms": norms, "router": router,
                "total": linear + embeddings + norms + router}


def shape_of(config) -> Shape:
    """The shape of a transformers config of a family harness.architectures describes (GPT-2's
    n_embd, n_layer, n_head and n_positions are read through its config's own aliases)."""
    family = architecture_of(config)  # an unknown family is one sentence, here
    heads, hidden = config.num_attention_heads, config.hidden_size
    # GPT-2: n_inner, None for 4h; the others: intermediate_size
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    activation = next((a for a in (getattr(config, name, None) for name in
                                   ("hidden_activation", "hidden_act", "activation_function")) if a), None)
    biased = frozenset(family.roles()) if family.linear_bias else frozenset()
    # Sliding-window layers: every layer where the config names a window and no layer types (Mistral), else
    # those layer_types calls sliding (Qwen2 with use_sliding_window leaves sliding_window None without it).
    # Eager attention (Gemma 2) is costed with its scores, mask or not.
    window = getattr(config, "sliding_window", None) or 0
    layer_types = getattr(config, "layer_types", None)
    sliding_layers = 0 if not window or family.eager_attention else (
        sum(kind == "sliding_attention" for kind in layer_types) if layer_types else config.num_hidden_layers)
    if not getattr(config, "attention_bias", True):  # NeoX: attention_bias false leaves the MLP's biases
        biased -= frozenset(ATTENTION_ROLES)
    return Shape(vocab=config.vocab_size, hidden=hidden, intermediate=intermediate,
                 layers=config.num_hidden_layers, heads=heads,
                 kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                 head_dim=getattr(config, "head_dim", None) or hidden // heads,
                 experts=getattr(config, "num_local_experts", 0) or 0,
                 experts_per_token=getattr(config, "num_experts_per_tok", 0) or 0,
                 tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)), model_type=config.model_type,
                 positions=config.max_position_embeddings if family.learned_positions else 0, biased=biased,
                 activation_saved=ACTIVATION_SAVED.get(activation, 1), activation_pow=activation in ACTIVATION_POW,
                 parallel_residual=family.parallel_residual and bool(getattr(config, "use_parallel_residual", True)),
                 attn_softcap=family.logit_softcapping and getattr(config, "attn_logit_softcapping", None) is not None,
                 final_softcap=family.logit_softcapping and getattr(config, "final_logit_softcapping", None) is not None,
                 activation=activation or "silu", init_std=getattr(config, "initializer_range", 0.02),
                 sliding_window=window, sliding_layers=sliding_layers)


def adapter_tensors(shape: Shape, technique, lora) -> list[int]:
    """Element counts of the adapter's trainable tensors in every adapted linear layer, as the
    adapter registry (harness.blocks.adapters.ADAPTERS) defines them."""
    adapter = ADAPTERS[technique.adapter]
    targets = _lora_targets(shape, lora)
    return [n for name, n_in, n_out, count in shape.named_linears() if name in targets
            for _ in range(count) for n in adapter.trainable_tensors(n_in, n_out, lora)]


def _lora_targets(shape: Shape, lora) -> set[str]:
    """The layer names LoRA adapts: every linear layer of the family unless the experiment names some."""
    return set(lora_targets(shape, lora.target_modules)[0])


# -- persistent state -----------------------------------------------------------------

def weight_bytes(shape: Shape, technique, lora) -> tuple[int, int]:
    """(weights, quantization constants) in bytes."""
    params = shape.parameters()
    if technique.adapter == "none":
        return params["total"] * BYTES[technique.weights], 0
    adapters = 4 * sum(adapter_tensors(shape, technique, lora))  # peft keeps adapters in fp32
    rest = params["total"] - params["linear"]
    quantization = QUANTIZATIONS[technique.quantization]
    if quantization is None:
        return params["linear"] * BYTES[technique.weights] + rest * BYTES[technique.weights] + adapters, 0
    # peft's prepare_model_for_kbit_training casts every parameter that is not quantized
    # (embeddings, norms, lm_head, router, biases) to fp32. bitsandbytes' Linear4bit then casts
    # its own bias to the compute dtype in its first forward, for good (GPT-2's and NeoX's biases;
    # Linear8bitLt casts its bias to its input's dtype, fp32 but for o's 16-bit input: left out).
    rest_bytes = rest * 4
    if quantization.casts_bias:
        biases = sum(n_out * count for role, (_, n_out, count) in shape.linears().items() if role in shape.biased)
        rest_bytes -= (4 - BYTES[technique.weights]) * biases
    quantized, constants = quantization.storage(list(shape.linears().values()), technique.double_quant)
    return quantized + rest_bytes + adapters, constants


def trainable_tensors(shape: Shape, technique, lora) -> list[int]:
    """Element counts of the trainable tensors (what gradients and optimizer state cover)."""
    if technique.adapter != "none":
        return adapter_tensors(shape, technique, lora)
    sizes = [n_in * n_out for n_in, n_out, count in shape.linears().values() for _ in range(count)]
    sizes += [shape.vocab * shape.hidden] * (1 if shape.tied_embeddings else 2)
    sizes += [shape.positions * shape.hidden] if shape.positions else []
    sizes += shape.small_tensors()
    sizes += [shape.hidden * shape.experts] * (shape.layers if shape.experts else 0)
    return sizes


def trainable_dtype_bytes(technique) -> int:
    """Adapters are fp32 (peft upcasts them); full fine-tuning trains the weights' dtype."""
    return 4 if technique.adapter != "none" else BYTES[technique.weights]


# -- activations ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Flow:
    """The dtypes of a technique's forward pass, as bytes per element."""
    residual: int     # the residual stream (fp32 when the embeddings are fp32)
    autocast: bool    # torch.autocast to a 16-bit dtype
    weights: int      # dtype of the unquantized linear weights
    quantized: bool   # a bitsandbytes base (harness.blocks.quantizations)
    saves_input: bool  # its linear layers keep their input for backward (else only their packed weight)
    lora: bool
    dora: bool        # LoRA's weight-decomposed variant (peft use_dora)
    dropout: bool
    rank: int
    mask_bytes: int   # dropout's saved mask: bool on CUDA (native_dropout), the fp32 noise on CPU
    full: bool        # full fine-tuning: weight gradients are needed
    cuda: bool        # the CUDA code path (kernels whose saved tensors differ from the CPU's)
    liger: bool = False  # Liger's kernels (RMSNorm, SwiGLU, fused linear cross-entropy)
    random_weights: bool = False  # the lab's random init, not trained weights (LLM.int8's outlier columns)


def _flow(technique, lora, device_type: str, liger: bool = False, random_weights: bool = False) -> _Flow:
    weights = BYTES[technique.weights]
    quantization = QUANTIZATIONS[technique.quantization]
    kbit = quantization is not None
    saves_input = kbit and quantization.saves_input
    return _Flow(residual=4 if (kbit or weights == 4) else weights, autocast=technique.autocast != "none",
                 weights=weights, quantized=kbit, saves_input=saves_input, lora=technique.adapter != "none",
                 dora=technique.adapter != "none" and getattr(lora, "use_dora", False),
                 dropout=lora.dropout > 0, rank=lora.r, mask_bytes=1 if device_type == "cuda" else 4,
                 full=technique.adapter == "none", cuda=device_type == "cuda", liger=liger,
                 random_weights=random_weights)


def _linear(flow: _Flow, x_bytes: int, tokens: int, n_in: int, n_out: int, adapted: bool,
            quantized: bool) -> tuple[int, int, bool]:
    """(output bytes per element, bytes saved for backward besides the input, input saved?)

    The input is reported separately because several layers often read one tensor (q, k
    and v read the same normalised input): its storage counts once.
    """
    saved, input_saved = 0, False
    if quantized and not flow.saves_input:
        # bitsandbytes MatMul4Bit saves only the packed weight; Linear4bit casts the input to
        # the compute dtype (a temporary) and its output back to the input's dtype.
        out = x_bytes
    elif quantized:
        # LLM.int8 keeps the input A for backward. On CUDA (MatMul8bitLt) its int8 kernel returns
        # the input's dtype and has no autocast rule; on CPU it dequantizes and calls F.linear,
        # which autocast makes 16-bit.
        out, input_saved = (2 if flow.autocast and not flow.cuda else x_bytes), True
    elif flow.autocast:
        # autocast runs the matmul in 16 bits. Backward needs the (16-bit copy of the) input
        # only for a weight gradient, and a 16-bit copy of an fp32 weight for the input's.
        out = 2
        if flow.full:
            if x_bytes == 2:
                input_saved = True
            else:
                saved += 2 * tokens * n_in
        if flow.weights != 2:
            saved += 2 * n_in * n_out
    else:
        # A frozen weight needs no input for backward; a trained one does.
        out, input_saved = flow.weights, flow.full
    if adapted and flow.lora:
        # peft: x.to(fp32) -> dropout -> lora_A -> lora_B. Dropout saves its mask; lora_A saves
        # its (autocast: 16-bit copy of the) input; lora_B saves lora_A's r-wide output. The layer's
        # own input is what lora_A saves only where nothing copied it: an fp32 input without autocast
        # (under autocast a 16-bit input went to fp32 and back, a copy of each layer's own).
        lora_in = 2 if flow.autocast else 4
        saved += lora_in * tokens * flow.rank
        if flow.dropout:
            saved += flow.mask_bytes * tokens * n_in + lora_in * tokens * n_in
        elif lora_in != x_bytes or flow.autocast:
            saved += lora_in * tokens * n_in
        else:
            input_saved = True
        if flow.dora:
            saved += _dora_saved(flow, out, tokens, n_in, n_out, lora_in)
    return out, saved, input_saved


def _dora_saved(flow: _Flow, base_out: int, tokens: int, n_in: int, n_out: int, lora_out: int) -> int:
    """peft's DoRA (DoraLinearVariant, DoraLinearLayer.forward): the magnitude over the weight's
    norm scales the base output and the LoRA output, and the products save both (T x out).
    With dropout the base output is computed again on the dropped fp32 input, against the
    weight dequantized and cast to fp32: that product saves the weight (autocast: its 16-bit copy)
    for the input's gradient, and not the input, the weight needing none."""
    saved = tokens * n_out * (base_out + lora_out)
    if flow.dropout:
        saved += (2 if flow.autocast else 4) * n_out * n_in
    return saved


def _dora_transient(shape: Shape, targets: set[str]) -> int:
    """DoRA's forward builds each adapted layer's full weight to take its norm: the LoRA
    product through an identity matrix (in x in), the fp32 weight and the sum (out x in each)."""
    return max((4 * n_in * (n_in + 3 * n_out) for name, n_in, n_out, _ in shape.named_linears()
                if name in targets), default=0)


def _rms_norm(flow: _Flow, tokens: int, hidden: int, family: Architecture, groups: int = 1) -> int:
    """transformers' RMSNorm saves its input in fp32 (a copy unless fp32 already) and the scale
    (rsqrt) per token and group (a head, for q/k norms); the normalised tensor only where the
    norm's weight is trained (fp32 where the family scales in fp32)."""
    if flow.liger:  # LigerRMSNorm saves its input as it is and the scale per row, no more
        return flow.residual * tokens * hidden + 4 * tokens * groups
    normalised = 4 if family.fp32_norm_scale else flow.residual
    return 4 * tokens * hidden + 4 * tokens * groups + (normalised * tokens * hidden if flow.full else 0)


def _layer_norm_stats(flow: _Flow, tokens: int) -> int:
    """torch's layer_norm saves its input (counted by the caller: several norms may read one),
    and a mean and a reciprocal deviation per token: fp32 on CUDA, the input's dtype in the CPU
    kernel. Weight and bias gradients need nothing more (no normalised copy is kept)."""
    return 2 * (4 if flow.cuda else flow.residual) * tokens


def _layer_norm_in_fp32(flow: _Flow, family: Architecture) -> bool:
    """CUDA autocast runs layer_norm in fp32 (ATen's autocast_mode.h, AT_FORALL_FP32): a 16-bit input is cast
    to an fp32 copy, which the norm saves, and its output is fp32. CPU autocast leaves it in the input's dtype."""
    return family.layer_norm and flow.cuda and flow.autocast


def _norm_output(flow: _Flow, family: Architecture) -> int:
    """Bytes per element of a pre-norm's output, the input of the linear layers after it: the residual's dtype
    (RMSNorm casts back to it), fp32 for LayerNorm under CUDA autocast."""
    return 4 if _layer_norm_in_fp32(flow, family) else flow.residual


def _norms(flow: _Flow, tokens: int, hidden: int, family: Architecture, count: int, inputs: int) -> int:
    """`count` norms over the hidden size that read `inputs` distinct tensors (NeoX's parallel
    residual: two norms, one input): LayerNorm saves that input itself (under CUDA autocast each norm
    its own fp32 copy of a 16-bit input), RMSNorm an fp32 copy of its own (harness.architectures has no
    RMSNorm family with a parallel residual)."""
    if family.layer_norm:
        copied = _layer_norm_in_fp32(flow, family) and flow.residual != 4
        return count * _layer_norm_stats(flow, tokens) + (count if copied else inputs) * (
            4 if copied else flow.residual) * tokens * hidden
    return count * _rms_norm(flow, tokens, hidden, family)


def _activation(flow: _Flow, shape: Shape, g_out: int) -> tuple[int, int]:
    """(bytes the MLP's activation saves per intermediate element, bytes per element of its output). Under
    CUDA autocast a GELU written with torch.pow computes in fp32 from pow on: pow saves an fp32 copy of its
    16-bit input, the tanh and 1 + tanh are fp32, x/2 stays 16-bit, and the output is fp32."""
    if shape.activation_pow and flow.cuda and flow.autocast and g_out != 4:
        return 4 + 4 + 4 + g_out, 4
    return shape.activation_saved * g_out, g_out


def _mlp(flow: _Flow, tokens: int, shape: Shape, x_bytes: int, targets: set[str], quantized: bool) -> tuple[int, bool]:
    """The MLP: gated, down(act(gate(x)) * up(x)) with gate and up as two layers or one fused
    (its output split in halves), or ungated, down(act(up(x))) (GPT-2's c_fc and c_proj, NeoX's
    dense_h_to_4h and dense_4h_to_h); returns (bytes saved, input saved?)."""
    family, hidden, inter = shape.family, shape.hidden, shape.intermediate
    roles = ((("gate_up", 2 * inter),) if family.fused_gate_up else (("gate", inter), ("up", inter))
             if family.gated_mlp else (("up", inter),))
    saved, input_saved = 0, False
    for role, width in roles:
        g_out, extra, uses_input = _linear(flow, x_bytes, tokens, hidden, width, family.name(role) in targets,
                                           quantized)
        saved += extra
        input_saved |= uses_input
    # The activation saves its input (SiLU, GELU: one torch op) or more (a Python GELU: GPT-2's
    # gelu_new keeps its input, the tanh, x/2 and 1 + tanh; ACTIVATION_SAVED; _activation). A gate's
    # product saves the activation's output and up's output (halves of one tensor where fused: the same
    # bytes). Liger's SwiGLU saves the gate's and up's outputs only and recomputes the activation in backward.
    act_saved, act_out = _activation(flow, shape, g_out)
    if flow.liger and family.gated_mlp:
        saved += 2 * g_out * tokens * inter
    else:
        saved += (act_saved + (act_out + g_out if family.gated_mlp else 0)) * tokens * inter
    _, d_saved, d_in = _linear(flow, act_out, tokens, inter, hidden, family.name("down") in targets, quantized)
    saved += d_saved + (act_out * tokens * inter if d_in else 0)  # down's input: act(g) * u, or act(u)
    return saved, input_saved


def recompute_held_bytes(flow: _Flow, shape: Shape, tokens: int, targets: set[str]) -> int:
    """What a recomputed layer holds beside its saved tensors at its widest moment, the forward of its last
    linear (down; GPT-2's c_proj), where every other tensor the layer saves exists already: the gradient of
    the layer's output (handed down by the layer above, waiting for this layer's backward), the MLP's input
    (its argument until the MLP returns) and down's input where nothing saves them, down's output, and for
    an adapted down peft's own copies, its input cast to fp32 (x.to(lora_A.weight.dtype), a copy unless fp32)
    and dropout's fp32 output, alive until lora_A has read them (peft LoRA Linear.forward). Traced: a 3B
    LoRA step with Liger's kernels peaks there, its logits gone. Mixture-of-experts layers are left out."""
    if shape.experts:
        return 0
    family, hidden, inter, r = shape.family, shape.hidden, shape.intermediate, flow.residual
    quantized = flow.quantized
    roles = ((("gate_up", 2 * inter),) if family.fused_gate_up else (("gate", inter), ("up", inter))
             if family.gated_mlp else (("up", inter),))
    normalised = _norm_output(flow, family)
    g_out, mlp_in = 0, False
    for role, width in roles:
        g_out, _, uses_input = _linear(flow, normalised, tokens, hidden, width, family.name(role) in targets,
                                       quantized)
        mlp_in |= uses_input
    act_out = _activation(flow, shape, g_out)[1]
    adapted = family.name("down") in targets
    d_out, _, d_in = _linear(flow, act_out, tokens, inter, hidden, adapted, quantized)
    held = r * tokens * hidden + (0 if mlp_in else normalised * tokens * hidden) + (
        0 if d_in else act_out * tokens * inter)
    held += d_out * tokens * hidden
    if adapted and flow.lora:
        held += (0 if act_out == 4 else 4 * tokens * inter) + (4 * tokens * inter if flow.dropout else 0)
    return held


def _int8_input_bytes(flow: _Flow, shape: Shape, tokens: int) -> dict[str, int]:
    """Bytes per element of what an LLM.int8 base's linears read, by kind (harness.predict.outliers): the
    normalised input, attention's output and the MLP's product."""
    normalised = _norm_output(flow, shape.family)
    out, _, _ = _linear(flow, normalised, tokens, shape.hidden, shape.intermediate, False, True)
    attn_out = 2 if flow.autocast else max(out, flow.residual)
    return {outliers.NORMALISED: normalised, outliers.ATTENTION: attn_out,
            outliers.MLP_PRODUCT: _activation(flow, shape, out)[1]}


def int8_inputs_held(flow: _Flow, shape: Shape, tokens: int) -> int:
    """What one checkpointed decoder layer of an LLM.int8 base keeps through the forward: bitsandbytes'
    MatMul8bitLt holds its input for backward as an attribute of its context (`ctx.tensors = (CAt, subA, A)`,
    bitsandbytes.autograd._functions), not through save_for_backward, so non-reentrant checkpointing's
    saved-tensor hooks never see it and it stays alive as without checkpointing: the normalised input q, k
    and v read (one tensor), attention's output o reads, the MLP's normalised input, and down's input.
    Mixture-of-experts layers are left out."""
    if not (flow.quantized and flow.saves_input) or shape.experts:
        return 0
    read = _int8_input_bytes(flow, shape, tokens)
    return tokens * (2 * read[outliers.NORMALISED] * shape.hidden + read[outliers.ATTENTION] * shape.q_dim
                     + read[outliers.MLP_PRODUCT] * shape.intermediate)


def int8_outliers_held(flow: _Flow, shape: Shape, tokens: int) -> int:
    """What one decoder layer of an LLM.int8 base keeps of its inputs' outlier columns on CUDA, held like
    its inputs (int8_inputs_held), with or without checkpointing: on random weights their expected count
    (harness.predict.outliers); trained weights' few are not counted. Mixture-of-experts layers are left out."""
    if not (flow.quantized and flow.saves_input and flow.cuda and flow.random_weights) or shape.experts:
        return 0
    return outliers.held_bytes(shape, tokens, _int8_input_bytes(flow, shape, tokens), INT8_THRESHOLD)


def layer_saved_bytes(flow: _Flow, shape: Shape, tokens: int, seq_len: int, targets: set[str],
                      masked: bool = False) -> int:
    """Bytes one decoder layer saves for backward (no checkpointing); `masked`: its SDPA call gets an explicit
    mask (Shape.masked_layers)."""
    quantized = flow.quantized
    h, r = shape.hidden, flow.residual
    family = shape.family
    norms = 4 if family.sandwich_norms else 2
    # NeoX's parallel residual: both pre-norms read the layer's input, saved once.
    saved = _norms(flow, tokens, h, family, norms, 1 if shape.parallel_residual else norms)
    normalised = _norm_output(flow, family)
    # Attention: q, k, v (or one fused projection, split) read the normalised input.
    widths = {"q": shape.q_dim, "k": shape.kv_dim, "v": shape.kv_dim, "qkv": shape.q_dim + 2 * shape.kv_dim}
    shared_input = False
    outs = []
    for role in ("qkv",) if family.fused_qkv else ("q", "k", "v"):
        out, extra, uses_input = _linear(flow, normalised, tokens, h, widths[role], family.name(role) in targets,
                                         quantized)
        saved += extra
        shared_input |= uses_input
        outs.append(out)
    saved += normalised * tokens * h if shared_input else 0
    outs = outs * 3 if family.fused_qkv else outs
    if family.qk_norm:
        # An RMSNorm over each head of q and of k: its fp32 input and per-head scale.
        saved += _rms_norm(flow, tokens, shape.q_dim, family, shape.heads)
        saved += _rms_norm(flow, tokens, shape.kv_dim, family, shape.kv_heads)
    # RoPE multiplies q and k by cos/sin in the residual dtype (promotion to fp32 if r is 4); GPT-2
    # has no rotary embedding (its positions were added to the input), and its q, k and v are views
    # of c_attn's output, which attention saves as they are.
    rotary = not family.learned_positions
    q_bytes, k_bytes = (max(outs[0], r), max(outs[1], r)) if rotary else (outs[0], outs[1])
    v_bytes = outs[2]
    if flow.autocast:  # scaled_dot_product_attention runs in 16 bits under autocast
        q_bytes = k_bytes = v_bytes = 2
    attn_out = q_bytes
    o_input_copied = False  # o_proj's input a tensor of its own, not attention's saved output
    if family.eager_attention:
        # transformers' eager attention (Gemma 2), T x s scores per head: the two matmuls save q
        # and k and v repeated to every head (a copy where grouped); the scores come out in q's
        # dtype (16 bits under autocast); soft-capping, cap * tanh(scores / cap), saves the tanh's
        # output; softmax runs in fp32 and saves its output; the probabilities cast back to q's
        # dtype for the matmul with v are saved too (the softmax's own output where all is fp32).
        # The output, transposed back to tokens, is a copy of its own.
        scores = tokens * shape.heads * seq_len
        saved += tokens * shape.q_dim * (q_bytes + k_bytes + v_bytes)
        saved += scores * ((q_bytes if shape.attn_softcap else 0) + 4 + (0 if q_bytes == 4 else q_bytes))
        o_input_copied = True
    elif _math_backend(flow, shape, q_bytes, masked):
        # fp32 with grouped-query attention: CUDA's flash kernel takes only 16-bit inputs and
        # its memory-efficient kernel refuses enable_gqa, so the math backend runs. Its two
        # matmuls save the scaled q, k and v repeated to every head, and the s x s softmax.
        saved += tokens * (3 * 4 * shape.q_dim + shape.q_dim * attn_out) + 4 * tokens * shape.heads * seq_len
    else:
        # SDPA (flash / memory-efficient kernels, no s^2 term) saves q, k, v, its output and
        # the per-head log-sum-exp; GQA runs natively (no repeated k/v) when there is no mask.
        # With a mask transformers repeats k and v to every head itself (a copy each: sdpa_attention's
        # use_gqa_in_sdpa, repeat_kv), and SDPA turns the bool mask into a [batch, 1, s, s] bias in q's dtype
        # (convert_boolean_attn_mask), which the memory-efficient kernel it then runs saves; the kernel's
        # padding of that bias to 8 columns (s not a multiple of 8) is left out, a few MB at 7B.
        repeated = masked and shape.kv_heads < shape.heads
        kv_width = shape.q_dim if repeated else shape.kv_dim
        saved += tokens * (shape.q_dim * q_bytes + kv_width * (k_bytes + v_bytes) + shape.q_dim * attn_out)
        saved += 4 * tokens * shape.heads + (q_bytes * tokens * seq_len if masked else 0)
        if family.whole_qkv_saved and v_bytes == outs[2] and not repeated:
            # v, not cast, is a view of the fused projection's output: attention keeps all of it.
            saved += tokens * (shape.q_dim + shape.kv_dim) * v_bytes
        # NeoX's q and k come out of the rotary's cat head-major, and so does SDPA's output.
        o_input_copied = family.head_major_qk
    # o_proj reads SDPA's output (already saved; flash kernels return it token-major when q is,
    # so the transpose to [batch, seq, heads x dim] makes no copy) or a copy of its own.
    _, o_saved, o_in = _linear(flow, attn_out, tokens, shape.q_dim, h, family.name("o") in targets, quantized)
    saved += o_saved + (attn_out * tokens * shape.q_dim if o_in and o_input_copied else 0)
    if not shape.experts:
        mlp_saved, mlp_in = _mlp(flow, tokens, shape, normalised, targets, quantized)
        return saved + mlp_saved + (normalised * tokens * h if mlp_in else 0)
    # MoE: the router (not quantized, not adapted) reads the normalised input; every expert
    # gathers its share of tokens (balanced routing: T k / E each) and runs a SwiGLU MLP.
    router_out, router_saved, router_in = _linear(flow, r, tokens, h, shape.experts, False, False)
    saved += router_saved + (r * tokens * h if router_in else 0) + 4 * 3 * tokens * shape.experts
    per_expert = math.ceil(tokens * shape.experts_per_token / shape.experts)
    for _ in range(shape.experts):
        mlp_saved, mlp_in = _mlp(flow, per_expert, shape, r, targets, quantized)
        # gathered tokens (if a base layer keeps them) and the routing-weight product's input
        saved += mlp_saved + (r * per_expert * h if mlp_in else 0) + 2 * per_expert * h
    return saved


def _math_backend(flow: _Flow, shape: Shape, q_bytes: int, masked: bool = False) -> bool:
    """fp32 grouped-query attention on CUDA: the flash kernel takes only 16-bit inputs and the
    memory-efficient one refuses enable_gqa, so SDPA runs its math backend. Under a mask k and v come
    repeated (no enable_gqa), which the memory-efficient kernel takes."""
    return flow.cuda and not flow.autocast and q_bytes == 4 and shape.kv_heads < shape.heads and not masked


def attention_kept_bytes(flow: _Flow, shape: Shape, tokens: int) -> int:
    """What selective checkpointing (TRL's policy: the SDPA op's outputs are saved) keeps of a layer
    besides its input: attention's output and per-head log-sum-exp. Eager attention and the math
    backend CUDA runs for fp32 grouped-query attention are not that op: nothing."""
    q_bytes = 2 if flow.autocast else max(flow.weights, flow.residual)
    if shape.family.eager_attention or _math_backend(flow, shape, q_bytes):
        return 0
    return tokens * shape.q_dim * q_bytes + 4 * tokens * shape.heads


def activation_bytes(shape: Shape, technique, lora, seq_len: int, batch: int, gradient_checkpointing: bool,
                     device_type: str = "cuda", selective: bool = False, offloading: bool = False,
                     liger: bool = False, random_weights: bool = False) -> dict[str, int]:
    """Activations saved by one micro-batch's forward ("saved", on the device; "host" where they are
    offloaded), the largest transient on top of them in its backward, and what one decoder layer's
    forward saves ("layer": recomputed in backward under checkpointing) and what the output head and
    the loss save on the device ("head", freed once backward has passed them)."""
    flow = _flow(technique, lora, device_type, liger, random_weights)
    targets = _lora_targets(shape, lora) if flow.lora else set()
    tokens = batch * seq_len
    held_outliers = int8_outliers_held(flow, shape, tokens)
    per_layer = layer_saved_bytes(flow, shape, tokens, seq_len, targets) + held_outliers
    # Layers whose attention gets a sliding-window mask save its bias and repeated k and v (layer_saved_bytes);
    # the widest of them is the one a recompute holds. Under checkpointing the bool mask itself, one
    # [batch, 1, s, s] tensor all layers read, is an input every checkpoint keeps until backward is done;
    # without it the mask is gone when the model's forward returns.
    masked = shape.masked_layers(seq_len)
    per_masked = layer_saved_bytes(flow, shape, tokens, seq_len, targets, masked=True) + held_outliers \
        if masked else per_layer
    all_layers = (shape.layers - masked) * per_layer + masked * per_masked
    mask_kept = tokens * seq_len if masked and gradient_checkpointing else 0
    final_norm = _norms(flow, tokens, shape.hidden, shape.family, 1, 1)
    # lm_head is never quantized nor adapted. Under autocast it saves a 16-bit input and, if
    # its weight is fp32 (full precision, or upcast by k-bit preparation), a 16-bit copy of it.
    if flow.autocast:
        lm_head = 2 * tokens * shape.hidden
        if flow.weights == 4 or flow.quantized:
            lm_head += 2 * shape.vocab * shape.hidden
    else:
        lm_head = flow.residual * tokens * shape.hidden
    # The loss upcasts the logits to fp32; log_softmax saves its fp32 output. Backward starts
    # with two more fp32 logit-sized buffers (the nll_loss and log_softmax gradients).
    loss = 4 * tokens * shape.vocab
    if shape.final_softcap:
        # Gemma 2's cap * tanh(logits / cap): the tanh saves its output, in the logits' dtype.
        loss += (2 if flow.autocast else flow.residual) * tokens * shape.vocab
    loss_backward = 2 * 4 * tokens * shape.vocab
    if flow.liger:
        # Liger's fused linear cross-entropy never holds the logits: chunk by chunk it computes the
        # loss and its gradients in forward, keeping the gradient of lm_head's input and, where
        # lm_head trains, of its weight, until backward hands them on.
        lm_head = (2 if flow.autocast else flow.residual) * tokens * shape.hidden
        lm_head += shape.vocab * shape.hidden * flow.weights if flow.full else 0
        loss = loss_backward = 0
    head = final_norm + lm_head + loss
    if flow.dora:  # at the last adapted layer, on top of nearly every saved activation
        loss_backward = max(loss_backward, _dora_transient(shape, targets) - head)
    # At the forward's end, the loss's log_softmax writing its output, two tensors beside what is saved:
    # the logits and their fp32 upcast (no copy where they are fp32 already). Liger never makes them.
    logits = 0 if flow.liger else (2 if flow.autocast else flow.residual)
    at_loss = tokens * shape.vocab * (logits + (4 if logits not in (0, 4) else 0))
    # Under checkpointing, autocast's cache: it keeps the 16-bit copy it makes of every fp32 leaf that
    # requires grad (trained fp32 weights, peft's fp32 adapters) until the autocast region, the whole
    # forward and loss, exits (cached_cast, ATen's autocast_mode.cpp). Without checkpointing the layers
    # save those copies anyway (counted in their saved bytes); with it nothing else holds them.
    cached = 0
    if gradient_checkpointing and flow.autocast:
        if flow.lora:
            cached = 2 * sum(adapter_tensors(shape, technique, lora))
        elif flow.weights == 4:
            params = shape.parameters()
            cached = 2 * (params["linear"] + params["router"])  # lm_head's copy is in the head already
    layer_input = flow.residual * tokens * shape.hidden
    # Non-reentrant checkpointing keeps each layer's input (and, selective, attention's outputs; over an
    # LLM.int8 base, what its linears hold outside the hooks: int8_inputs_held);
    # backward recomputes one layer at a time after the head's backward is done, so the two
    # transients never meet.
    # bitsandbytes' context keeps, outside saved_tensors_hooks, what no offloading moves to the host
    int8_held = shape.layers * (int8_inputs_held(flow, shape, tokens) + held_outliers)
    kept = shape.layers * (layer_input + (attention_kept_bytes(flow, shape, tokens) if selective else 0)) + int8_held
    kept += mask_kept
    layers, recompute = (kept, per_masked) if gradient_checkpointing else (all_layers, 0)
    # A recomputed layer's widest moment: its saved tensors and what its last linear's forward holds.
    recompute_peak = recompute + recompute_held_bytes(flow, shape, tokens, targets) if gradient_checkpointing else 0
    if not offloading:
        return {"saved": layers + head, "transient": max(loss_backward, recompute_peak - head), "host": 0,
                "layer": recompute or per_masked, "head": head, "forward_end": layers + head + cached + at_loss}
    # TRL's offloading: every saved tensor of 1 KB or more goes to host memory, but parameters and
    # what lm_head saves (it is run outside the offloading); checkpointing's kept inputs are
    # saved tensors too. Its streams keep the device tensors of the last five saves alive until
    # their copies are done (its forward stash), and hand a tensor still stashed back from the
    # device: the loss's saves (log_softmax's fp32 output, which nll_loss saves again, and Gemma
    # 2's tanh) end the forward, so they stay on the device beside their host copies and backward
    # brings nothing back before the layers, each layer's input before it is recomputed.
    # Without checkpointing TRL also copies a tensor again each time it is saved more than five
    # saves after its copy; the simulation does (at 7B, seq 2048: twice the host bytes and 3.5 GB
    # more on the GPU than this), this counts each tensor once: checkpointed is what is predicted.
    # An LLM.int8 base's inputs and outlier columns stay on the device (int8_held), and so does the bool mask
    # the checkpoints keep (mask_kept): not a saved tensor.
    device_kept = int8_held + mask_kept
    return {"saved": lm_head + loss + device_kept, "host": layers - device_kept + final_norm + loss,
            "transient": max(loss_backward, recompute_peak + (layer_input if gradient_checkpointing else 0)),
            "layer": recompute or per_masked, "head": lm_head + loss,
            "forward_end": lm_head + loss + device_kept + cached + at_loss}


# -- sharded over ranks ---------------------------------------------------------------


@dataclass(frozen=True)
class _Units:
    """What sharding moves per unit: the root (embeddings, final norm, output head) and one decoder layer,
    in parameters (all, trainable)."""
    root: int
    layer: int
    root_trainable: int
    layer_trainable: int


def _units(shape: Shape, sizes: list[int], technique) -> _Units:
    params = shape.parameters()
    root = params["embeddings"] + shape.hidden * (2 if shape.family.layer_norm else 1)
    layer = (params["total"] - root) / shape.layers
    if technique.adapter == "none":
        return _Units(root, layer, root, layer)
    return _Units(root, layer + sum(sizes) / shape.layers, 0, sum(sizes) / shape.layers)


def sharded_candidates(shape: Shape, technique, cfg, persistent: dict, activations: dict, sizes: list[int],
                       step_transient: int) -> tuple[dict[str, dict], dict, int]:
    """Per rank of cfg.world_size: the candidate peaks of a sharded step, the persistent bytes on the
    device, and the host bytes (offload).

    FSDP2 (harness.step.sharding: one unit per decoder layer, then the root):
    - weights, gradients and optimizer state: 1/N each (the shards; fp32 masters for bf16-mixed);
    - all_gather: the root stays unsharded from its forward to the end of backward; a decoder layer is
      unsharded while it runs and the next one is gathered ahead: root + 2 layers, in the all-gather
      dtype (the autocast dtype: MixedPrecisionPolicy's param_dtype); one rank alone casts each layer
      as it runs (root + 1 layer);
    - reduce_scatter: one layer's trainable gradients copied into the flat reduce-scatter input, in fp32
      (reduce_dtype) under mixed precision; their unsharded 16-bit gradients are activations;
    - with cpu_offload, the shards, gradients and optimizer state are host memory.
    Peaks: backward start (the loss's buffers, the root and the last layer gathered), a layer's backward
    (every saved activation but the head's, two layers gathered, one reduced), backward's end (every
    gradient shard made, the first layer's activations and gathers still alive) and the optimizer step.

    ZeRO (DeepSpeed, bf16; harness.step.zero): 16-bit parameters as weights (ZeRO-2: whole on every
    rank; ZeRO-3: 1/N, a layer gathered at a time and one prefetch bucket ahead), fp32 masters and
    AdamW's moments 1/N as optimizer state, 16-bit gradients 1/N reduced in buckets of hidden^2
    elements; the step casts each rank's gradient partition to fp32. cpu_offload moves the gradient
    partitions and the optimizer state (and ZeRO-3's 16-bit parameters) to the host.
    """
    n = cfg.world_size
    units = _units(shape, sizes, technique)
    compute = BYTES.get(technique.autocast, BYTES[technique.weights])
    reduce = 4 if technique.autocast != "none" else trainable_dtype_bytes(technique)
    accumulated = cfg.grad_accum > 1
    head = activations["head"]
    in_flight = 2 if n > 1 else 1  # one layer gathered ahead of the running one (one rank gathers nothing)
    if cfg.sharding == "fsdp2":
        shards = {k: math.ceil(v / n) for k, v in persistent.items()}
        gathered_root, gathered_layer = units.root * compute, units.layer * compute
        reduced_layer = units.layer_trainable * reduce
        unsharded_grads = units.layer_trainable * compute
        fp32_gradients = 0
        offloaded = ("weights", "gradients", "optimizer_state") if cfg.cpu_offload else ()
    else:
        stage3 = cfg.sharding == "zero3"
        sixteen, trainable = 2 * (units.root + shape.layers * units.layer), sum(sizes)
        shards = {"weights": math.ceil(sixteen / n) if stage3 else sixteen, "quant_constants": 0,
                  "gradients": math.ceil(2 * trainable / n),
                  "optimizer_state": math.ceil((4 * trainable + persistent["optimizer_state"]) / n)}
        bucket = shape.hidden * shape.hidden  # harness.step.zero: Trainer's "auto" bucket sizes
        gathered_root = 2 * min(units.root, bucket) if stage3 else 0  # gathered ahead: one prefetch bucket
        gathered_layer = 2 * units.layer if stage3 else 0
        reduced_layer = 2 * min(bucket, trainable)
        unsharded_grads = 2 * units.layer_trainable
        fp32_gradients = math.ceil(4 * trainable / n)  # the step's fp32 copy of this rank's gradient partition
        # ZeRO-Offload: each reduced gradient partition goes to the host, where the optimizer steps
        offloaded = ((("weights",) if stage3 else ()) + ("gradients", "optimizer_state")) if cfg.cpu_offload else ()
    host = sum(shards[k] for k in offloaded)
    device = {k: (0 if k in offloaded else v) for k, v in shards.items()}
    gradients_then = device["gradients"] if accumulated else 0
    candidates = {
        "backward start": {**device, "gradients": gradients_then,
                           "activations": activations["saved"] + activations["transient"],
                           "all_gather": gathered_root + gathered_layer},
        "layer backward": {**device, "gradients": gradients_then,
                           "activations": activations["saved"] - head + activations["layer"] * cfg.gradient_checkpointing
                           + unsharded_grads,
                           "all_gather": gathered_root + in_flight * gathered_layer, "reduce_scatter": reduced_layer},
        "backward end": {**device, "activations": activations["layer"] + unsharded_grads,
                         "all_gather": gathered_root + in_flight * gathered_layer, "reduce_scatter": reduced_layer},
        "optimizer step": {**device, "gradients": device["gradients"] + (0 if cfg.cpu_offload else fp32_gradients),
                           "activations": 0 if cfg.cpu_offload else math.ceil(step_transient / n)
                           if cfg.sharding == "fsdp2" else step_transient},
    }
    return candidates, device, host + activations["host"]


# -- the step -------------------------------------------------------------------------

def predict(config, technique, cfg, seq_len: int, batch: int, device_type: str = "cuda",
            random_weights: bool = False) -> dict:
    """Peak bytes of one training step and what is alive at the peak, by category; `cfg` is the
    experiment (harness.config.Experiment): its adapter, optimizer, accumulation, checkpointing,
    offloading and kernel settings. random_weights: the step runs on the lab's random init, not on
    trained weights (where values matter: LLM.int8's outlier columns).

    Three candidate peaks: the start of the last micro-batch's backward (weights, optimizer
    state, earlier micro-batches' gradients, saved activations, the loss's gradient
    buffers), the optimizer step (weights, gradients, optimizer state) and the end of its
    forward (the saved activations, the logits, and under checkpointing autocast's cache of
    16-bit weight copies, which nothing else keeps then). With the step
    in backward there is no optimizer step: each gradient is freed once its parameter has
    stepped, so at most one is in flight beside the activations (tied embeddings: that one's
    gradient waits for the embedding's own use, last in backward).
    """
    lora, grad_accum, optimizer_in_backward = cfg.lora, cfg.grad_accum, cfg.optimizer_in_backward
    shape = shape_of(config)
    weights, constants = weight_bytes(shape, technique, lora)
    sizes = trainable_tensors(shape, technique, lora)
    param_bytes = trainable_dtype_bytes(technique)
    gradients = sum(sizes) * param_bytes
    # The optimizer's state and the largest transient of its step (harness.blocks.optimizers says each one's).
    optimizer_state, step_transient = OPTIMIZERS[technique.optimizer].state_bytes(sizes, param_bytes, shape,
                                                                                  cfg.optim, device_type)
    # Sharded under mixed precision, the layers compute with 16-bit parameters (FSDP2's param_dtype,
    # DeepSpeed's bf16 module): autocast has no fp32 weight to copy, as with a 16-bit model.
    computed = dataclasses.replace(technique, weights=technique.autocast) if (
        cfg.sharding != "none" and technique.autocast != "none") else technique
    activations = activation_bytes(shape, computed, lora, seq_len, batch, cfg.gradient_checkpointing, device_type,
                                   cfg.selective_checkpointing, cfg.activation_offloading, cfg.liger_kernels,
                                   random_weights)
    # Every category of the record is reported; one without a term here is 0.
    persistent = {**dict.fromkeys(PERSISTENT, 0), "weights": weights, "quant_constants": constants,
                  "gradients": gradients, "optimizer_state": optimizer_state}
    # At the last micro-batch's backward start, gradients are alive only if earlier micro-batches left theirs.
    backward_start = {**persistent, "gradients": gradients if grad_accum > 1 else 0,
                      "activations": activations["saved"] + activations["transient"]}
    # The forward's end: the same, the loss being computed (binds under checkpointing with autocast's cache).
    forward_end = {**backward_start, "activations": activations["forward_end"]}
    candidates = {"backward start": backward_start, "optimizer step": {**persistent, "activations": step_transient},
                  "forward end": forward_end}
    tied_buffers = 2
    if optimizer_in_backward:
        # No optimizer step and no gradient kept: at backward start none is in flight yet, and
        # later each lives only until its parameter's hook has stepped.
        persistent["gradients"] = 0
        candidates = {"backward start": {**backward_start, "gradients": 0},
                      "forward end": {**forward_end, "gradients": 0}}
        tied_buffers = 3  # the output layer's gradient waits, outside .grad, for the embedding's own
    if shape.tied_embeddings and technique.adapter == "none":
        # Tied input and output embeddings, trained: the output layer's gradient is in .grad when
        # the embedding's own backward, last, makes a second vocabulary x hidden gradient to add to
        # it (traced: a zero-filled buffer and the scattered sum, two of them), all others done.
        candidates["embedding backward"] = {
            **persistent, "activations": tied_buffers * shape.vocab * shape.hidden * param_bytes}
    host_bytes = activations["host"]
    if cfg.sharding != "none":
        candidates, persistent, host_bytes = sharded_candidates(shape, technique, cfg, persistent, activations, sizes,
                                                    step_transient)
    peak_at = max(candidates, key=lambda name: sum(candidates[name].values()))
    at_peak = candidates[peak_at]
    categories = {k: at_peak.get(k, 0) for k in CATEGORIES}  # in the record's order
    params = shape.parameters()
    return {
        "method": "analytic",
        "total_bytes": sum(categories.values()),
        "categories": categories,
        "persistent": persistent,
        "parameters": {"total": params["total"], "trainable": sum(sizes),
                       "quantized": params["linear"] if QUANTIZATIONS[technique.quantization] else 0},
        "peak_at": peak_at,
        "host_bytes": host_bytes,
        # of the optimizer state, what a paged optimizer keeps in CUDA unified memory (harness.device_memory)
        "unified_bytes": OPTIMIZERS[technique.optimizer].paged_bytes(sizes) if device_type == "cuda" else 0,
        "device_type": device_type,
    }
