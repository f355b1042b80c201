"""The report's decision table, "what fits my card" (results/fits/what-fits__cuda.json): for cards as sold, the
models people fine-tune on them and every registered technique, with and without gradient checkpointing, the
longest sequence at micro-batch 1 and the largest micro-batch at one length, with the speed and price of
each row on the card of its size.

The answers are the analytic search's (harness.predict.search: instant); a longest sequence or a largest
micro-batch the card limits is the simulation's where a current confirmation of it lies under the results folder
(harness.predict.confirm, `harness predict --confirm-fits`), and each row says which method answered each.

Each row also answers its longest sequence with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
(`expandable_segments`), the usual cure where the caching allocator's segments fragment: what it buys,
answered by the same methods.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from harness.cards import card_bytes
from harness.predict.confirm import (CONFIRMED_FOLDER, Target, confirm_one, confirmed_answer,
                                     predictor_digest)
from harness.predict.search import REFERENCE_SHAPE, Answer, Setup, sequence_limited_by, setup

# the caching allocator's settings each row's longest sequence is answered for (harness.predict.allocator.SETTINGS):
# torch's default, whose answer the row gives, and this one, the row's `expandable_segments`
EXPANDABLE = "expandable_segments"

# The report's decision table: cards as sold, the models people fine-tune on them, every
# registered technique, with and without gradient checkpointing (a column, not a technique).
FIT_CARDS = (16, 24, 40, 80, 141)
FIT_MODELS = ("tinyllama-1.1b", "llama-3.2-3b", "phi-3-mini", "llama-2-7b", "mistral-7b", "qwen2.5-7b", "llama-3.1-8b",
              "mixtral-8x7b")
FIT_MICRO_BATCH_SEQ_LEN = 2048
# the table's method where some of its longest sequences are the simulation's (`seq_len_method` says which rows)
SIMULATED_TOO = "+simulated"
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


def _margin(answer: Answer, card_gb: float) -> int | None:
    """What the card has left at an answer (None where nothing fits)."""
    return None if answer.peak_bytes is None else card_bytes(card_gb) - answer.peak_bytes


def fit_table_predictor(out_dir: Path | None = None) -> str:
    """The digest of what a fit table comes from: the predictor's and this module's choices, the
    micro-benchmarks its speed column is calibrated from (harness.predict.speed.calibration_digest) and the
    confirmations by simulation under `out_dir` (harness.predict.confirm)."""
    import hashlib

    from harness import env
    from harness.imports import source_files
    from harness.predict.speed import calibration_digest

    digest = hashlib.sha256(f"{env.code_digest(source_files(__name__))} {calibration_digest()}".encode())
    for path in sorted((Path(out_dir) / CONFIRMED_FOLDER).glob("*.json")) if out_dir is not None else ():
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def fit_table(experiments_dir: Path, device_type: str = "cuda", out_dir: Path | None = None):
    """Every (model, technique, checkpointing, card) answer: the longest sequence and the largest micro-batch,
    each confirmed by simulation where a current confirmation lies under `out_dir` (harness.predict.confirm;
    `seq_len_method` and `micro_batch_method` say which), else by the analytic search (instant)."""
    from harness import env, schema
    from harness.cards import CARD_OF_SIZE, CARDS
    from harness.techniques import TECHNIQUES

    started = time.perf_counter()
    predictor = predictor_digest()

    def longest_answer(found: Setup, target: Target) -> tuple[Answer, dict]:
        answer, confirmation, analytic = _confirmed(found, target, out_dir, predictor)
        return answer, {"seq_len_method": _method(confirmation), "analytic_max_seq_len": analytic.value,
                        # the shortest sequence the simulation saw run out of the card (None: none did)
                        "simulated_fails_at": confirmation["fails_at"] if confirmation else None}

    def largest_answer(found: Setup, target: Target) -> tuple[Answer, dict]:
        answer, confirmation, analytic = _confirmed(found, replace(target, seq_len=FIT_MICRO_BATCH_SEQ_LEN), out_dir,
                                                    predictor)
        return answer, {"micro_batch_method": _method(confirmation), "analytic_max_micro_batch": analytic.value,
                        # the smallest micro-batch the simulation saw run out of the card (None: none did)
                        "simulated_micro_batch_fails_at": confirmation["fails_at"] if confirmation else None}

    def expandable_answer(found: Setup, target: Target) -> dict:
        """The longest sequence with expandable segments, said as the row says its own."""
        expandable = replace(found, allocator=EXPANDABLE)
        answer, method = longest_answer(expandable, replace(target, allocator=EXPANDABLE))
        return {"max_seq_len": answer.value, **method, "seq_len_limited_by": sequence_limited_by(answer, expandable),
                "device_bytes": answer.peak_bytes, "margin_bytes": _margin(answer, target.card_gb)}

    experiments = [name for name in TECHNIQUES if (experiments_dir / f"{name}.yaml").exists()]
    rows, curves = [], []
    for model in FIT_MODELS:
        for name in experiments:
            for checkpointing in (False, True):
                overrides = {"gradient_checkpointing": checkpointing}
                found = setup(experiments_dir / f"{name}.yaml", model, overrides, device_type)
                common = {"experiment": name, "model": model, "gradient_checkpointing": checkpointing}
                for card_gb in FIT_CARDS:
                    target = Target(experiments_dir / f"{name}.yaml", model, overrides, card_gb)
                    longest, method = longest_answer(found, target)
                    largest, micro_batch_method = largest_answer(found, target)
                    # device_bytes and margin_bytes: at the longest sequence's answer (micro-batch 1)
                    # at the reference shape: the tensor peak, and what the card must hold (allocator, context)
                    rows.append({**common, "card_gb": card_gb, "reference_peak_bytes": found.peak(*REFERENCE_SHAPE),
                                 "reference_device_bytes": found.device(*REFERENCE_SHAPE),
                                 "max_seq_len": longest.value, **method,
                                 "seq_len_limited_by": sequence_limited_by(longest, found),
                                 "max_micro_batch": largest.value, **micro_batch_method,
                                 "device_bytes": longest.peak_bytes,
                                 "margin_bytes": _margin(longest, card_gb),
                                 "micro_batch_device_bytes": largest.peak_bytes,
                                 "device_bytes_at": {str(seq): found.device(seq, 1) for seq in CURVE_SEQ_LENS
                                                     if seq <= longest.value},
                                 EXPANDABLE: expandable_answer(found, target),
                                 **fit_row_speed(found, card_gb, largest.value, longest.value)})
                if model == CURVE_MODEL:
                    curves += [{**common, "seq_len": seq, "total_bytes": found.peak(seq, 1),
                                "device_bytes": found.device(seq, 1)}
                               for seq in CURVE_SEQ_LENS if seq <= (found.context or seq)]
    cases = []
    for case, (model, name, overrides) in COMPARED_CASES.items():
        found = setup(experiments_dir / f"{name}.yaml", model, overrides, device_type)
        for card_gb in FIT_CARDS:
            answer, method = longest_answer(found, Target(experiments_dir / f"{name}.yaml", model, overrides, card_gb))
            cases.append({"case": case, "experiment": name, "model": model, "card_gb": card_gb,
                          "max_seq_len": answer.value, **method, "device_bytes": answer.peak_bytes,
                          "margin_bytes": _margin(answer, card_gb)})
    simulated = any("simulated" in (row["seq_len_method"], row.get("micro_batch_method"))
                    for row in rows + cases)  # the default allocator's
    return schema.FitTable(
        method=f"analytic{SIMULATED_TOO if simulated else ''}", device_type=device_type, cases=cases,
        cards={str(gb): {"card_bytes": card_bytes(gb), "cap_bytes": card_bytes(gb), "gpu": CARD_OF_SIZE[gb],
                         "price_per_hour": CARDS[CARD_OF_SIZE[gb]].price_per_hour, "tokens": FIT_TOKENS}
               for gb in FIT_CARDS},
        micro_batch_seq_len=FIT_MICRO_BATCH_SEQ_LEN, reference_shape=list(REFERENCE_SHAPE), rows=rows, curves=curves,
        versions=env.software_versions(), predictor=fit_table_predictor(out_dir),
        seconds=time.perf_counter() - started)


def _confirmed(found: Setup, target: Target, out_dir: Path | None, predictor: str | None = None
               ) -> tuple[Answer, dict | None, Answer]:
    """A target's answer (confirmed by simulation where a current confirmation lies under `out_dir`), its
    confirmation, and the analytic answer it stands on."""
    analytic = target.analytic(found)
    return (*confirmed_answer(found, target, analytic, out_dir, predictor), analytic)


def _method(confirmation: dict | None) -> str:
    """Which method answered: "simulated" where a resolved confirmation holds the answer, else "analytic"."""
    return "simulated" if confirmation is not None and confirmation["resolved"] else "analytic"


def fit_answer(experiment: Path, model: str, overrides: dict, device_type: str, card_gb: float,
               micro_batch: int, out_dir: Path | None = None, allocator: str = "default") -> Answer:
    """The fit answer (a longest sequence) for an experiment file with these fields at a model (harness.matrix's
    fit_multiples) under an allocator setting: the fit table's, confirmed by simulation where a current
    confirmation lies under `out_dir` (harness.predict.confirm), else the analytic search's."""
    found = setup(experiment, model, overrides, device_type, allocator)
    return _confirmed(found, Target(experiment, model, overrides, card_gb, micro_batch, allocator), out_dir)[0]


def confirmation_targets(experiments_dir: Path) -> list[Target]:
    """Every longest sequence of the fit table and its compared cases, smaller cards first (the cards where people
    are at the edge), each card's models in the table's order; then the table's longest sequences with expandable
    segments, then its largest micro-batches, in the same order."""
    from harness.techniques import TECHNIQUES

    experiments = [experiments_dir / f"{name}.yaml" for name in TECHNIQUES
                   if (experiments_dir / f"{name}.yaml").exists()]
    found, expandable, micro_batches = [], [], []
    for card_gb in FIT_CARDS:
        for model in FIT_MODELS:
            rows = [Target(path, model, {"gradient_checkpointing": gc}, card_gb)
                    for path in experiments for gc in (False, True)]
            found += rows
            expandable += [replace(target, allocator=EXPANDABLE) for target in rows]
            micro_batches += [replace(target, seq_len=FIT_MICRO_BATCH_SEQ_LEN) for target in rows]
        found += [Target(experiments_dir / f"{name}.yaml", model, overrides, card_gb)
                  for model, name, overrides in COMPARED_CASES.values()]
    return found + expandable + micro_batches


def confirm_fits(experiments_dir: Path, out_dir: Path, jobs: int = 1, time_budget_s: float | None = None
                 ) -> dict[str, int]:
    """Confirm every answer still unconfirmed, in `jobs` processes, none started past the time budget; the fit
    table is then made again from them (harness.predict.command). Returns how many were searched, failed (said)
    and left for later."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    deadline = None if time_budget_s is None else time.time() + time_budget_s
    todo = confirmation_targets(experiments_dir)
    counts = dict.fromkeys(("searched", "failed", "late"), 0)
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=get_context("spawn")) as pool:
        for outcome, said in pool.map(confirm_one, todo, [out_dir] * len(todo), [deadline] * len(todo)):
            if outcome:
                print(said, flush=True)
                counts[outcome] += 1
    return counts
