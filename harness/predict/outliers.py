"""LLM.int8's outlier columns on random weights: how many input columns of an int8 linear layer hold a
value at or beyond its threshold, which bitsandbytes then keeps for backward in the input's dtype.

On CUDA, bitsandbytes' MatMul8bitLt (autograd/_functions.py, 0.50) finds the columns of its input A where
any value has |x| >= threshold (its CUDA int8_vectorwise_quant: `outliers.any(dim=0)`, then `argwhere`),
multiplies them in A's dtype (int8_mixed_scaled_mm: `subA = A[:, outlier_cols]`) and keeps both for
backward as attributes of its context: `ctx.tensors = (CAt, subA, A)`, `ctx.tensor_states = (SCAt, idx)`,
idx the columns' int64 indices (also left on the layer's state). On the CPU bitsandbytes runs
MatMul8bitFp, which takes no columns apart.

Which columns depends on the values. On the weights the lab builds when nothing is downloaded
(harness.step.models._materialize: every quantized weight N(0, s^2), s the config's initializer_range,
each norm's scale 1, LoRA's B zero) each input's distribution follows from the init:
- a normalised input (q, k, v, gate, up read it) is N(0, 1) in each value;
- attention's output (o's input) is a weighted mean of rows of v, each value N(0, s^2 h): at most that
  spread (the first row is v's own);
- the MLP's product (down's input) is act(g) * u with g and u independent N(0, s^2 h), or act(u)
  without a gate: heavy-tailed once s^2 h nears 1 (Llama-2-7B: s^2 h = 1.64).
A column holds an outlier where any of its rows does: width x (1 - (1 - p)^rows), the rows taken as
independent, which gives the most columns: the rows of one column are correlated (a token repeated,
attention's averaging), which leaves fewer. Trained weights put their outliers in a few feature
dimensions (the LLM.int8 paper, arXiv 2208.07339, finds six at 6.7B parameters), which this does not
describe: a prediction for trained weights counts no column.
"""

from __future__ import annotations

import math
from functools import lru_cache

# Three kinds of input by where they come from (the roles of harness.architectures).
NORMALISED, ATTENTION, MLP_PRODUCT = "normalised", "attention output", "mlp product"
INPUT_KIND = {"q": NORMALISED, "k": NORMALISED, "v": NORMALISED, "qkv": NORMALISED, "gate": NORMALISED,
              "up": NORMALISED, "gate_up": NORMALISED, "o": ATTENTION, "down": MLP_PRODUCT}
INDEX_BYTES = 8  # an outlier column's index: int64 (torch.argwhere)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _gelu_tanh(x: float) -> float:
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


# transformers' activations (ACT2FN) by config name, as functions of one value; the tanh forms of GELU are
# one function here (they differ in how they compute it, not in what).
ACTIVATIONS = {
    "silu": lambda x: x * _sigmoid(x), "swish": lambda x: x * _sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))),
    "gelu_python": lambda x: 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))),
    "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_python_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh, "gelu_accurate": _gelu_tanh,
    "quick_gelu": lambda x: x * _sigmoid(1.702 * x), "relu": lambda x: max(x, 0.0),
}
_Z_RANGE, _Z_STEPS = 12.0, 24_000  # the standard normal integrated over +-12 deviations, midpoints 0.001 apart


@lru_cache(maxsize=256)
def _product_share(activation: str, sigma: float, gated: bool, threshold: float) -> float:
    """P(|act(g) u| >= t) for g, u independent N(0, sigma^2) (gated), else P(|act(u)| >= t): over g, the
    chance that |u| reaches t / |act(g)|, which is erfc(t / (|act(g)| sigma sqrt 2))."""
    try:
        act = ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"LLM.int8's outlier columns: no form for the activation {activation!r} "
                         f"(harness.predict.outliers.ACTIVATIONS has {', '.join(ACTIVATIONS)})") from None
    step = 2 * _Z_RANGE / _Z_STEPS
    share = 0.0
    for k in range(_Z_STEPS):
        z = -_Z_RANGE + (k + 0.5) * step
        a = abs(act(sigma * z))
        if gated:
            hit = math.erfc(threshold / (a * sigma * math.sqrt(2.0))) if a > 0 else 0.0
        else:
            hit = 1.0 if a >= threshold else 0.0
        share += hit * math.exp(-0.5 * z * z)
    return min(1.0, share * step / math.sqrt(2.0 * math.pi))


def value_share(kind: str, shape, threshold: float) -> float:
    """The chance that one value of an input of this kind reaches the threshold, on random weights of the
    model's shape (harness.predict.analytic.Shape: its hidden size, activation, gate and init spread)."""
    sigma = shape.init_std * math.sqrt(shape.hidden)  # one output of a linear layer over a normalised input
    if kind == NORMALISED:
        return math.erfc(threshold / math.sqrt(2.0))
    if kind == ATTENTION:
        return math.erfc(threshold / (sigma * math.sqrt(2.0)))
    return _product_share(shape.activation, sigma, shape.family.gated_mlp, threshold)


def columns(rows: int, width: int, share: float) -> int:
    """Columns of a rows x width input with at least one value past the threshold, each value past it with
    chance `share`, the rows independent."""
    if share <= 0.0 or rows <= 0:
        return 0
    return round(width * -math.expm1(rows * math.log1p(-min(share, 1.0 - 1e-16))))


def role_of(name: str, in_features: int, shape) -> str:
    """A decoder linear layer's role from its module name's last part; where a family gives two roles one
    name (GPT-2's c_proj: attention's output and the MLP's down projection), from its input width."""
    family = shape.family
    roles = [role for role in family.roles() if family.name(role) == name]
    if not roles:
        raise ValueError(f"LLM.int8's outlier columns: {name!r} is no linear layer of a {shape.model_type} "
                         f"decoder layer ({', '.join(family.linear_names())})")
    if len(roles) > 1:
        roles = [role for role in roles if shape.linears()[role][0] == in_features] or roles
    return roles[0]


def held_bytes(shape, tokens: int, input_bytes: dict[str, int], threshold: float) -> int:
    """What one dense decoder layer's int8 linears keep of their outlier columns for backward: each its
    columns of its input (in the input's dtype, `input_bytes` by kind) and their indices."""
    total = 0
    for role, (n_in, _, _) in shape.linears().items():
        kind = INPUT_KIND[role]
        found = columns(tokens, n_in, value_share(kind, shape, threshold))
        total += found * (tokens * input_bytes[kind] + INDEX_BYTES)
    return total
