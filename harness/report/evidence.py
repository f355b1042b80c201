"""Evidence for the claims: one function per quantity, read from predictions, run records or probes.

Every quantity function takes (results, spec, method) and returns an Observation or None, where
method is one of:
  "analytic" / "simulated"  a prediction file of that method (results/predictions/)
  "gpu"                     a run record measured on CUDA (memory.source == "cuda")
  "cpu"                     a run record on CPU (tracked tensor bytes; only for device-independent claims)
  "probe"                   a probe file (results/probes/), computed with torch on the probe's device
The spec is the claim's `evidence` block (or a `context` entry) from claims.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from harness.cards import card_bytes
from harness.measure.budget import budget_cap_bytes
from harness.report.load import Results, _get, budget_card_bytes, device_label, is_gpu_record, machine
from harness.report.loss import loss_parity
from harness.report.verdicts import HOLDS
from harness.report.units import LLAMA_2_7B_PARAMETERS, fmt_bytes, fmt_value

PREDICTION_METHODS = ("analytic", "simulated")
RECORD_METHODS = ("gpu", "cpu")


@dataclass(frozen=True)
class Observation:
    value: float | None
    method: str                # analytic | simulated | gpu | cpu | probe
    source: str                # what configuration or file it comes from
    device: str | None = None  # the device, for measured runs and probes
    status: str = "ok"         # ok | oom | failed (records)
    note: str = ""             # what a reader needs beside the value (OOM phase, formats, ...)
    holds: bool | None = None  # for statements
    caveat: str | None = None  # a caveat that comes with this evidence (e.g. random-init weights)
    capacity: float | None = None  # for fits: the bytes the card leaves to the run
    extra: dict = field(default_factory=dict)  # "derived": the arithmetic that made value from the evidence


def _experiments(spec: dict) -> list[str]:
    names = spec.get("experiment")
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def _describe_prediction(prediction: dict) -> str:
    return (f"{prediction['experiment']} @ {prediction['model']}, seq {prediction['seq_len']} x "
            f"{prediction['micro_batch']}")


def _describe_record(record: dict) -> str:
    config = record.get("config") or {}
    text = f"{record['experiment']} @ {record['model']}, seq {config.get('seq_len')} x {config.get('micro_batch')}"
    if (config.get("grad_accum") or 1) > 1:
        text += f", {config['grad_accum']} micro-batches accumulated"
    budget = _get(record, "budget", "budget_gb")
    return text + (f", {budget:g} GB budget" if budget else "")


def select_predictions(results: Results, spec: dict, method: str, experiment: str) -> list[dict]:
    """Predictions of one method for an experiment at the spec's model, sequence length and batch."""
    chosen = [p for p in results.predictions
              if p.get("method") == method and p.get("experiment") == experiment
              and p.get("model") == spec.get("model")
              and p.get("seq_len") == spec.get("seq_len", p.get("seq_len"))
              and p.get("micro_batch") == spec.get("micro_batch", p.get("micro_batch"))]
    # The documents talk about GPUs: prefer predictions of the CUDA code path.
    return sorted(chosen, key=lambda p: (p.get("device_type") != "cuda", p.get("_file", "")))


# Config fields that change what a run measures, with the value a spec that does not name one means:
# a claim about "a step" compares single-step runs on one GPU unless it says otherwise (a record of
# 8 accumulated micro-batches divided by one of 1 compares unlike with unlike).
COMPARED_FIELDS = {"grad_accum": 1, "world_size": 1}
SHAPE_FIELDS = ("seq_len", "micro_batch")  # matched where the spec names them (any_model: never)


def record_matches(record: dict, spec: dict) -> bool:
    """Whether a record's configuration is the one the spec compares (model, shape, accumulation,
    ranks, budget); `any_model` frees the model and shape, `any_grad_accum` the accumulation."""
    config = record.get("config") or {}
    if not spec.get("any_model"):
        if record.get("model") != spec.get("model"):
            return False
        if any(spec.get(key) is not None and config.get(key) != spec[key] for key in SHAPE_FIELDS):
            return False
    for key, default in COMPARED_FIELDS.items():
        if key == "grad_accum" and spec.get("any_grad_accum"):
            continue
        if (config.get(key) if config.get(key) is not None else default) != spec.get(key, default):
            return False
    budget = _get(record, "budget", "budget_gb")
    if spec.get("budget_gb") is not None:
        return budget is not None and float(budget) == float(spec["budget_gb"])
    return budget is None


def select_records(results: Results, spec: dict, method: str, experiment: str) -> list[dict]:
    """Run records of one experiment on GPU or CPU in the spec's configuration (`record_matches`);
    finished ones first, then OOM, then failed; the spec's own model first within each."""
    want_gpu = method == "gpu"
    chosen = [record for record in results.records
              if is_gpu_record(record) == want_gpu and record.get("experiment") == experiment
              and record_matches(record, spec)]
    order = {"ok": 0, "oom": 1, "failed": 2}
    # where any model will do, the spec's own model (the documents' 7B) speaks first
    return sorted(chosen, key=lambda r: (order.get(r.get("status"), 3), r.get("model") != spec.get("model"),
                                         r.get("_file", "")))


def _configuration(record: dict) -> tuple:
    """What two records must share for one to be divided by the other: model, shape, accumulation,
    ranks, budget and machine (checkpointing belongs to the experiments compared)."""
    config = record.get("config") or {}
    return (record.get("model"), config.get("seq_len"), config.get("micro_batch"), config.get("grad_accum") or 1,
            config.get("world_size") or 1, _get(record, "budget", "budget_gb"), machine(record))


def _oom_observation(record: dict, method: str) -> Observation:
    error = record.get("error") or {}
    reached = error.get("memory_reached_bytes")
    note = f"{record.get('status')} at {error.get('phase') or '?'}"
    if error.get("step") is not None:
        note += f" step {error['step']}"
    if reached:
        note += f" (reached {fmt_bytes(reached)})"
    return Observation(None, method, _describe_record(record), device_label(record), record.get("status"), note,
                       capacity=_get(record, "budget", "cap_bytes"), extra=_cap_rule(record))


def _cap_rule(record: dict) -> dict:
    """How a budget run's allocator cap was set, as its record says (runs of older code took a card's GB as 1e9
    bytes, less a fixed allowance for the context), for a sentence that names the cap it really had."""
    budget = record.get("budget") or {}
    card = budget_card_bytes(record)
    if not budget.get("cap_bytes") or budget.get("card_bytes") is not None or card is None:
        return {}  # no cap, or one set by today's convention, which the ledger's own sentence states
    rule = fmt_bytes(card)
    if budget.get("context_allowance_bytes"):
        rule += f" less a {fmt_bytes(budget['context_allowance_bytes'])} allowance for the context"
    return {"capacity_rule": rule}


def _per_experiment(results: Results, spec: dict, method: str, from_prediction, from_record,
                    pick=min) -> Observation | None:
    """The quantity for each of the spec's experiments; `pick` chooses among several (min or max).
    Where a spec allows any model, runs of its own model (the documents' 7B) speak first."""
    found: list[Observation] = []
    own_model: list[Observation] = []
    failures: list[Observation] = []
    for experiment in _experiments(spec):
        if method in PREDICTION_METHODS:
            for prediction in select_predictions(results, spec, method, experiment):
                value = from_prediction(prediction, results)
                if value is not None:
                    found.append(Observation(value, method, _describe_prediction(prediction),
                                             capacity=_prediction_capacity(spec),
                                             extra={"files": (prediction.get("_file"),)}))
                    break
        else:
            for record in select_records(results, spec, method, experiment):
                if record.get("status") != "ok":
                    failures.append(_oom_observation(record, method))
                    continue
                value = from_record(record)
                if value is not None:
                    found.append(Observation(value, method, _describe_record(record), device_label(record),
                                             capacity=_get(record, "budget", "cap_bytes"),
                                             extra={"configuration": _configuration(record),
                                                    "files": (record.get("_file"),), **_cap_rule(record)}))
                    if record.get("model") == spec.get("model"):
                        own_model.append(found[-1])
                    break
    if found:
        return pick(own_model or found, key=lambda o: o.value)
    ooms = [o for o in failures if o.status == "oom"]
    return (ooms or failures or [None])[0]


def _prediction_capacity(spec: dict) -> float | None:
    return budget_cap_bytes(spec["budget_gb"], "cuda") if spec.get("budget_gb") else None


def _analytic_parameters(results: Results, prediction: dict) -> dict | None:
    """Parameter counts of a prediction; a simulated one borrows them from its analytic twin."""
    if prediction.get("parameters"):
        return prediction["parameters"]
    for other in results.predictions:
        if (other.get("parameters") and other.get("experiment") == prediction.get("experiment")
                and other.get("model") == prediction.get("model")):
            return other["parameters"]
    return None


# --- memory quantities ------------------------------------------------------------------------

def _category_value(data: dict | None, spec: dict, prediction: bool) -> float | None:
    names = spec.get("categories") or [spec["category"]]
    part = spec.get("part", "persistent")
    key = ("persistent" if part == "persistent" else "categories") if prediction else (
        "persistent" if part == "persistent" else "breakdown_at_peak")
    values = [_get(data, key, name) for name in names]
    if any(v is None for v in values):
        return None
    return float(sum(values))


def as_counted(observation: Observation | None, spec: dict) -> Observation | None:
    """Where a spec counts "7B" as 7e9 parameters (`parameters_counted`: the reading harness/claims.py
    adds beside such a claim, never the claim's own evidence), our Llama-2-7B figure (6,738,415,616
    parameters) is scaled to that count, so that the reading judges the documents' arithmetic alone;
    the note keeps our own figure."""
    counted = spec.get("parameters_counted")
    if counted is None or observation is None or observation.value is None:
        return observation
    factor = counted / LLAMA_2_7B_PARAMETERS
    note = f"x{factor:.3f} to {counted:.0e} parameters from ours, {fmt_bytes(observation.value)}"
    arithmetic = f"{fmt_bytes(observation.value)} x {factor:.3f} ({counted:.0e} over {LLAMA_2_7B_PARAMETERS:,} parameters)"
    derived = observation.extra.get("derived")
    return replace(observation, value=observation.value * factor,
                   note=f"{observation.note}; {note}" if observation.note else note,
                   extra={**observation.extra, "derived": f"{derived}, then {arithmetic}" if derived else arithmetic})


def category(results: Results, spec: dict, method: str) -> Observation | None:
    return as_counted(_per_experiment(results, spec, method,
                                      lambda p, _: _category_value(p, spec, True),
                                      lambda r: _category_value(r.get("memory"), spec, False)), spec)


categories_sum = category


def excess(results: Results, spec: dict, method: str) -> Observation | None:
    observation = category(results, spec, method)
    return _minus(observation, spec["card_gb"], bool(spec.get("left_to_allocator")))


def _peak_of_record(record: dict) -> float | None:
    return _get(record, "memory", "peak_allocated")


def peak(results: Results, spec: dict, method: str) -> Observation | None:
    return as_counted(_per_experiment(results, spec, method, lambda p, _: p.get("total_bytes"), _peak_of_record),
                      spec)


min_peak = peak  # over several experiments `_per_experiment` keeps the smallest


def peak_reserved(results: Results, spec: dict, method: str) -> Observation | None:
    """The caching allocator's peak reserved bytes, for a figure published as reserved memory: a record's, or a
    prediction's (the simulation's allocator replayed over the step; the analytic method's calibrated ratio)."""
    return as_counted(_per_experiment(results, spec, method, lambda p, _: p.get("reserved_bytes"),
                                      lambda r: _get(r, "memory", "peak_reserved")), spec)


def excess_peak(results: Results, spec: dict, method: str) -> Observation | None:
    return _minus(peak(results, spec, method), spec["card_gb"])


def phase_peak(results: Results, spec: dict, method: str) -> Observation | None:
    """The peak of one phase of the step (`phase`: load, forward, backward, optimizer): a record's
    allocator peak in that phase, a simulated prediction's traced one (the analytic method has none)."""
    phase = spec["phase"]
    observation = _per_experiment(results, spec, method, lambda p, _: _get(p, "phase_peaks", phase),
                                  lambda r: _get(r, "memory", "phases", phase, "peak_allocated"))
    if observation is not None and observation.value is not None:
        observation = replace(observation, source=f"{observation.source}, its {phase} phase")
    return as_counted(observation, spec)


def _minus(observation: Observation | None, card_gb: float, left_to_allocator: bool = False) -> Observation | None:
    """What is left over a card of `card_gb` as sold (the lab's one convention, harness.cards.card_bytes: a
    "16 GB" card holds 16 GiB), or over what it leaves to torch's allocator (`left_to_allocator`: less the CUDA
    context and kernels, as the claims of fitting count it): arithmetic on the evidence, named as such."""
    if observation is None or observation.value is None:
        return observation
    amount, what = ((budget_cap_bytes(card_gb, "cuda"), "leaves to the allocator") if left_to_allocator
                    else (card_bytes(card_gb), "holds"))
    arithmetic = f"{fmt_bytes(observation.value)} less the {fmt_bytes(amount)} a {card_gb:g} GB card {what}"
    derived = observation.extra.get("derived")
    return replace(observation, value=observation.value - amount,
                   extra={**observation.extra, "derived": f"{derived}, then {arithmetic}" if derived else arithmetic})


def trainable_fraction(results: Results, spec: dict, method: str) -> Observation | None:
    def from_prediction(prediction, results):
        counts = prediction.get("parameters")  # simulated files may lack counts: analytic answers then
        return counts["trainable"] / counts["total"] if counts and counts.get("total") else None

    def from_record(record):
        pct = _get(record, "parameters", "trainable_pct")
        return pct / 100 if pct is not None else None

    return _per_experiment(results, spec, method, from_prediction, from_record, pick=max)


def _per_trainable(results: Results, spec: dict, method: str, of) -> Observation | None:
    """of(gradients, optimizer state, trainable parameters) from a prediction or a record."""
    def value(persistent: dict | None, trainable: int | None) -> float | None:
        gradients, state = _get(persistent, "gradients"), _get(persistent, "optimizer_state")
        if gradients is None or state is None or not trainable:
            return None
        return of(gradients, state, trainable)

    return _per_experiment(
        results, spec, method,
        lambda p, res: value(p.get("persistent"), _get(_analytic_parameters(res, p), "trainable")),
        lambda r: value(_get(r, "memory", "persistent"), _get(r, "parameters", "trainable")))


# The adapters' own bytes are taken equal to their gradients' (a gradient has its parameter's dtype).
def bytes_per_trainable(results: Results, spec: dict, method: str) -> Observation | None:
    """(adapter weights + gradients + optimizer state) / trainable parameters."""
    return _per_trainable(results, spec, method, lambda gradients, state, n: (2 * gradients + state) / n)


def gradient_dtype(results: Results, spec: dict, method: str) -> Observation | None:
    """Whether every experiment's gradients take as many bytes as its weights (full fine-tuning: one
    gradient per parameter, of the parameter's dtype); all of the spec's experiments must be there."""
    def ratio(persistent: dict | None) -> float | None:
        gradients, weights = _get(persistent, "gradients"), _get(persistent, "weights")
        return gradients / weights if gradients is not None and weights else None

    found = []
    for experiment in _experiments(spec):
        observation = _per_experiment(results, {**spec, "experiment": experiment}, method,
                                      lambda p, _: ratio(p.get("persistent")),
                                      lambda r: ratio(_get(r, "memory", "persistent")))
        if observation is None or observation.value is None:
            return None
        found.append((experiment, observation))
    tolerance = spec.get("tolerance", 0.01)
    holds = all(abs(observation.value - 1) <= tolerance for _, observation in found)
    note = "gradient bytes over weight bytes: " + ", ".join(f"{experiment} {observation.value:.3f}"
                                                             for experiment, observation in found)
    first = found[0][1]
    return Observation(None, method, ", ".join(o.source for _, o in found), first.device, note=note, holds=holds,
                       extra={"files": tuple(f for _, o in found for f in o.extra.get("files", ()))})


def bytes_per_trainable_at_half(results: Results, spec: dict, method: str) -> Observation | None:
    """(adapter + gradient at 2 B each + the optimizer state the evidence holds) / trainable parameters:
    the documents' 16-bit adapters, whatever dtype the run kept its adapters in."""
    observation = _per_trainable(results, spec, method, lambda gradients, state, n: (2 * 2 * n + state) / n)
    if observation is None or observation.value is None:
        return observation
    return replace(observation, extra={**observation.extra, "derived": (
        f"2 B of 16-bit adapter + 2 B of gradient per parameter + the optimizer state's "
        f"{observation.value - 4:.1f} B per parameter")})


def trainable_bytes(results: Results, spec: dict, method: str) -> Observation | None:
    """Adapter weights + gradients + optimizer state, in bytes."""
    return _per_trainable(results, spec, method, lambda gradients, state, n: 2 * gradients + state)


def state_over_half_adapter(results: Results, spec: dict, method: str) -> Observation | None:
    """Optimizer state over the trainable parameters held in 16 bits (2 B each): derived, whatever dtype the run
    kept its adapters in (peft's are fp32)."""
    observation = _per_trainable(results, spec, method, lambda gradients, state, n: state / (2 * n))
    if observation is None or observation.value is None:
        return observation
    return replace(observation, extra={**observation.extra, "derived": (
        f"the optimizer state's {observation.value * 2:.1f} B per parameter over a 16-bit adapter's 2 B")})


def moment_bytes(results: Results, spec: dict, method: str) -> Observation | None:
    """Bytes per stored value of AdamW's two moments, their quantization scales included: the optimizer
    state over twice the trained parameters (what one value of a low-precision format costs in a run)."""
    return _per_trainable(results, spec, method, lambda gradients, state, n: state / (2 * n))


def _base_bytes(persistent: dict | None) -> float | None:
    """Bytes of the frozen base: weights and constants less the adapters (sized as their gradients)."""
    weights, constants, gradients = (_get(persistent, k) for k in ("weights", "quant_constants", "gradients"))
    if weights is None or constants is None or gradients is None:
        return None
    return weights + constants - gradients


def _bits_per_parameter(results: Results, spec: dict, method: str, bytes_of) -> Observation | None:
    """8 x bytes_of(persistent memory) / total parameters, from a prediction or a record."""
    def bits(persistent, total):
        numerator = bytes_of(persistent)
        return 8 * numerator / total if numerator is not None and total else None

    return _per_experiment(
        results, spec, method,
        lambda p, res: bits(p.get("persistent"), _get(_analytic_parameters(res, p), "total")),
        lambda r: bits(_get(r, "memory", "persistent"), _get(r, "parameters", "total")))


def base_bits(results: Results, spec: dict, method: str) -> Observation | None:
    return _bits_per_parameter(results, spec, method, _base_bytes)


def constant_bits(results: Results, spec: dict, method: str) -> Observation | None:
    return _bits_per_parameter(results, spec, method, lambda persistent: _get(persistent, "quant_constants"))


def premise_bytes(results: Results, spec: dict, method: str) -> Observation | None:
    """The documents' own arithmetic on their premise: our parameter count x the bytes per
    parameter the premise assumes (`bytes_per_parameter`), e.g. int8 weights and int8 gradients."""
    per_parameter = spec["bytes_per_parameter"]
    # a prediction's own count only: a simulated file without one would show the analytic count as "simulated"
    observation = _per_experiment(
        results, spec, method,
        lambda p, _: _get(p, "parameters", "total"),
        lambda r: _get(r, "parameters", "total"))
    if observation is None or observation.value is None:
        return observation
    note = f"{observation.value:,.0f} parameters x {per_parameter:g} B"
    derived = f"the parameter count of the run, {observation.value:,.0f}, x {per_parameter:g} B"
    return as_counted(replace(observation, value=observation.value * per_parameter, note=note,
                              extra={**observation.extra, "derived": derived}), spec)


def nf4_weight_bits(results: Results, spec: dict, method: str) -> Observation | None:
    """Bits per NF4-quantized weight: the 4-bit code plus its quantization constants, over the
    weights that are quantized (the projections), not the unquantized embeddings and head."""
    def bits(persistent, counts):
        constants, quantized = _get(persistent, "quant_constants"), _get(counts, "quantized")
        return 4 + 8 * constants / quantized if constants is not None and quantized else None

    def counts_of(run: dict) -> dict | None:  # a record's quantized count is its analytic twin's
        return _analytic_parameters(results, {"experiment": run.get("experiment"), "model": run.get("model")})

    observation = _per_experiment(
        results, spec, method,
        lambda p, res: bits(p.get("persistent"), _analytic_parameters(res, p)),
        lambda r: bits(_get(r, "memory", "persistent"), counts_of(r)))
    if observation is not None and observation.value is not None:
        observation = replace(observation, note=f"4 bits of code + {observation.value - 4:.3f} bits of constants")
    return observation


def _ratio(results: Results, spec: dict, method: str, quantity) -> Observation | None:
    """quantity(spec's experiment) / quantity(spec's `over` experiment), same model and shape."""
    numerator = quantity(results, spec, method)
    denominator = quantity(results, {**spec, "experiment": spec["over"]}, method)
    if numerator is None or denominator is None or numerator.value is None or not denominator.value:
        return None
    shapes = [o.extra.get("configuration") for o in (numerator, denominator)]
    if shapes[0] is not None and shapes[1] is not None and shapes[0] != shapes[1]:
        return None  # never a ratio of unlike runs
    source = f"{numerator.source} over {spec['over']}"
    unit = spec.get("of", "")
    note = f"{fmt_value(numerator.value, unit)} against {fmt_value(denominator.value, unit)}" if unit else ""
    files = numerator.extra.get("files", ()) + denominator.extra.get("files", ())
    return Observation(numerator.value / denominator.value, method, source, numerator.device, note=note,
                       extra={"files": files})


def peak_ratio(results: Results, spec: dict, method: str) -> Observation | None:
    return _ratio(results, {**spec, "of": "bytes"}, method, peak)


def category_ratio(results: Results, spec: dict, method: str) -> Observation | None:
    return _ratio(results, {**spec, "of": "bytes"}, method, category)


def adapter_file_ratio(results: Results, spec: dict, method: str) -> Observation | None:
    """The adapter file a run saved over the `over` run's weights in memory (what a full fine-tune's
    checkpoint holds): the fine-tune's own footprint on disk."""
    if method not in RECORD_METHODS:
        return None
    saved = _per_experiment(results, spec, method, lambda p, res: None, lambda r: r.get("adapter_bytes_on_disk"))
    weights = category(results, {**spec, "experiment": spec["over"], "category": "weights"}, method)
    if saved is None or weights is None or saved.value is None or not weights.value:
        return None
    if saved.extra.get("configuration") != weights.extra.get("configuration"):
        return None  # never a ratio of unlike runs
    return Observation(saved.value / weights.value, method, f"{saved.source} over {spec['over']}", saved.device,
                       note=f"adapter file {fmt_bytes(saved.value)} against {fmt_bytes(weights.value)} of weights")


def tokens_per_second(results: Results, spec: dict, method: str) -> Observation | None:
    if method != "gpu":  # a speed means something only on a GPU
        return None
    return _per_experiment(results, spec, method, lambda p, res: None,
                           lambda r: _get(r, "throughput", "tokens_per_s"))


def _tokens_per_second_range(results: Results, spec: dict, experiment: str) -> tuple[float, float] | None:
    """Tokens/s of the slowest and the fastest timed step of the GPU run tokens_per_second reads."""
    for record in select_records(results, spec, "gpu", experiment):
        throughput = record.get("throughput") or {}
        if record.get("status") != "ok" or throughput.get("tokens_per_s") is None:
            continue
        times, tokens = throughput.get("step_time_s") or {}, throughput.get("tokens_per_step")
        return (tokens / times["max"], tokens / times["min"]) if tokens and times.get("min") else None
    return None


def throughput_ratio(results: Results, spec: dict, method: str) -> Observation | None:
    """The ratio of two runs' tokens/s, with the range their slowest and fastest steps allow: a difference is
    called only where that range leaves out 1."""
    observation = _ratio(results, {**spec, "of": "tokens_per_s"}, method, tokens_per_second)
    if observation is None or method != "gpu":
        return observation
    ranges = [_tokens_per_second_range(results, spec, name) for name in (_experiments(spec)[0], spec["over"])]
    if None in ranges:
        return observation
    (ours_slow, ours_fast), (over_slow, over_fast) = ranges
    low, high = ours_slow / over_fast, ours_fast / over_slow
    spread = (f"{low:.2f}-{high:.2f} from the runs' slowest and fastest steps: "
              + ("within that spread, no difference shown" if low <= 1 <= high else "a difference beyond that spread"))
    return replace(observation, note="; ".join(filter(None, (observation.note, spread))),
                   extra={**observation.extra, "spread": [low, high]})


def max_micro_batch(results: Results, spec: dict, method: str) -> Observation | None:
    """The largest micro-batch that fits a card (the fit table's, at its sequence length): "analytic", the formula's
    answer; "simulated", the answer the simulation confirmed (the caching allocator replayed under the card's cap),
    where it confirmed the largest. Of the spec's experiment, or of every recipe the table has for the model where
    it names none; `checkpointing` true, false, or "any" (with or without)."""
    if method not in PREDICTION_METHODS or not results.fits:
        return None
    table, names, checkpointing = results.fits, _experiments(spec), spec.get("checkpointing")
    rows = [row for row in table["rows"]
            if row["model"] == spec["model"] and int(row["card_gb"]) == int(spec["card_gb"])
            and (not names or row["experiment"] in names)
            and (checkpointing == "any" or bool(row["gradient_checkpointing"]) == bool(checkpointing))]
    if not rows:
        return None

    def answer(row: dict) -> int:
        # a table made before micro-batches were confirmed holds only the formula's answer
        return row.get("analytic_max_micro_batch", row["max_micro_batch"]) if method == "analytic" else \
            row["max_micro_batch"]
    row = max(rows, key=answer)  # the first of the table's order among equals
    if method == "simulated" and row.get("micro_batch_method") != "simulated":
        return None  # the largest is the formula's alone: nothing simulated to show
    with_or_without = "with" if row["gradient_checkpointing"] else "without"
    source = (f"{row['experiment']} @ {row['model']}, seq {table['micro_batch_seq_len']:,}, {with_or_without} "
              f"checkpointing, {row['card_gb']} GB card")
    if len(rows) > 1:
        source += f"; the most of the fit table's {len(rows)} recipes at this model and card"
    return Observation(float(answer(row)), method, source,
                       note=f"longest sequence at micro-batch 1: {row['max_seq_len']:,}")


def accumulation_extra(results: Results, spec: dict, method: str) -> Observation | None:
    """Peak memory across accumulation steps k at a fixed micro-batch: max over k of peak(k)/peak(1) - 1."""
    if method not in RECORD_METHODS:
        return None
    groups: dict[tuple, dict[int, float]] = {}
    for experiment in _experiments(spec):
        for record in select_records(results, {**spec, "any_model": True, "any_grad_accum": True}, method,
                                     experiment):
            config = record.get("config") or {}
            value = _peak_of_record(record)
            if record.get("status") != "ok" or value is None:
                continue
            key = (record["model"], config.get("seq_len"), config.get("micro_batch"),
                   config.get("gradient_checkpointing"), device_label(record))
            groups.setdefault(key, {}).setdefault(int(config.get("grad_accum", 1)), value)
    usable = {key: peaks for key, peaks in groups.items() if 1 in peaks and len(peaks) >= 2}
    if not usable:
        return None
    key = max(sorted(usable), key=lambda k: len(usable[k]))
    peaks = usable[key]
    extra = max(peaks.values()) / peaks[1] - 1
    model, seq, batch = key[0], key[1], key[2]
    ks = ", ".join(str(k) for k in sorted(peaks))
    return Observation(extra, method, f"{_experiments(spec)[0]} @ {model}, seq {seq} x {batch}, k = {ks}",
                       key[4], note=f"peak {fmt_bytes(min(peaks.values()))} to {fmt_bytes(max(peaks.values()))}",
                       extra={"peaks": peaks})


# A card counts as full when NVML saw this share of it in use at the run's peak: the lab's choice of
# "under real pressure", where the CUDA driver starts to evict unified (paged) memory to the host.
FULL_CARD_SHARE = 0.95


def _card_was_full(record: dict) -> bool:
    used, total = _get(record, "memory", "peak_device_used"), _get(record, "environment", "device_total_bytes")
    return bool(used and total and used >= FULL_CARD_SHARE * total)


def paged_state(results: Results, spec: dict, method: str) -> Observation | None:
    """Paged 8-bit AdamW on CUDA: how much of the optimizer state the torch allocator never saw.

    The tracked step counts every live tensor, paged ones included; the allocator's peak leaves
    out memory bitsandbytes takes from CUDA unified memory itself.
    """
    if method != "gpu":
        return None
    for experiment in _experiments(spec):
        for record in select_records(results, {**spec, "any_model": True}, method, experiment):
            memory = record.get("memory") or {}
            state = _get(memory, "persistent", "optimizer_state")
            tracked, allocated = memory.get("tracked_step_peak"), memory.get("peak_allocated")
            if record.get("status") != "ok" or not state or tracked is None or allocated is None:
                continue
            if spec.get("under_pressure") and not _card_was_full(record):
                continue  # paging answers a full card: a run with room to spare cannot show it
            outside = max(tracked - allocated, 0) / state
            note = (f"tracked peak {fmt_bytes(tracked)} vs allocator peak {fmt_bytes(allocated)}; "
                    f"optimizer state {fmt_bytes(state)}")
            return Observation(outside, method, _describe_record(record), device_label(record), note=note,
                               holds=outside >= spec.get("threshold", 0.5))
    return None


def quantization_balance(results: Results, spec: dict, method: str) -> Observation | None:
    """Memory against accuracy, for each quantized experiment against its unquantized `over`: the peak
    ratio at the spec's model and shape (from `method`'s evidence), and the held-out loss of the same
    pair fine-tuned on the lab's pretrained base (records, loss.py; loss is never predicted). True where
    quantizing saves memory; the caveat says what the loss shows of the accuracy it costs."""
    memory, losses, files = [], [], ()
    for experiment in _experiments(spec):
        ratio = peak_ratio(results, {**spec, "experiment": experiment}, method)
        if ratio is None or ratio.value is None:
            return None  # every quantized experiment's memory, or no answer
        memory.append((experiment, ratio))
        files += ratio.extra.get("files", ())
        losses += [c for c in loss_parity(results.records, results.folded_records)
                   if c.record.get("experiment") == experiment
                   and c.reference is not None and c.reference.get("experiment") == spec["over"]]
    holds = all(ratio.value < 1 for _, ratio in memory)
    where = "measured" if method == "gpu" else method
    parts = [f"{experiment}'s peak is {ratio.value:.2f}x {spec['over']}'s at {spec['model']} ({where})"
             for experiment, ratio in memory]
    parts += [f"{c.record.get('experiment')}'s held-out loss on the lab's pretrained base is {c.loss:.4f} against "
              f"{spec['over']}'s {c.reference_loss:.4f} ({c.verdict.error:+.2%}, tolerance +{c.rule.tolerance:.0%}; "
              f"{device_label(c.record) if is_gpu_record(c.record) else 'a CPU run'})" for c in losses]
    files += tuple(c.record.get("_file") for c in losses) + tuple(c.reference.get("_file") for c in losses)
    if not losses:
        caveat = (f"the accuracy side is not measured: no fine-tune of the lab's pretrained base compares "
                  f"{', '.join(_experiments(spec))} with {spec['over']}")
    elif all(c.verdict.kind == HOLDS for c in losses):
        caveat = ("the accuracy cost did not show: fine-tuning the lab's small pretrained base, the quantized "
                  "runs' held-out loss is within their tolerance of the unquantized run's, so the memory came "
                  "at no cost the lab could measure; its base is far smaller than 7B, the scale at which "
                  "LLM.int8's authors found the outlier features that plain 8-bit rounding loses (arXiv "
                  "2208.07339); the balance the lab does show is inside one format, clipping against rounding "
                  "(Q-levels)")
    else:
        caveat = None  # both sides measured: memory saved, accuracy lost beyond the tolerance
    first = memory[0][1]
    return Observation(None, method, "; ".join(ratio.source for _, ratio in memory), first.device,
                       note="; ".join(parts), holds=holds, caveat=caveat,
                       extra={"files": tuple(dict.fromkeys(f for f in files if f))})


# --- probes -------------------------------------------------------------------------------------

def _probe(results: Results, name: str, method: str) -> dict | None:
    return results.probes.get(name) if method == "probe" else None


def format_bits(results: Results, spec: dict, method: str) -> Observation | None:
    probe = _probe(results, "number_formats", method)
    formats = _get(probe, "formats")
    if not formats or not all(k in formats for k in ("fp32", "bf16", "fp16")):
        return None
    fp32, bf16, fp16 = formats["fp32"], formats["bf16"], formats["fp16"]
    holds = (bf16["exponent_bits"], bf16["fraction_bits"], fp16["exponent_bits"], fp16["fraction_bits"]) == (8, 7, 5, 10)
    same_range = (abs(bf16["max"] / fp32["max"] - 1) <= spec.get("range_tolerance", 0.01)
                  and bf16["smallest_normal"] == fp32["smallest_normal"])
    holds = holds and same_range
    note = (f"bf16 {bf16['exponent_bits']}/{bf16['fraction_bits']} bits, max {bf16['max']:.3g} "
            f"(fp32 {fp32['max']:.3g}); fp16 {fp16['exponent_bits']}/{fp16['fraction_bits']} bits, max {fp16['max']:g}")
    return Observation(None, method, probe["_file"], probe.get("device"), note=note, holds=holds)


def format_counts(results: Results, spec: dict, method: str) -> Observation | None:
    """The documents' '±65k' (16 bits) and '±2 billion' (fp32) read as counts of values: true when
    2^16 bit patterns and fp32's finite values per sign are within the tolerance of them. Whether
    a count is what separates the formats is the claim's caveat (bf16 has fp16's count)."""
    probe = _probe(results, "number_formats", method)
    formats = _get(probe, "formats")
    if not formats or not all(name in formats for name in ("fp16", "bf16", "fp32")):
        return None
    # "±N distinct values" read the same way for both formats: N values of each sign.
    patterns_16 = 2 ** formats["fp16"]["bits"]
    per_sign_16 = formats["fp16"]["finite_values"] / 2
    per_sign_32 = formats["fp32"]["finite_values"] / 2
    tolerance = spec.get("tolerance", 0.10)
    holds_16, holds_32 = abs(65e3 / per_sign_16 - 1) <= tolerance, abs(2e9 / per_sign_32 - 1) <= tolerance
    holds = holds_16 and holds_32
    note = (f"per sign, fp16 has {per_sign_16:,.0f} finite values ({'matches' if holds_16 else 'not'} \"±65k\"; "
            f"{patterns_16:,} bit patterns over both signs, and {formats['fp16']['max']:,.0f} is its largest value) and fp32 "
            f"{per_sign_32:,.0f} ({'matches' if holds_32 else 'not'} \"±2 billion\"); bf16 has "
            f"{formats['bf16']['finite_values'] / 2:,.0f} per sign, largest {formats['bf16']['max']:.3g}")
    return Observation(None, method, probe["_file"], probe.get("device"), note=note, holds=holds)


def format_range(results: Results, spec: dict, method: str) -> Observation | None:
    """fp16's range is narrower than bf16's at both ends (largest value, smallest normal)."""
    probe = _probe(results, "number_formats", method)
    formats = _get(probe, "formats")
    if not formats or "fp16" not in formats or "bf16" not in formats:
        return None
    fp16, bf16 = formats["fp16"], formats["bf16"]
    holds = fp16["max"] < bf16["max"] and fp16["smallest_normal"] > bf16["smallest_normal"]
    note = (f"fp16 from {fp16['smallest_normal']:.3g} to {fp16['max']:g}; bf16 from {bf16['smallest_normal']:.3g} "
            f"to {bf16['max']:.3g}")
    return Observation(None, method, probe["_file"], probe.get("device"), note=note, holds=holds)


def quantization_tradeoff(results: Results, spec: dict, method: str) -> Observation | None:
    """255 levels, and an error minimum strictly inside the swept clipping range."""
    probe = _probe(results, "quantization_error", method)
    sweep = sorted(_get(probe, "int8_absmax") or [], key=lambda row: row["clip_ratio"])
    if not sweep:
        return None
    best = min(sweep, key=lambda row: row["relative_rmse"])
    interior = best["clip_ratio"] < sweep[-1]["clip_ratio"] and best["relative_rmse"] < sweep[-1]["relative_rmse"]
    clipped_worse = sweep[0]["relative_rmse"] > best["relative_rmse"]
    levels = probe.get("int8_levels")
    holds = levels == 255 and interior and clipped_worse
    weights = probe.get("weights") or {}
    note = (f"{levels} levels; error {sweep[0]['relative_rmse']:.3g} at clip {sweep[0]['clip_ratio']:g}, "
            f"minimum {best['relative_rmse']:.3g} at clip {best['clip_ratio']:g}, "
            f"{sweep[-1]['relative_rmse']:.3g} at clip {sweep[-1]['clip_ratio']:g} (of max|w|)")
    caveat = None if weights.get("trained") else (
        f"swept on untrained weights ({weights.get('source', 'random init')}); trained weights have outliers "
        "that move the best threshold lower")
    return Observation(float(levels) if levels is not None else None, method, probe["_file"], probe.get("device"),
                       note=note, holds=holds, caveat=caveat)


def accumulation_error(results: Results, spec: dict, method: str) -> Observation | None:
    probe = _probe(results, "accumulation_equivalence", method)
    rows = _get(probe, "rows") or []
    if not rows:
        return None
    error = max(row["max_relative_gradient_error"] for row in rows)
    loss = max(abs(row["loss_difference"]) for row in rows)
    ks = ", ".join(str(row["k"]) for row in rows)
    note = (f"k = {ks} at micro-batch {probe.get('micro_batch')} ({probe.get('model')}): largest relative "
            f"gradient difference {error:.2g}, loss difference {loss:.2g}")
    uneven = probe.get("uneven")
    caveat = None if not uneven else (
        f"only where every micro-batch counts the same number of tokens: with unequal counts "
        f"({', '.join(map(str, uneven['tokens_counted']))} tokens in k = {uneven['k']} micro-batches), averaging "
        f"each micro-batch's mean loss gives gradients {uneven['mean_of_means_error']:.2g} off, while dividing "
        f"the summed token losses by the whole batch's count (transformers' num_items_in_batch) is "
        f"{uneven['token_count_error']:.2g} off")
    return Observation(error, method, probe["_file"], probe.get("device"), note=note, caveat=caveat)


QUANTITIES = {
    "category": category, "categories_sum": categories_sum, "excess": excess, "peak": peak,
    "min_peak": min_peak, "peak_reserved": peak_reserved, "excess_peak": excess_peak,
    "trainable_fraction": trainable_fraction,
    "bytes_per_trainable": bytes_per_trainable, "bytes_per_trainable_at_half": bytes_per_trainable_at_half,
    "gradient_dtype": gradient_dtype,
    "trainable_bytes": trainable_bytes,
    "state_over_half_adapter": state_over_half_adapter, "base_bits": base_bits, "constant_bits": constant_bits,
    "accumulation_extra": accumulation_extra, "paged_state": paged_state, "premise_bytes": premise_bytes,
    "nf4_weight_bits": nf4_weight_bits, "peak_ratio": peak_ratio, "throughput_ratio": throughput_ratio,
    "max_micro_batch": max_micro_batch, "category_ratio": category_ratio, "adapter_file_ratio": adapter_file_ratio,
    "phase_peak": phase_peak, "moment_bytes": moment_bytes, "quantization_balance": quantization_balance,
    "format_bits": format_bits, "format_counts": format_counts, "format_range": format_range,
    "quantization_tradeoff": quantization_tradeoff, "accumulation_error": accumulation_error,
}
PROBE_QUANTITIES = {"format_bits", "format_counts", "format_range", "quantization_tradeoff", "accumulation_error"}


def observe(results: Results, spec: dict, method: str) -> Observation | None:
    if spec.get("gpu_only") and method != "gpu":
        return None
    return QUANTITIES[spec["quantity"]](results, spec, method)
