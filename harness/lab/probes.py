"""Probes: facts the memory and precision arithmetic rests on, computed with torch and bitsandbytes.

- number_formats: bits, exponent and fraction bits, range and the count of finite values
  of fp32, bf16 and fp16 (range and count are different things: fp16's largest value is
  65504, and it has 63,488 finite bit patterns).
- quantization_error: symmetric int8 absmax quantization of a model's linear weights with
  the clip threshold swept below max|w| (clipping error against rounding error), next to
  bitsandbytes' NF4 and LLM.int8 row-wise quantization of the same tensors.
- accumulation_equivalence: gradients of k micro-batches of m sequences against one batch
  of k*m, through the harness's own train_step.

`python -m harness probes` writes one JSON file per probe under results/probes/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from harness import env, schema
from harness.architectures import LINEAR_NAMES
from harness.imports import source_files
from harness.step.models import DTYPES as FORMATS

CLIP_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0 of max|w|
INT8_LEVELS = 255  # symmetric: -127 .. 127
NF4_BLOCKSIZE = 64  # QLoRA's block size
DEVICE = "cpu"  # every probe computes on the CPU: the facts do not depend on a GPU


def _versions() -> dict:
    versions = env.software_versions()
    return {name: versions.get(name) for name in ("torch", "bitsandbytes", "transformers", "python")}


# The code a probe's facts come from (this module and every harness module it imports): a file made by
# other code is made again.
PROBE_MODULES = source_files(__name__)


def _header(probe: str) -> dict:
    return {"kind": "probe", "probe": probe, "device": DEVICE, "created": env.now(), "versions": _versions(),
            "code": env.code_digest(PROBE_MODULES)}


# --- number formats ----------------------------------------------------------------------

def _enumerated_finite_values(dtype: torch.dtype) -> int:
    """Count the finite values among all 2^16 bit patterns of a 16-bit format."""
    patterns = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16)
    return int(torch.isfinite(patterns.view(dtype)).sum())


def format_facts(dtype: torch.dtype) -> dict:
    info = torch.finfo(dtype)
    fraction_bits = round(-math.log2(info.eps))  # eps = 2^-fraction_bits
    exponent_bits = info.bits - 1 - fraction_bits
    # Cross-check against the range: smallest normal = 2^(1 - bias), bias = 2^(e-1) - 1.
    assert 2 ** (exponent_bits - 1) - 1 == 1 - round(math.log2(info.smallest_normal)), dtype
    # An all-ones exponent field encodes inf (fraction 0) or NaN: 2 signs x 2^fraction_bits patterns.
    formula = 2 ** info.bits - 2 ** (fraction_bits + 1)
    facts = {"bits": info.bits, "exponent_bits": exponent_bits, "fraction_bits": fraction_bits,
             "max": float(info.max), "smallest_normal": float(info.smallest_normal), "eps": float(info.eps),
             "finite_values": formula, "finite_values_method": "2^bits - 2^(fraction_bits+1)"}
    if info.bits == 16:
        enumerated = _enumerated_finite_values(dtype)
        assert enumerated == formula, (dtype, enumerated, formula)
        facts["finite_values_method"] = "enumerated all 2^16 bit patterns"
    # +0 and -0 are two bit patterns of one number.
    facts["distinct_finite_numbers"] = facts["finite_values"] - 1
    return facts


def number_formats() -> dict:
    formats = {name: format_facts(dtype) for name, dtype in FORMATS.items()}
    fp16 = formats["fp16"]
    note = (f"Range and count differ: fp16's largest finite value is {fp16['max']:.0f}, and it has "
            f"{fp16['finite_values']:,} finite bit patterns; fp32 has {formats['fp32']['finite_values']:,}. "
            "Exponent bits set the range, fraction bits the relative precision (eps).")
    return {**_header("number_formats"), "formats": formats, "note": note}


# --- quantization error ------------------------------------------------------------------

def int8_absmax_sweep(weights: list[torch.Tensor], clip_ratios=CLIP_RATIOS) -> list[dict]:
    """Symmetric int8 absmax quantization with one scale per tensor, for each clip ratio.

    The textbook scheme: threshold = clip_ratio * max|w|, scale = threshold / 127; values
    beyond the threshold are clipped to +-127 (clipping error), the rest rounded to the
    nearest of 255 levels (rounding error). Errors are summed over all tensors.
    """
    flat = torch.cat([w.detach().float().reshape(-1) for w in weights])
    # Each element carries its own tensor's max|w|, so one pass per ratio covers every tensor.
    maxima = torch.cat([torch.full((w.numel(),), float(w.detach().abs().max())) for w in weights])
    norm2 = float((flat ** 2).sum())
    rows = []
    for ratio in clip_ratios:
        threshold = ratio * maxima
        scale = threshold / 127
        restored = torch.clamp(torch.round(flat / scale), -127, 127) * scale
        rows.append({"clip_ratio": ratio,
                     "relative_rmse": math.sqrt(float(((restored - flat) ** 2).sum()) / norm2),
                     "clipped_fraction": float((flat.abs() > threshold).sum()) / flat.numel()})
    return rows


def nf4_relative_rmse(weights: list[torch.Tensor], blocksize: int = NF4_BLOCKSIZE, as_shaped: bool = False) -> float:
    """bitsandbytes NF4 (blockwise absmax, no double quantization) of the bf16 weights, as QLoRA loads them.

    bitsandbytes quantizes blocks of `blocksize` consecutive elements of the flattened
    tensor, so a (-1, blocksize) view of a weight gets the very same codes and scales. The
    view is the default because bitsandbytes 0.50's CPU dequantize kernel restores a
    tensor whose rows are not a multiple of the block size wrongly; `as_shaped` measures
    the round trip through the weight's own shape, which exposes that.
    """
    import bitsandbytes.functional as F

    error = norm2 = 0.0
    for weight in weights:
        original = weight.detach().to(torch.bfloat16)
        blocked = not as_shaped and original.numel() % blocksize == 0
        packed, state = F.quantize_4bit(original.reshape(-1, blocksize) if blocked else original,
                                        blocksize=blocksize, quant_type="nf4")
        restored = F.dequantize_4bit(packed, state).float().reshape(weight.shape)
        error += float(((restored - weight.float()) ** 2).sum())
        norm2 += float((weight.float() ** 2).sum())
    return math.sqrt(error / norm2)


def int8_rowwise_relative_rmse(weights: list[torch.Tensor]) -> float:
    """bitsandbytes LLM.int8 weight quantization: one absmax scale per output row, fp16 input."""
    import bitsandbytes.functional as F

    error = norm2 = 0.0
    for weight in weights:
        codes, scales, _ = F.int8_vectorwise_quant(weight.detach().to(torch.float16))
        restored = F.int8_vectorwise_dequant(codes, scales).float()
        error += float(((restored - weight.float()) ** 2).sum())
        norm2 += float((weight.float() ** 2).sum())
    return math.sqrt(error / norm2)


def weights_identity(source_name: str) -> str:
    """The probe's weights by a name that is the same on every machine: a pretrained checkpoint's
    recipe and weights digest (not where it is cached), else the source as given."""
    from harness.step.checkpoint import PRETRAINING_FILE, checkpoint_identity

    folder = Path(source_name)
    return checkpoint_identity(folder) if (folder / PRETRAINING_FILE).exists() else source_name


def default_weights_source() -> str:
    """The largest of the lab's pretrained base checkpoints that is cached, else the tiny-llama preset."""
    from harness.step.checkpoint import base_checkpoint_path

    for device_type in ("cuda", "cpu"):
        path = base_checkpoint_path(device_type)
        if path is not None:
            return str(path)
    return "tiny-llama"


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The attention and MLP projection weights (q/k/v/o/gate/up/down), fp32, in model order."""
    return [module.weight.detach().float() for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_NAMES]


def evenly_spaced(tensors: list[torch.Tensor], max_parameters: int) -> list[torch.Tensor]:
    """Every n-th tensor, n chosen so that at most max_parameters are kept (all layers stay represented)."""
    total = sum(t.numel() for t in tensors)
    step = max(1, math.ceil(total / max_parameters))
    return tensors[::step]


def load_linear_weights(source_name: str, max_parameters: int) -> tuple[list[torch.Tensor], dict]:
    from harness.step.models import build_base_model, resolve_source
    from harness.techniques import TECHNIQUES

    source = resolve_source(source_name)
    model = build_base_model(source, TECHNIQUES["fp32"], torch.device(DEVICE), seed=0)
    weights = evenly_spaced(linear_weights(model), max_parameters)
    if not weights:
        raise ValueError(f"{source_name}: no linear layers named {', '.join(LINEAR_NAMES)}")
    if source.random_init:
        std = getattr(source.config, "initializer_range", 0.02)
        description = f"{source_name} ({source.kind}), random init: normal(0, {std})"
    else:
        description = f"{weights_identity(source_name)} (pretrained checkpoint)"
    info = {"source": description, "identity": weights_identity(source_name), "trained": not source.random_init,
            "tensors": len(weights),
            "parameters": sum(w.numel() for w in weights)}
    return weights, info


def quantization_error(weights_source: str | None = None, max_parameters: int = 50_000_000,
                       weights: list[torch.Tensor] | None = None, weights_info: dict | None = None) -> dict:
    """The probe over a model's linear weights, or over given tensors (weights + weights_info)."""
    if weights is None:
        weights, weights_info = load_linear_weights(weights_source or default_weights_source(), max_parameters)
    sweep = int8_absmax_sweep(weights)
    best = min(sweep, key=lambda row: row["relative_rmse"])
    if weights_info["trained"]:
        note = ("Trained weights: the sweep shows where clipping error and rounding error balance for "
                "these tensors, with one scale per tensor.")
    else:
        note = ("Random-init (Gaussian) weights have no outliers: max|w| is only a few standard deviations, "
                "so the best clip ratio is near 1 here. Outliers stretch max|w| and move the optimum "
                "lower; this sweep is not the trained-weight picture.")
    nf4 = nf4_relative_rmse(weights)
    nf4_as_shaped = nf4_relative_rmse(weights, as_shaped=True)
    nf4_result = {"relative_rmse": nf4, "blocksize": NF4_BLOCKSIZE, "input_dtype": "bf16", "double_quant": False,
                  "relative_rmse_dequantized_as_shaped": nf4_as_shaped}
    if abs(nf4_as_shaped - nf4) > 0.01 * nf4:
        nf4_result["note"] = (f"dequantize_4bit on {DEVICE} with the weights' own shapes gives "
                              f"{nf4_as_shaped:.4f}, not {nf4:.4f}: the kernel mis-restores tensors whose rows "
                              f"are not a multiple of {NF4_BLOCKSIZE} (same codes and scales)")
    return {**_header("quantization_error"), "weights": weights_info,
            "int8_absmax": sweep, "int8_levels": INT8_LEVELS,
            "int8_absmax_best": {"clip_ratio": best["clip_ratio"], "relative_rmse": best["relative_rmse"]},
            "int8_absmax_scope": "one scale per tensor, fp32 input",
            "nf4": nf4_result,
            "int8_rowwise": {"relative_rmse": int8_rowwise_relative_rmse(weights), "input_dtype": "fp16",
                             "scope": "one absmax scale per output row (bitsandbytes int8_vectorwise_quant)"},
            "note": note}


# --- gradient accumulation ---------------------------------------------------------------

def _step_gradients(model: nn.Module, micro_batches: list[torch.Tensor]) -> tuple[float, dict]:
    """Loss and gradients of one train_step; the optimizer (SGD, lr 0) leaves the model as it was."""
    from harness.step.train import Progress, train_step

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    captured = {}

    def capture():
        captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    loss = train_step(model, optimizer, micro_batches, "none", None, Progress(), after_backward=capture)
    return float(loss), captured


def accumulation_equivalence(ks=(1, 2, 4, 8), micro_batch: int = 2, seq_len: int = 32,
                             model_name: str = "tiny-llama") -> dict:
    import numpy as np

    from harness.config import LoraSettings
    from harness.step.data import Batches
    from harness.step.models import build_base_model, prepare_for_training, resolve_source
    from harness.techniques import TECHNIQUES

    source = resolve_source(model_name)
    model = build_base_model(source, TECHNIQUES["fp32"], torch.device(DEVICE), seed=0)
    model = prepare_for_training(model, TECHNIQUES["fp32"], LoraSettings(), gradient_checkpointing=False)
    model.train()
    stream = np.random.default_rng(0).integers(0, source.config.vocab_size, 50_000)
    rows = []
    for k in ks:
        accumulated = Batches(stream, seq_len, micro_batch, k, seed=1).step(0, torch.device(DEVICE))
        whole = Batches(stream, seq_len, k * micro_batch, 1, seed=1).step(0, torch.device(DEVICE))
        if not torch.equal(torch.cat(accumulated), whole[0]):
            raise AssertionError("the two splits must hold the same sequences")
        loss_k, grads_k = _step_gradients(model, accumulated)
        loss_1, grads_1 = _step_gradients(model, whole)
        error = max(float((grads_k[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in grads_1.items())
        rows.append({"k": k, "max_relative_gradient_error": error, "loss_difference": abs(loss_k - loss_1)})
    return {**_header("accumulation_equivalence"), "model": model_name, "micro_batch": micro_batch,
            "seq_len": seq_len, "dtype": "fp32", "data": "random token ids (seeded)", "rows": rows,
            "uneven": uneven_accumulation(model, stream, max(ks), micro_batch, seq_len),
            "note": "k micro-batches of m sequences, each loss divided by k, against one batch of k*m "
                    "sequences (the same sequences); max over parameter tensors of ||g_k - g_1|| / ||g_1||."}


def uneven_accumulation(model: nn.Module, stream, k: int, micro_batch: int, seq_len: int) -> dict:
    """Accumulation when micro-batches count different numbers of tokens (padding, packing ends).

    Micro-batch i keeps the loss of its first (i + 1) / k of each sequence (the rest labelled
    -100). Each micro-batch's mean loss divided by k weights a token of a short micro-batch more
    than one of a long one; the summed token losses over the whole batch's token count (what
    transformers' `num_items_in_batch` does) equal the large batch's loss.
    """
    from harness.step.data import Batches

    inputs = Batches(stream, seq_len, micro_batch, k, seed=2).step(0, torch.device(DEVICE))
    labels = []
    for i, x in enumerate(inputs):
        y = x.clone()
        y[:, seq_len * (i + 1) // k:] = -100
        labels.append(y)
    counted = int(sum((y[:, 1:] != -100).sum() for y in labels))  # the model shifts labels by one

    def gradients(pairs, **loss_options) -> dict:
        model.zero_grad(set_to_none=True)
        for x, y in pairs:
            loss = model(input_ids=x, labels=y, **loss_options).loss
            (loss if loss_options else loss / len(pairs)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole = gradients([(torch.cat(inputs), torch.cat(labels))])
    pairs = list(zip(inputs, labels))
    by_mean = gradients(pairs)
    by_count = gradients(pairs, num_items_in_batch=counted)
    model.zero_grad(set_to_none=True)

    def error(grads):
        return max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in whole.items())

    return {"k": k, "tokens_counted": [int((y[:, 1:] != -100).sum()) for y in labels],
            "mean_of_means_error": error(by_mean), "token_count_error": error(by_count)}


# --- running -----------------------------------------------------------------------------

def headline(result: dict) -> str:
    """One line per probe for the terminal."""
    probe = result["probe"]
    if probe == "number_formats":
        f = result["formats"]
        return ("number_formats: " + "; ".join(
            f"{name} {x['exponent_bits']}e/{x['fraction_bits']}f max {x['max']:.4g} {x['finite_values']:,} finite"
            for name, x in f.items()))
    if probe == "quantization_error":
        best, full = result["int8_absmax_best"], result["int8_absmax"][-1]
        return (f"quantization_error ({result['weights']['source']}): int8 absmax rel. RMSE "
                f"{full['relative_rmse']:.4f} at clip 1.0, best {best['relative_rmse']:.4f} at clip "
                f"{best['clip_ratio']}; NF4 {result['nf4']['relative_rmse']:.4f}; "
                f"int8 row-wise {result['int8_rowwise']['relative_rmse']:.4f}")
    if probe == "accumulation_equivalence":
        uneven = result["uneven"]
        return "accumulation_equivalence: " + "; ".join(
            f"k={r['k']} grad err {r['max_relative_gradient_error']:.2e} loss diff {r['loss_difference']:.2e}"
            for r in result["rows"]) + (
            f"; uneven token counts, k={uneven['k']}: mean of means {uneven['mean_of_means_error']:.2e}, "
            f"by token count {uneven['token_count_error']:.2e}")
    return probe


# name -> function of the --weights option (only quantization_error reads it)
PROBES = {
    "number_formats": lambda weights: number_formats(),
    "quantization_error": lambda weights: quantization_error(weights),
    "accumulation_equivalence": lambda weights: accumulation_equivalence(),
}


def _up_to_date(path: Path, weights: str) -> bool:
    """A probe's file exists and was computed with these versions (and, for the quantization
    probe, these weights): running it again would give the same facts."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if old.get("versions") != _versions() or old.get("code") != env.code_digest(PROBE_MODULES):
        return False
    # the quantization probe: the same weights (a base pretrained anew with other weights is new weights)
    return "weights" not in old or old["weights"].get("identity") == weights_identity(weights)


def run_probes(out_dir: str | Path = "results/probes", weights: str | None = None,
               only: list[str] | None = None, force: bool = False) -> list[tuple[Path, dict, bool]]:
    """Run the probes (all, or those named in `only`) and write results/probes/NAME.json atomically.

    Returns (path, result, ran) per probe; one whose file is up to date is not run again unless forced."""
    weights = weights or default_weights_source()
    done = []
    for name, probe in PROBES.items():
        if only and name not in only:
            continue
        path = Path(out_dir) / f"{name}.json"
        if not force and _up_to_date(path, weights):
            done.append((path, json.loads(path.read_text()), False))
            continue
        result = probe(weights)
        done.append((schema.write(path, schema.from_dict(result, path, kind="probe")), result, True))
    return done
