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
from harness.measure.budget import card_cap_bytes

if TYPE_CHECKING:
    from harness.config import ResolvedConfig

AXES = ("seq_len", "micro_batch")
RANDOM_WEIGHTS = False  # see the module's text
# Past a model's context a longer sequence means position scaling, not this step: the search
# stops there and says so. A micro-batch has no such limit; this one only bounds the search.
MICRO_BATCH_LIMIT = 1 << 16


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
    (sequence, micro-batch)."""
    config: ResolvedConfig
    context: int | None   # the model's max_position_embeddings
    peak: Callable[[int, int], int]
    device: Callable[[int, int], int]
    model_config: object = None  # transformers' config of the model
    parameters: dict | None = None  # total, trainable and quantized (the analytic prediction's)
    unified_bytes: int = 0  # a paged optimizer's state in CUDA unified memory (harness.device_memory)


def setup(experiment: Path, model: str, overrides: dict | None = None, device_type: str = "cuda") -> Setup:
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
    def peak(seq_len: int, micro_batch: int) -> int:
        return predicted(seq_len, micro_batch)["total_bytes"]
    def device(seq_len: int, micro_batch: int) -> int:
        from harness.device_memory import analytic_device

        if device_type != "cuda":  # a CPU step: its tensors are what it holds
            return peak(seq_len, micro_batch)
        return analytic_device(predicted(seq_len, micro_batch), technique)[1]
    reference = analytic_predict(source.config, technique, cfg, *REFERENCE_SHAPE, device_type)
    return Setup(config, getattr(source.config, "max_position_embeddings", None), peak, device, source.config,
                 reference["parameters"], reference["unified_bytes"])


def _limit(axis: str, context: int | None) -> int:
    return (context or MICRO_BATCH_LIMIT) if axis == "seq_len" else MICRO_BATCH_LIMIT


def longest_sequence(found: Setup, card_gb: float, micro_batch: int = 1) -> Answer:
    """The fit answer: the longest sequence whose analytic device bytes fit a card as sold (harness.cards)."""
    return largest_fitting(lambda n: found.device(n, micro_batch), card_bytes(card_gb), _limit("seq_len", found.context))


def fit_answer(experiment: Path, model: str, overrides: dict, device_type: str, card_gb: float,
               micro_batch: int) -> Answer:
    """The fit answer for an experiment file with these fields at a model (harness.matrix's fit_multiples)."""
    return longest_sequence(setup(experiment, model, overrides, device_type), card_gb, micro_batch)


def solve(experiment: Path, model: str, card_gb: float, axis: str, *, seq_len: int = 512, micro_batch: int = 1,
          overrides: dict | None = None, device_type: str = "cuda", simulate: bool = True) -> dict:
    """Solve one axis for an experiment file and a model on a card; the other axis stays fixed."""
    if axis not in AXES:
        raise ValueError(f"--solve: expected one of {', '.join(AXES)}, got {axis!r}")
    started = time.perf_counter()
    found_setup = setup(experiment, model, overrides, device_type)
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
        "card_bytes": card_bytes(card_gb), "cap_bytes": cap, "device_type": device_type,
        "gradient_checkpointing": config.experiment.gradient_checkpointing,
        "fixed": {"micro_batch": micro_batch} if axis == "seq_len" else {"seq_len": seq_len},
        "analytic": _answer_dict(found, axis, context, limit),
    }
    decided = found
    if simulate:
        allocator_cap = card_cap_bytes(card_gb, config.technique, found_setup.unified_bytes)
        decided = _confirm_by_simulation(experiment, model, shape, overrides or {}, device_type, cap, limit,
                                         found, analytic, allocator_cap)
        result["simulated"] = _answer_dict(decided, axis, context, limit)
    result.update({"method": "simulated" if simulate else "analytic", f"max_{axis}": decided.value,
                   **{k: v for k, v in result["simulated" if simulate else "analytic"].items() if k != "value"},
                   "device_bytes": decided.peak_bytes,
                   "margin_bytes": None if decided.peak_bytes is None else cap - decided.peak_bytes,
                   "seconds": time.perf_counter() - started})
    return result


def _confirm_by_simulation(experiment, model, shape, overrides, device_type, cap, limit, analytic_answer,
                           analytic, allocator_cap: int) -> Answer:
    """The simulated boundary. A card is a cap: where the allocator cannot have a new segment it frees its
    cached ones and tries again (harness.predict.allocator), so a step fits when the allocator replayed
    under the card's cap for it (the card less what lives outside the allocator, a paged optimizer's unified
    memory too) does not run out; its device bytes are then that replay's reserved peak and what lives
    outside (more than the card where it runs out)."""
    from harness.predict.prediction import predict

    def simulated(n: int) -> int:
        seq, batch = shape(n)
        prediction = predict(experiment, model, seq, batch, "simulated", device_type, overrides,
                             cap_bytes=allocator_cap, random_weights=RANDOM_WEIGHTS)
        if prediction.device_bytes is None:  # a CPU step: its tensors are what it holds
            return prediction.total_bytes
        outside = prediction.device_bytes - prediction.reserved_bytes
        capped = prediction.extra["budget_replay"]
        if capped["oom"]:
            return max(prediction.device_bytes, cap + 1)
        return capped["peak_reserved"] + outside

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
            f"the allocator's reserved segments, the CUDA context, kernels and unified memory):")
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


# The report's decision table: cards as sold, the models people fine-tune on them, every
# registered technique, with and without gradient checkpointing (a column, not a technique).
FIT_CARDS = (16, 24, 40, 80, 141)
FIT_MODELS = ("tinyllama-1.1b", "llama-3.2-3b", "phi-3-mini", "llama-2-7b", "mistral-7b", "qwen2.5-7b", "llama-3.1-8b",
              "mixtral-8x7b")
FIT_MICRO_BATCH_SEQ_LEN = 2048
REFERENCE_SHAPE = (512, 1)  # the documents' configuration: the peak the table shows beside the answers
# Configurations other projects publish "longest sequence per card" figures for (the report
# holds their figures under the same names): answered for every card of the table.
COMPARED_CASES = {
    "llama-3.1-8b qlora r32 + checkpointing": ("llama-3.1-8b", "qlora-r32-gc", {}),
}
FIT_TOKENS = 100e6  # the fine-tune whose GPU-hours and price (cost_usd) each row gives
CURVE_MODEL = "mistral-7b"  # a 7B model with a 32k context: peak against sequence length
# the sequence lengths of the curves, and of each row's device bytes at micro-batch 1 up to its longest sequence
# (`device_bytes_at`: what the report's picker shows for the length a reader picks)
CURVE_SEQ_LENS = tuple(512 * 2**i for i in range(9))  # 512 to 131,072 (Llama 3.1's context)


def fit_row_speed(found: Setup, card_gb: float, max_micro_batch: int, max_seq_len: int) -> dict:
    """A fit row's speed on the card of its size (harness.cards.CARD_OF_SIZE, named once in the
    table's `cards`) at the fastest shape the row
    allows (sequence FIT_MICRO_BATCH_SEQ_LEN at its largest micro-batch; else its longest sequence at
    micro-batch 1), and the time and price of fine-tuning FIT_TOKENS at the card's catalogue price. The
    analytic fallback (harness.predict.speed.analytic_speed: matmul FLOPs at the measured throughput, the
    optimizer step, dequantization; no host cost or other memory-bound kernels), as the rest of the table
    is analytic: an upper bound on tokens/s."""
    from harness.cards import CARD_OF_SIZE, card
    from harness.predict.speed import analytic_speed, fine_tune_cost

    gpu = CARD_OF_SIZE[card_gb]
    shape = ((FIT_MICRO_BATCH_SEQ_LEN, max_micro_batch) if max_micro_batch else
             (max_seq_len, 1) if max_seq_len else None)
    if shape is None:
        return {"speed_shape": None, "tokens_per_s": None, "step_time_s": None, "hours_per_100m_tokens": None,
                "cost_usd": None}
    cfg = found.config.experiment
    speed = analytic_speed(found.model_config, found.config.technique, shape[0], shape[1], cfg.grad_accum, gpu,
                           parameters=found.parameters, gradient_checkpointing=cfg.gradient_checkpointing)
    cost = fine_tune_cost(speed["tokens_per_s"], FIT_TOKENS, card(gpu).price_per_hour)
    return {"speed_shape": list(shape), "speed_method": speed["method"], "tokens_per_s": speed["tokens_per_s"],
            "step_time_s": speed["step_time_s"], "hours_per_100m_tokens": cost["hours"], "cost_usd": cost["cost_usd"]}


def fit_table_predictor() -> str:
    """The digest of what a fit table comes from: the predictor's and this module's choices, and the
    micro-benchmarks its speed column is calibrated from (harness.predict.speed.calibration_digest)."""
    import hashlib

    from harness import env
    from harness.imports import source_files
    from harness.predict.speed import calibration_digest

    return hashlib.sha256(f"{env.code_digest(source_files(__name__))} {calibration_digest()}".encode()).hexdigest()[:12]


def fit_table(experiments_dir: Path, device_type: str = "cuda"):
    """Every (model, technique, checkpointing, card) answer, by the analytic search (instant;
    `predict --solve` confirms any one of them by simulation)."""
    from harness import env, schema
    from harness.cards import CARD_OF_SIZE, CARDS
    from harness.techniques import TECHNIQUES

    started = time.perf_counter()
    experiments = [name for name in TECHNIQUES if (experiments_dir / f"{name}.yaml").exists()]
    rows, curves = [], []
    for model in FIT_MODELS:
        for name in experiments:
            for checkpointing in (False, True):
                found = setup(experiments_dir / f"{name}.yaml", model, {"gradient_checkpointing": checkpointing},
                              device_type)
                common = {"experiment": name, "model": model, "gradient_checkpointing": checkpointing}
                for card_gb in FIT_CARDS:
                    cap = card_bytes(card_gb)
                    longest = longest_sequence(found, card_gb)
                    largest = largest_fitting(lambda n: found.device(FIT_MICRO_BATCH_SEQ_LEN, n), cap,
                                              MICRO_BATCH_LIMIT)
                    # device_bytes and margin_bytes: at the longest sequence's answer (micro-batch 1)
                    # at the reference shape: the tensor peak, and what the card must hold (allocator, context)
                    rows.append({**common, "card_gb": card_gb, "reference_peak_bytes": found.peak(*REFERENCE_SHAPE),
                                 "reference_device_bytes": found.device(*REFERENCE_SHAPE),
                                 "max_seq_len": longest.value,
                                 "seq_len_limited_by": _answer_dict(longest, "seq_len", found.context,
                                                                    _limit("seq_len", found.context))["limited_by"],
                                 "max_micro_batch": largest.value, "device_bytes": longest.peak_bytes,
                                 "margin_bytes": None if longest.peak_bytes is None else cap - longest.peak_bytes,
                                 "micro_batch_device_bytes": largest.peak_bytes,
                                 "device_bytes_at": {str(seq): found.device(seq, 1) for seq in CURVE_SEQ_LENS
                                                     if seq <= longest.value},
                                 **fit_row_speed(found, card_gb, largest.value, longest.value)})
                if model == CURVE_MODEL:
                    curves += [{**common, "seq_len": seq, "total_bytes": found.peak(seq, 1),
                                "device_bytes": found.device(seq, 1)}
                               for seq in CURVE_SEQ_LENS if seq <= (found.context or seq)]
    cases = []
    for case, (model, name, overrides) in COMPARED_CASES.items():
        found = setup(experiments_dir / f"{name}.yaml", model, overrides, device_type)
        for card_gb in FIT_CARDS:
            answer = longest_sequence(found, card_gb)
            cases.append({"case": case, "experiment": name, "model": model, "card_gb": card_gb,
                          "max_seq_len": answer.value, "device_bytes": answer.peak_bytes,
                          "margin_bytes": None if answer.peak_bytes is None else card_bytes(card_gb) - answer.peak_bytes})
    return schema.FitTable(
        method="analytic", device_type=device_type, cases=cases,
        cards={str(gb): {"card_bytes": card_bytes(gb), "cap_bytes": card_bytes(gb), "gpu": CARD_OF_SIZE[gb],
                         "price_per_hour": CARDS[CARD_OF_SIZE[gb]].price_per_hour, "tokens": FIT_TOKENS}
               for gb in FIT_CARDS},
        micro_batch_seq_len=FIT_MICRO_BATCH_SEQ_LEN, reference_shape=list(REFERENCE_SHAPE), rows=rows, curves=curves,
        versions=env.software_versions(), predictor=fit_table_predictor(),
        seconds=time.perf_counter() - started)
