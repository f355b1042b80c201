"""The searches of what fits a card, in parts: a step's analytic device bytes at any shape (`Setup`), the
largest value of an axis whose bytes fit (`largest_fitting`, and the fit answers `longest_sequence` and
`largest_micro_batch`), and one step simulated under a card (`simulate_under_card`). `harness predict --solve`
(harness.predict.solve), the fit table (harness.predict.fit_table) and its confirmations by simulation
(harness.predict.confirm) are built from them.

A step fits when its predicted device bytes do not exceed the card's bytes: the caching allocator's
reserved bytes and what lives outside the allocator (the CUDA context, the kernels loaded), see
harness.device_memory. The analytic method's reserved bytes are its peak times a calibrated
ratio (device_memory.ANALYTIC_RESERVED_RATIO); the simulation's replay the allocator over the step.
The analytic device bytes are non-decreasing in both axes and instant: the search doubles until the step no
longer fits, then bisects.

An answer sizes a step on trained weights, what a fine-tune starts from (RANDOM_WEIGHTS): where values
change the bytes (LLM.int8's outlier columns, harness.predict.outliers) the lab's random-init runs hold
more than it counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from harness.cards import card_bytes
from harness.matrix import ALLOCATOR_SETTINGS

if TYPE_CHECKING:
    from harness.config import ResolvedConfig

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


def limited_by(answer: Answer, axis: str, context: int | None) -> str:
    """What ends an answer on `axis`: "card", "context" (the model's, a sequence's search limit) or "search limit"."""
    if answer.limited_by == "search limit" and axis == "seq_len" and context == _limit(axis, context):
        return "context"
    return answer.limited_by


def sequence_limited_by(answer: Answer, found: Setup) -> str:
    """What ends a longest-sequence answer: "card", "context" (the model's) or "search limit"."""
    return limited_by(answer, "seq_len", found.context)
