"""Analytic memory: bytes per category of one training step, from the model's shape alone.

No model is built: parameter counts come from the config, bytes per parameter from the
technique, and activations from a walk through one decoder layer that follows the dtype
of every tensor the runner's code path saves for backward. Each rule below names the code
that makes it true (transformers' decoder layers of the families harness.architectures
describes: Llama, Mistral, Mixtral, Qwen2/3, Gemma/Gemma 3, Phi-3; peft's LoRA linear,
bitsandbytes' 4-bit and 8-bit matmuls, torch autocast), so where the simulation
(harness.predict.simulate) disagrees, the rule that is off can be found.

Notation: T tokens per micro-batch (batch x sequence), h hidden size, i MLP size, V
vocabulary, E experts, k experts per token. Bytes: fp32 4, bf16/fp16 2, int8 1, NF4 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.architectures import ARCHITECTURES, Architecture, architecture_of, lora_targets
from harness.schema import CATEGORIES, PERSISTENT
from harness.techniques import ADAPTERS

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BLOCK = 64            # bitsandbytes' 4-bit block size (QLoRA paper §3)
NESTED_BLOCK = 256        # double quantization: 8-bit absmax constants in blocks of 256
NF4_CODE_BYTES = 16 * 4   # the 16-entry NF4 code book, fp32, per weight tensor
NESTED_CODE_BYTES = 256 * 4 + 4  # 8-bit dynamic code book and offset, per weight tensor
OPTIM8_BLOCK = 256        # bitsandbytes blockwise 8-bit optimizer state: one fp32 scale per 256
OPTIM8_MIN_SIZE = 4096    # bitsandbytes keeps 32-bit state for tensors smaller than this


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

    @property
    def family(self) -> Architecture:
        return ARCHITECTURES[self.model_type]

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """(in, out, count in the whole model) of every decoder linear layer, by name."""
        family, h, n = self.family, self.hidden, self.layers
        mlp_count = n * max(self.experts, 1)
        attention = ({"qkv_proj": (h, self.q_dim + 2 * self.kv_dim, n)} if family.fused_qkv else
                     {"q_proj": (h, self.q_dim, n), "k_proj": (h, self.kv_dim, n), "v_proj": (h, self.kv_dim, n)})
        mlp = ({"gate_up_proj": (h, 2 * self.intermediate, mlp_count)} if family.fused_gate_up else
               {"gate_proj": (h, self.intermediate, mlp_count), "up_proj": (h, self.intermediate, mlp_count)})
        return {**attention, "o_proj": (self.q_dim, h, n), **mlp, "down_proj": (self.intermediate, h, mlp_count)}

    def small_tensors(self) -> list[int]:
        """Element counts of the norms' weights, q/k/v biases and per-head q/k norms."""
        family = self.family
        sizes = [self.hidden] * ((4 if family.sandwich_norms else 2) * self.layers + 1)
        if family.qk_norm:
            sizes += [self.head_dim] * (2 * self.layers)
        if family.qkv_bias:
            sizes += [self.q_dim, self.kv_dim, self.kv_dim] * self.layers
        return sizes

    def parameters(self) -> dict[str, int]:
        """Parameter counts by group: decoder linears (quantizable), embeddings, norms and
        biases, router."""
        linear = sum(n_in * n_out * count for n_in, n_out, count in self.linears().values())
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = sum(self.small_tensors())
        router = self.layers * self.hidden * self.experts if self.experts else 0
        return {"linear": linear, "embeddings": embeddings, "norms": norms, "router": router,
                "total": linear + embeddings + norms + router}


def shape_of(config) -> Shape:
    """The shape of a transformers config of a family harness.architectures describes."""
    architecture_of(config)  # an unknown family is one sentence, here
    heads = config.num_attention_heads
    return Shape(vocab=config.vocab_size, hidden=config.hidden_size, intermediate=config.intermediate_size,
                 layers=config.num_hidden_layers, heads=heads,
                 kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                 head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                 experts=getattr(config, "num_local_experts", 0) or 0,
                 experts_per_token=getattr(config, "num_experts_per_tok", 0) or 0,
                 tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)), model_type=config.model_type)


def adapter_tensors(shape: Shape, technique, lora) -> list[int]:
    """Element counts of the adapter's trainable tensors in every adapted linear layer, as the
    adapter registry (harness.techniques.ADAPTERS) defines them."""
    adapter = ADAPTERS[technique.adapter]
    targets = _lora_targets(shape, lora)
    return [n for name, (n_in, n_out, count) in shape.linears().items() if name in targets
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
    if technique.quantization == "none":
        return params["linear"] * BYTES[technique.weights] + rest * BYTES[technique.weights] + adapters, 0
    # peft's prepare_model_for_kbit_training casts every parameter that is not quantized
    # (embeddings, norms, lm_head, router) to fp32.
    rest_bytes = rest * 4
    if technique.quantization == "int8":
        # LLM.int8: one int8 per weight, one fp32 scale per output row (SCB).
        rows = sum(n_out * count for _, n_out, count in shape.linears().values())
        return params["linear"] + rest_bytes + adapters, 4 * rows
    packed = params["linear"] // 2
    constants = 0
    for n_in, n_out, count in shape.linears().values():
        blocks = math.ceil(n_in * n_out / NF4_BLOCK)
        if technique.double_quant:  # 8-bit absmax per block, fp32 scale per 256 of them
            per_tensor = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + NF4_CODE_BYTES + NESTED_CODE_BYTES
        else:
            per_tensor = 4 * blocks + NF4_CODE_BYTES
        constants += per_tensor * count
    return packed + rest_bytes + adapters, constants


def trainable_tensors(shape: Shape, technique, lora) -> list[int]:
    """Element counts of the trainable tensors (what gradients and optimizer state cover)."""
    if technique.adapter != "none":
        return adapter_tensors(shape, technique, lora)
    sizes = [n_in * n_out for n_in, n_out, count in shape.linears().values() for _ in range(count)]
    sizes += [shape.vocab * shape.hidden] * (1 if shape.tied_embeddings else 2)
    sizes += shape.small_tensors()
    sizes += [shape.hidden * shape.experts] * (shape.layers if shape.experts else 0)
    return sizes


def trainable_dtype_bytes(technique) -> int:
    """Adapters are fp32 (peft upcasts them); full fine-tuning trains the weights' dtype."""
    return 4 if technique.adapter != "none" else BYTES[technique.weights]


def optimizer_bytes(sizes: list[int], optimizer: str, param_bytes: int) -> int:
    """AdamW: two states per parameter in the parameter's dtype, plus a step counter per tensor.

    bitsandbytes 8-bit AdamW: two uint8 states plus one fp32 scale per block of 256, for
    tensors of at least 4096 elements; smaller tensors keep two fp32 states.
    """
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        return sum(2 * n + 2 * 4 * math.ceil(n / OPTIM8_BLOCK) if n >= OPTIM8_MIN_SIZE else 8 * n for n in sizes)
    if optimizer == "paged_adamw":
        return sum(8 * n for n in sizes)
    return sum(2 * param_bytes * n + 4 for n in sizes)


# -- activations ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Flow:
    """The dtypes of a technique's forward pass, as bytes per element."""
    residual: int     # the residual stream (fp32 when the embeddings are fp32)
    autocast: bool    # torch.autocast to a 16-bit dtype
    weights: int      # dtype of the unquantized linear weights
    quantization: str
    lora: bool
    dora: bool        # LoRA's weight-decomposed variant (peft use_dora)
    dropout: bool
    rank: int
    mask_bytes: int   # dropout's saved mask: bool on CUDA (native_dropout), the fp32 noise on CPU
    full: bool        # full fine-tuning: weight gradients are needed
    cuda: bool        # the CUDA code path (kernels whose saved tensors differ from the CPU's)


def _flow(technique, lora, device_type: str) -> _Flow:
    weights = BYTES[technique.weights]
    kbit = technique.quantization != "none"
    return _Flow(residual=4 if (kbit or weights == 4) else weights, autocast=technique.autocast != "none",
                 weights=weights, quantization=technique.quantization, lora=technique.adapter != "none",
                 dora=technique.adapter != "none" and getattr(lora, "use_dora", False),
                 dropout=lora.dropout > 0, rank=lora.r, mask_bytes=1 if device_type == "cuda" else 4,
                 full=technique.adapter == "none", cuda=device_type == "cuda")


def _linear(flow: _Flow, x_bytes: int, tokens: int, n_in: int, n_out: int, adapted: bool,
            quantized: bool) -> tuple[int, int, bool]:
    """(output bytes per element, bytes saved for backward besides the input, input saved?)

    The input is reported separately because several layers often read one tensor (q, k
    and v read the same normalised input): its storage counts once.
    """
    saved, input_saved = 0, False
    if quantized and flow.quantization == "nf4":
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
        # its (autocast: 16-bit copy of the) input; lora_B saves lora_A's r-wide output.
        lora_in = 2 if flow.autocast else 4
        saved += lora_in * tokens * flow.rank
        if flow.dropout:
            saved += flow.mask_bytes * tokens * n_in + lora_in * tokens * n_in
        elif lora_in != x_bytes:
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
    weight dequantized and cast to fp32; autocast saves 16-bit copies of both for backward."""
    saved = tokens * n_out * (base_out + lora_out)
    if flow.dropout:
        saved += (2 * n_out * n_in + 2 * tokens * n_in) if flow.autocast else 4 * n_out * n_in
    return saved


def _dora_transient(shape: Shape, targets: set[str]) -> int:
    """DoRA's forward builds each adapted layer's full weight to take its norm: the LoRA
    product through an identity matrix (in x in), the fp32 weight and the sum (out x in each)."""
    return max((4 * n_in * (n_in + 3 * n_out) for name, (n_in, n_out, _) in shape.linears().items()
                if name in targets), default=0)


def _rms_norm(flow: _Flow, tokens: int, hidden: int, family: Architecture, groups: int = 1) -> int:
    """transformers' RMSNorm saves its input in fp32 (a copy unless fp32 already) and the scale
    (rsqrt) per token and group (a head, for q/k norms); the normalised tensor only where the
    norm's weight is trained (fp32 where the family scales in fp32)."""
    normalised = 4 if family.fp32_norm_scale else flow.residual
    return 4 * tokens * hidden + 4 * tokens * groups + (normalised * tokens * hidden if flow.full else 0)


def _mlp(flow: _Flow, tokens: int, shape: Shape, x_bytes: int, targets: set[str], quantized: bool) -> tuple[int, bool]:
    """A gated MLP: down(act(gate(x)) * up(x)), gate and up as two layers or one fused (its
    output split in halves); returns (bytes saved, input saved?)."""
    hidden, inter = shape.hidden, shape.intermediate
    projections = ((("gate_up_proj", 2 * inter),) if shape.family.fused_gate_up else
                   (("gate_proj", inter), ("up_proj", inter)))
    saved, input_saved = 0, False
    for name, width in projections:
        g_out, extra, uses_input = _linear(flow, x_bytes, tokens, hidden, width, name in targets, quantized)
        saved += extra
        input_saved |= uses_input
    # The activation (SiLU, GELU) saves the gate's output and the product saves the activation's
    # output and up's output (halves of one tensor where fused: the same bytes).
    saved += 3 * g_out * tokens * inter
    _, d_saved, d_in = _linear(flow, g_out, tokens, inter, hidden, "down_proj" in targets, quantized)
    saved += d_saved + (g_out * tokens * inter if d_in else 0)  # down's input: act(g) * u
    return saved, input_saved


def layer_saved_bytes(flow: _Flow, shape: Shape, tokens: int, seq_len: int, targets: set[str]) -> int:
    """Bytes one decoder layer saves for backward (no checkpointing)."""
    quantized = flow.quantization != "none"
    h, r = shape.hidden, flow.residual
    family = shape.family
    saved = (4 if family.sandwich_norms else 2) * _rms_norm(flow, tokens, h, family)
    # Attention: q, k, v (or one fused projection, split) read the normalised input (dtype r).
    projections = ((("qkv_proj", shape.q_dim + 2 * shape.kv_dim),) if family.fused_qkv else
                   (("q_proj", shape.q_dim), ("k_proj", shape.kv_dim), ("v_proj", shape.kv_dim)))
    shared_input = False
    outs = []
    for name, width in projections:
        out, extra, uses_input = _linear(flow, r, tokens, h, width, name in targets, quantized)
        saved += extra
        shared_input |= uses_input
        outs.append(out)
    saved += r * tokens * h if shared_input else 0
    outs = outs * 3 if family.fused_qkv else outs
    if family.qk_norm:
        # An RMSNorm over each head of q and of k: its fp32 input and per-head scale.
        saved += _rms_norm(flow, tokens, shape.q_dim, family, shape.heads)
        saved += _rms_norm(flow, tokens, shape.kv_dim, family, shape.kv_heads)
    # RoPE multiplies q and k by cos/sin in the residual dtype (promotion to fp32 if r is 4).
    q_bytes, k_bytes, v_bytes = max(outs[0], r), max(outs[1], r), outs[2]
    if flow.autocast:  # scaled_dot_product_attention runs in 16 bits under autocast
        q_bytes = k_bytes = v_bytes = 2
    attn_out = q_bytes
    if flow.cuda and not flow.autocast and q_bytes == 4 and shape.kv_heads < shape.heads:
        # fp32 with grouped-query attention: CUDA's flash kernel takes only 16-bit inputs and
        # its memory-efficient kernel refuses enable_gqa, so the math backend runs. Its two
        # matmuls save the scaled q, k and v repeated to every head, and the s x s softmax.
        saved += tokens * (3 * 4 * shape.q_dim + shape.q_dim * attn_out) + 4 * tokens * shape.heads * seq_len
    else:
        # SDPA (flash / memory-efficient kernels, no s^2 term) saves q, k, v, its output and
        # the per-head log-sum-exp; GQA runs natively (no repeated k/v) when there is no mask.
        saved += tokens * (shape.q_dim * q_bytes + shape.kv_dim * (k_bytes + v_bytes) + shape.q_dim * attn_out)
        saved += 4 * tokens * shape.heads
    # o_proj reads SDPA's output (already saved; flash kernels return it token-major, so the
    # transpose to [batch, seq, heads x dim] makes no copy).
    _, o_saved, _ = _linear(flow, attn_out, tokens, shape.q_dim, h, "o_proj" in targets, quantized)
    saved += o_saved
    if not shape.experts:
        mlp_saved, mlp_in = _mlp(flow, tokens, shape, r, targets, quantized)
        return saved + mlp_saved + (r * tokens * h if mlp_in else 0)
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


def activation_bytes(shape: Shape, technique, lora, seq_len: int, batch: int, gradient_checkpointing: bool,
                     device_type: str = "cuda") -> dict[str, int]:
    """Activations saved by one micro-batch's forward, and the largest transient on top of
    them in its backward."""
    flow = _flow(technique, lora, device_type)
    targets = _lora_targets(shape, lora) if flow.lora else set()
    tokens = batch * seq_len
    per_layer = layer_saved_bytes(flow, shape, tokens, seq_len, targets)
    head = _rms_norm(flow, tokens, shape.hidden, shape.family)
    # lm_head is never quantized nor adapted. Under autocast it saves a 16-bit input and, if
    # its weight is fp32 (full precision, or upcast by k-bit preparation), a 16-bit copy of it.
    if flow.autocast:
        head += 2 * tokens * shape.hidden
        if flow.weights == 4 or flow.quantization != "none":
            head += 2 * shape.vocab * shape.hidden
    else:
        head += flow.residual * tokens * shape.hidden
    # The loss upcasts the logits to fp32; log_softmax saves its fp32 output. Backward starts
    # with two more fp32 logit-sized buffers (the nll_loss and log_softmax gradients).
    head += 4 * tokens * shape.vocab
    loss_backward = 2 * 4 * tokens * shape.vocab
    if flow.dora:  # at the last adapted layer, on top of nearly every saved activation
        loss_backward = max(loss_backward, _dora_transient(shape, targets) - head)
    if not gradient_checkpointing:
        return {"saved": shape.layers * per_layer + head, "transient": loss_backward}
    # Non-reentrant checkpointing keeps each layer's input; backward recomputes one layer at a
    # time after the head's backward is done, so the two transients never meet.
    kept = shape.layers * flow.residual * tokens * shape.hidden
    return {"saved": kept + head, "transient": max(loss_backward, per_layer - head)}


# -- the step -------------------------------------------------------------------------

def predict(config, technique, lora, seq_len: int, batch: int, grad_accum: int = 1,
            gradient_checkpointing: bool = False, device_type: str = "cuda") -> dict:
    """Peak bytes of one training step and what is alive at the peak, by category.

    Two candidate peaks: the start of the last micro-batch's backward (weights, optimizer
    state, earlier micro-batches' gradients, saved activations, the loss's gradient
    buffers) and the optimizer step (weights, gradients, optimizer state).
    """
    shape = shape_of(config)
    weights, constants = weight_bytes(shape, technique, lora)
    sizes = trainable_tensors(shape, technique, lora)
    param_bytes = trainable_dtype_bytes(technique)
    gradients = sum(sizes) * param_bytes
    optimizer_state = optimizer_bytes(sizes, technique.optimizer, param_bytes)
    activations = activation_bytes(shape, technique, lora, seq_len, batch, gradient_checkpointing, device_type)
    # Every category of the record is reported; one without a term here is 0.
    persistent = {**dict.fromkeys(PERSISTENT, 0), "weights": weights, "quant_constants": constants,
                  "gradients": gradients, "optimizer_state": optimizer_state}
    # At the last micro-batch's backward start, gradients are alive only if earlier micro-batches left theirs.
    backward_start = {**persistent, "gradients": gradients if grad_accum > 1 else 0,
                      "activations": activations["saved"] + activations["transient"]}
    optimizer_step = {**persistent, "activations": 0}
    candidates = [backward_start, optimizer_step]
    if shape.tied_embeddings and technique.adapter == "none":
        # Tied input and output embeddings, trained: the output layer's gradient is in .grad when
        # the embedding's own backward, last, makes a second vocabulary x hidden gradient to add to
        # it (traced: a zero-filled buffer and the scattered sum, two of them), all others done.
        candidates.append({**persistent, "activations": 2 * shape.vocab * shape.hidden * param_bytes})
    at_peak = max(candidates, key=lambda c: sum(c.values()))
    categories = {k: at_peak.get(k, 0) for k in CATEGORIES}  # in the record's order
    params = shape.parameters()
    return {
        "method": "analytic",
        "total_bytes": sum(categories.values()),
        "categories": categories,
        "persistent": persistent,
        "parameters": {"total": params["total"], "trainable": sum(sizes),
                       "quantized": params["linear"] if technique.quantization != "none" else 0},
        "peak_at": ("backward start", "optimizer step", "embedding backward")[candidates.index(at_peak)],
        "device_type": device_type,
    }
