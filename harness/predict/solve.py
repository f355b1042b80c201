"""`harness predict --solve seq_len|micro_batch`: the longest sequence, or the largest
micro-batch, whose training step fits a card.

A step fits when its predicted device bytes do not exceed the card's bytes: the caching allocator's
reserved bytes and what lives outside the allocator (the CUDA context, the kernels loaded), see
harness.device_memory. The analytic method's reserved bytes are its peak times a calibrated
ratio (device_memory.ANALYTIC_RESERVED_RATIO); the simulation's replay the allocator over the step.

The analytic device bytes are searched first (instant, and non-decreasing in both axes): doubling
until the step no longer fits, then bisection. The simulation (the runner's own step under
fake tensors) then checks the answer and its neighbour one up; where it disagrees, the
analytic curve shifted by the simulation's offset gives the next guess, and a gallop and a
bisection on simulations settle the boundary. The answer names the method that decided it.

An answer sizes a step on trained weights, what a fine-tune starts from (RANDOM_WEIGHTS): where values
change the bytes (LLM.int8's outlier columns, harness.predict.outliers) the lab's random-init runs hold
more than it counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from harness.cards import card_bytes
from harness.matrix import ALLOCATOR_SETTINGS
from harness.measure.budget import card_cap_bytes

if TYPE_CHECKING:
    from harness.config import ResolvedConfig

AXES = ("seq_len", "micro_batch")
RANDOM_WEIGHTS = False  # see the module's text
# Past a model's context a longer sequence means position scaling, not this step: the search
# stops there and says so. A micro-batch has no such limit; this one only bounds the search.
MICRO_BATCH_LIMIT = 1 << 16
REFERENCE_SHAPE = (512, 1)  # the documents' configuration: the peak the table shows beside the answers
# an allocator setting other than torch's default, as an answer names it: the variable a run sets for it
ALLOCATOR_WORDS = {name: f", with PYTORCH_CUDA_ALLOC_CONF={conf}" for name, conf in ALLOCATOR_SETTINGS.items()}


@dataclass
class Answer:
    """The largest value of the axis that fits (0: not even 1 fits) and the device bytes around it."""
    value: int
    peak_bytes: int | None        # predicted device bytes at value (None when value is 0)
    next_peak_bytes: int | None   # at value + 1 (None when the search stopped at its limit)
    limited_by: str               # "card", "context" (the model's max_position_embeddings) or "search limit"
    evaluations: int = 0


def largest_fitting(peak: Callable[[int], int], cap: int, limit: int, start: int = 1) -> Answer:
    """The largest n in [1, limit] with peak(n) <= cap, for a non-decreasing peak: from `start`,
    gallop (steps 1, 2, 4, ...) towards the boundary, then bisect."""
    seen: dict[int, int] = {}

    def value(n: int) -> int:
        if n not in seen:
            seen[n] = peak(n)
        return seen[n]

    start = min(max(start, 1), limit)
    if value(start) <= cap:
        lo, hi, step = start, None, 1
        while hi is None:
            n = min(lo + step, limit)
            if n == lo:
                break
            if value(n) <= cap:
                lo, step = n, step * 2
            else:
                hi = n
    else:
        hi, lo, step = start, None, 1
        while lo is None:
            n = max(hi - step, 1)
            if value(n) <= cap:
                lo = n
            elif n == 1:
                return Answer(0, None, value(1), "card", len(seen))
            else:
                hi, step = n, step * 2
    while hi is not None and hi - lo > 1:
        middle = (lo + hi) // 2
        if value(middle) <= cap:
            lo = middle
        else:
            hi = middle
    at_limit = hi is None
    return Answer(lo, value(lo), None if at_limit else value(lo + 1), "search limit" if at_limit else "card",
                  len(seen))


@dataclass
class Setup:
    """An experiment at a model, resolved once: its analytic peak (tensor bytes) and device bytes at any
    (sequence, micro-batch), with the caching allocator set as `allocator` says (another setting of the same
    step: dataclasses.replace, which shares the predictions made)."""
    config: ResolvedConfig
    context: int | None   # the model's max_position_embeddings
    predicted: Callable[[int, int], dict]  # (seq_len, micro_batch) -> the analytic prediction, memoized
    device_type: str = "cuda"
    model_config: object = None  # transformers' config of the model
    parameters: dict | None = None  # total, trainable and quantized (the analytic prediction's)
    unified_bytes: int = 0  # a paged optimizer's state in CUDA unified memory (harness.device_memory)
    allocator: str = "default"  # the caching allocator's setting the device bytes are for (allocator.SETTINGS)

    def peak(self, seq_len: int, micro_batch: int) -> int:
        return self.predicted(seq_len, micro_batch)["total_bytes"]

    def device(self, seq_len: int, micro_batch: int) -> int:
        from harness.device_memory import analytic_device

        if self.device_type != "cuda":  # a CPU step: its tensors are what it holds
            return self.peak(seq_len, micro_batch)
        return analytic_device(self.predicted(seq_len, micro_batch), self.config.technique, self.allocator)[1]


def setup(experiment: Path, model: str, overrides: dict | None = None, device_type: str = "cuda",
          allocator: str = "default") -> Setup:
    from harness.config import resolve
    from harness.predict.analytic import predict as analytic_predict
    from harness.step.models import resolve_source

    config = resolve(experiment, {**(overrides or {}), "model": model, "device": "cpu"})
    cfg, technique = config.experiment, config.technique
    source = resolve_source(model, cfg.trust_remote_code, device_type)
    memo: dict[tuple[int, int], dict] = {}

    def predicted(seq_len: int, micro_batch: int) -> dict:
        if (seq_len, micro_batch) not in memo:
            memo[seq_len, micro_batch] = analytic_predict(source.config, technique, cfg, seq_len, micro_batch,
                                                          device_type, RANDOM_WEIGHTS)
        return memo[seq_len, micro_batch]
    reference = analytic_predict(source.config, technique, cfg, *REFERENCE_SHAPE, device_type)
    return Setup(config, getattr(source.config, "max_position_embeddings", None), predicted, device_type,
                 source.config, reference["parameters"], reference["unified_bytes"], allocator)


def _limit(axis: str, context: int | None) -> int:
    return (context or MICRO_BATCH_LIMIT) if axis == "seq_len" else MICRO_BATCH_LIMIT


def longest_sequence(found: Setup, card_gb: float, micro_batch: int = 1) -> Answer:
    """The fit answer: the longest sequence whose analytic device bytes fit a card as sold (harness.cards)."""
    return largest_fitting(lambda n: found.device(n, micro_batch), card_bytes(card_gb), _limit("seq_len", found.context))


def largest_micro_batch(found: Setup, card_gb: float, seq_len: int) -> Answer:
    """The fit answer on the other axis: the largest micro-batch at `seq_len` whose analytic device bytes fit a
    card as sold."""
    return largest_fitting(lambda n: found.device(seq_len, n), card_bytes(card_gb), _limit("micro_batch", found.context))


def solve(experiment: Path, model: str, card_gb: float, axis: str, *, seq_len: int = 512, micro_batch: int = 1,
          overrides: dict | None = None, device_type: str = "cuda", simulate: bool = True,
          allocator: str = "default") -> dict:
    """Solve one axis for an experiment file and a model on a card, its caching allocator set as `allocator` says
    (harness.predict.allocator.SETTINGS); the other axis stays fixed."""
    if axis not in AXES:
        raise ValueError(f"--solve: expected one of {', '.join(AXES)}, got {axis!r}")
    started = time.perf_counter()
    found_setup = setup(experiment, model, overrides, device_type, allocator)
    config, context = found_setup.config, found_setup.context
    limit = _limit(axis, context)
    cap = card_bytes(card_gb)  # what the predicted device bytes must fit

    def shape(n: int) -> tuple[int, int]:
        return (n, micro_batch) if axis == "seq_len" else (seq_len, n)

    def analytic(n: int) -> int:
        return found_setup.device(*shape(n))

    found = largest_fitting(analytic, cap, limit)
    result = {
        "axis": axis, "experiment": config.name, "model": model, "card_gb": card_gb,
        "card_bytes": card_bytes(card_gb), "cap_bytes": cap, "device_type": device_type, "allocator": allocator,
        "gradient_checkpointing": config.experiment.gradient_checkpointing,
        "fixed": {"micro_batch": micro_batch} if axis == "seq_len" else {"seq_len": seq_len},
        "analytic": _answer_dict(found, axis, context, limit),
    }
    decided = found
    if simulate:
        allocator_cap = card_cap_bytes(card_gb, config.technique, found_setup.unified_bytes)
        decided = _confirm_by_simulation(experiment, model, shape, overrides or {}, device_type, cap, limit,
                                         found, analytic, allocator_cap, allocator)
        result["simulated"] = _answer_dict(decided, axis, context, limit)
    result.update({"method": "simulated" if simulate else "analytic", f"max_{axis}": decided.value,
                   **{k: v for k, v in result["simulated" if simulate else "analytic"].items() if k != "value"},
                   "device_bytes": decided.peak_bytes,
                   "margin_bytes": None if decided.peak_bytes is None else cap - decided.peak_bytes,
                   "seconds": time.perf_counter() - started})
    return result


@dataclass
class Simulated:
    """A step simulated under a card's cap: the device bytes it holds (more than the card where it runs
    out) and, where it runs out, about what it would have needed there (the allocator's reserved bytes when
    the request failed, the request, and what lives outside the allocator)."""
    fits: bool
    device_bytes: int
    needed_bytes: int


def simulate_under_card(experiment: Path, model: str, seq_len: int, micro_batch: int, overrides: dict,
                        device_type: str, cap: int, allocator_cap: int, allocator: str = "default") -> Simulated:
    """The simulated step (harness.predict.prediction, the runner's own step under fake tensors) with its
    caching allocator, set as `allocator` says, replayed under the card's cap for it (the card less what lives
    outside the allocator, a paged optimizer's unified memory too): where the allocator cannot have a new
    segment it frees its cached ones and tries again (harness.predict.allocator), and runs out only after that."""
    from harness.predict.prediction import predict

    prediction = predict(experiment, model, seq_len, micro_batch, "simulated", device_type, overrides,
                         allocator=allocator, cap_bytes=allocator_cap, random_weights=RANDOM_WEIGHTS)
    if prediction.device_bytes is None:  # a CPU step: its tensors are what it holds
        held = prediction.total_bytes
        return Simulated(held <= cap, held, held)
    outside = prediction.device_bytes - prediction.reserved_bytes
    capped = prediction.extra["budget_replay"]
    if capped["oom"]:
        needed = capped["oom"]["reserved"] + capped["oom"]["requested"] + outside
        return Simulated(False, max(prediction.device_bytes, cap + 1), max(needed, cap + 1))
    held = capped["peak_reserved"] + outside
    return Simulated(held <= cap, held, held)


def _confirm_by_simulation(experiment, model, shape, overrides, device_type, cap, limit, analytic_answer,
                           analytic, allocator_cap: int, allocator: str) -> Answer:
    """The simulated boundary: a step fits when simulate_under_card says so; its device bytes are then that
    replay's reserved peak and what lives outside (more than the card where it runs out)."""
    def simulated(n: int) -> int:
        return simulate_under_card(experiment, model, *shape(n), overrides, device_type, cap,
                                   allocator_cap, allocator).device_bytes

    first_guess = max(analytic_answer.value, 1)
    memo = {first_guess: simulated(first_guess)}
    # Where the two methods differ by an offset, the analytic curve moved by it lands at the
    # simulated boundary: fewer simulations than a gallop from the analytic answer.
    offset = memo[first_guess] - analytic(first_guess)
    guess = largest_fitting(analytic, cap - offset, limit, start=first_guess).value or 1
    answer = largest_fitting(lambda n: memo[n] if n in memo else memo.setdefault(n, simulated(n)), cap, limit,
                             start=guess)
    answer.evaluations = len(memo)
    return answer


def sequence_limited_by(answer: Answer, found: Setup) -> str:
    """What ends a longest-sequence answer: "card", "context" (the model's) or "search limit"."""
    return _answer_dict(answer, "seq_len", found.context, _limit("seq_len", found.context))["limited_by"]


def _answer_dict(answer: Answer, axis: str, context: int | None, limit: int) -> dict:
    limited_by = answer.limited_by
    if limited_by == "search limit" and axis == "seq_len" and context == limit:
        limited_by = "context"
    return {"value": answer.value, "peak_bytes": answer.peak_bytes, "next_peak_bytes": answer.next_peak_bytes,
            "limited_by": limited_by, "evaluations": answer.evaluations}


def describe(result: dict) -> str:
    axis, value = result["axis"], result[f"max_{result['axis']}"]
    unit = "tokens" if axis == "seq_len" else "sequences"
    fixed = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in result["fixed"].items())
    what = "longest sequence" if axis == "seq_len" else "largest micro-batch"
    head = (f"{result['experiment']} @ {result['model']}{' (gradient checkpointing)' if result['gradient_checkpointing'] else ''}"
            f" on a {result['card_gb']:g} GB card ({result['card_bytes'] / 2**30:.1f} GiB; predicted device bytes: "
            f"the allocator's reserved segments, the CUDA context, kernels and unified memory"
            f"{ALLOCATOR_WORDS.get(result.get('allocator'), '')}):")
    if value == 0:
        return (f"{head}\n  does not fit even at 1 {unit[:-1]} ({fixed}): device "
                f"{result['next_peak_bytes'] / 2**30:.2f} GiB ({result['method']})")
    lines = [head, f"  {what} that fits, at {fixed}: {value:,} {unit} (device {result['peak_bytes'] / 2**30:.2f} GiB, "
                   f"{result['margin_bytes'] / 2**30:.2f} GiB to spare, {result['method']})"]
    if result["next_peak_bytes"] is not None:
        lines.append(f"  {value + 1:,} {unit}: {result['next_peak_bytes'] / 2**30:.2f} GiB, does not fit")
    elif result["limited_by"] == "context":
        lines.append(f"  (the model's context, {value:,} tokens, is reached before the card is full)")
    else:
        lines.append(f"  (the search stopped at {value:,}: the card is still not full)")
    if result["method"] == "simulated":
        analytic = result["analytic"]
        lines.append(f"  analytic formula: {analytic['value']:,} {unit}; "
                     f"{result['simulated']['evaluations']} simulated steps, {result['seconds']:.0f} s")
    return "\n".join(lines)
