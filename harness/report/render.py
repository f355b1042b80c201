"""Assemble the report from results/ and write reports/index.md, reports/index.html and reports/figures/.

`python -m harness report [--results results] [--out reports]`. The page is built once as a list of
blocks (headings, paragraphs, tables, figures) and written twice, as Markdown and as self-contained
HTML (figures embedded as base64 PNG, CSS inline). Same inputs, same bytes: nothing here reads
the clock.
"""

from __future__ import annotations

import base64
import html
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from harness.claims import COUNTED_READING, PUBLISHED_FILE, SOURCES, load_claims, load_sources
from harness.report import add_arguments, answer, beyond, engines, environment, glossary, ladder, reserved
from harness.report.accuracy import TOLERANCES, prediction_errors, summary
from harness.report.figures import FigureResult, all_figures
from harness.report.fits import (SIMULATED_MARK, boundary_table, confirmed_counts, expandable_table, fit_tables,
                                 published_comparison)
from harness.report.gpus import gpu_count_tables, peer_table
from harness.report.ledger import build_ledger
from harness.report.load import (is_gpu_record, load_results, predictions_by_kind, predictions_frame, records_frame,
                                 runs_frame)
from harness.report.loss import crossed_learning_rates, loss_parity
from harness.report.speed import speed_rows, speed_table, speed_text
from harness.report.tables import (
    VERDICT_CLASSES,
    Cell,
    Table,
    accuracy_category_table,
    accuracy_table,
    base_table,
    glance_table,
    ledger_table,
    loss_parity_table,
    microbench_table,
    predictions_table,
    provenance_tables,
    published_table,
    runs_table,
    verdict_counts,
)
from harness.report.units import LLAMA_2_7B_PARAMETERS, fmt_counts


@dataclass(frozen=True)
class Block:
    kind: str           # h1 | h2 | h3 | p | table | figure | badges | html (the HTML page only) | md (Markdown only)
    text: str = ""
    table: Table | None = None
    figure: FigureResult | None = None
    anchor: str = ""


@dataclass(frozen=True)
class Rendered:
    markdown: Path
    html: Path
    figures: list[Path]
    expected_images: int   # figures with an image, for checks
    counts: dict[str, int]


# --- the document -------------------------------------------------------------------------------

# Figures shown in the report's first section, beside the answer they illustrate.
DECISION_FIGURES = ("memory-vs-sequence",)
SECTION_FIGURES = DECISION_FIGURES + ("optimisation-ladder",)  # shown in their own section, not under Figures


def _values_change_bytes(random_peaks: dict) -> str:
    """The recipes whose bytes the weights' values change (answer.random_weights_peaks), as the fit table's
    paragraph names them."""
    recipes = sorted({experiment for _, experiment in random_peaks})
    if not recipes:
        return ""
    return (f" ({', '.join(recipes)}: LLM.int8's outlier columns), where a run from random weights is not the step "
            "the table sizes and its cell says so")


def _fits_blocks(results, runs, figures: list[FigureResult]) -> list[Block]:
    blocks = [Block("h2", "The fit table in full: sequence and micro-batch on each card", anchor="fits")]
    table = results.fits
    drawn = [Block("figure", figure=f) for f in figures if f.name in DECISION_FIGURES]
    if not table:
        return blocks + [Block("p", "No fit table in these results: `python -m harness predict --claims` "
                                    "writes it.")] + drawn
    confirmed, limited = confirmed_counts(table)
    random_peaks = answer.random_weights_peaks(results)
    batches_confirmed, batches_limited = confirmed_counts(table, "micro_batch")
    blocks.append(Block("p", (
        "For each model, technique and card: the longest sequence that fits at micro-batch 1, without / with "
        "gradient checkpointing, and below it the largest micro-batch at sequence "
        f"{table['micro_batch_seq_len']:,} (without / with). \"-\": does not fit even at 1 (shaded). "
        "Cards are named as sold, and a card sold as \"24 GB\" holds 24 GiB (2^30 bytes); the H200's \"141 GB\" "
        "holds 139.8 GiB as measured by the lab. A step fits where its predicted device bytes fit the card: the "
        "caching allocator's reserved segments, the CUDA context and the kernels. \"(context)\": the model's "
        "context length is reached before the card is full. "
        f"Predicted ({table['device_type']} code path) by the analytic search, whose reserve is a calibrated "
        "ratio over the tensors' peak; a longest sequence or a micro-batch marked " + SIMULATED_MARK + " is "
        "confirmed by simulation (the step traced and its caching allocator replayed under the card's cap, which "
        "fragmentation can fill before the tensors do; where the analytic answer ran out, the longest length "
        "simulated to fit, within 1% of one that ran out, or the largest micro-batch simulated to fit, one below "
        f"one that ran out): {confirmed} of the {limited} longest sequences the card limits and {batches_confirmed} "
        f"of the {batches_limited} largest micro-batches (`python -m harness predict --confirm-fits` "
        + ("confirms the rest" if (confirmed, batches_confirmed) != (limited, batches_limited) else
           "makes them again where the predictor's code changes")
        + ", and `--solve seq_len` or `--solve micro_batch` any one). The peak column is the "
        "tensors' peak at sequence 512, micro-batch 1 (predicted; beside it torch's peak allocated where a GPU "
        "run measured it), not what the card must hold: the first section's memory column is that. The answers "
        "size a fine-tune of pretrained weights; the lab's GPU runs start from random weights, the same bytes "
        "except where the weights' values change them" + _values_change_bytes(random_peaks) + ".")))
    for model, fit_table in fit_tables(table, runs, random_peaks):
        blocks.append(Block("h3", model))
        blocks.append(Block("table", table=fit_table))
    expandable, expandable_said = expandable_table(table)
    if expandable_said:
        blocks.append(Block("h3", "What expandable segments buy"))
        blocks.append(Block("p", expandable_said))
    if expandable is not None:
        blocks.append(Block("table", table=expandable))
    compared = published_comparison(table, runs)
    if compared is not None:
        blocks.append(Block("h3", "Against published figures"))
        blocks.append(Block("table", table=compared))
    # the runs under an allocator setting of their own are judged here only, by the answers with that setting
    boundary = boundary_table(table, runs, results.predictions, records_frame(results.allocator_records))
    if boundary is not None:
        blocks.append(Block("h3", "The boundary on emulated cards"))
        blocks.append(Block("table", table=boundary))
    return blocks + drawn


ANSWER_MODEL, ANSWER_CARD = "llama-2-7b", 24  # what the picker shows first: the documents' 7B on a 24 GB card


def _answer_blocks(results) -> list[Block]:
    data = answer.answer_data(results)
    blocks = [Block("h2", "What fits your card", anchor="answer")]
    if data is None:
        return blocks + [Block("p", "No fit table in these results: `python -m harness predict --claims` writes it.")]
    reference = data["reference"]
    blocks.append(Block("p", (
        "Pick a model, a card and the sequence length you train at: the recipes that fit, the longest sequence "
        "first. Each figure says whether it was measured (a run on a GPU, its record named) or predicted (the lab's "
        f"{answer.search_words(data['method'])}, no GPU); hover a mark for where it comes from and the command that "
        "reproduces it. Memory: in the picker at the length picked and micro-batch 1, in the tables below at "
        f"sequence {reference[0]:,} x micro-batch {reference[1]}; the longest sequence is at micro-batch 1. A "
        "recipe named \"+ checkpointing\" recomputes activations in the backward pass. Tokens/s here is an "
        "upper bound: the fit table times the matrix products alone (their FLOPs at the matmul rate the lab "
        "measured, scaled to each card), leaving out the memory-bound kernels and the host, which the kernel model "
        "of the speed section costs; the GPU-hours and dollars of 100M tokens beside it (the card's price per "
        "hour, harness/cards.py) are lower bounds for the same reason. Memory and speed were measured on random "
        "weights. Values change the bytes in one place: LLM.int8 (int8-lora) keeps, for backward, the input "
        "columns holding an outlier, which random weights put in most of the MLP's product at 7B and trained "
        "weights in a few feature dimensions; the fit answers size trained weights, so a measured int8 run "
        "holds more than they say.")))
    if trainer_default := answer.trainer_default_line(results, ANSWER_MODEL):
        blocks.append(Block("p", trainer_default))
    blocks.append(Block("p", environment.summary_line(results)))
    blocks.append(Block("html", answer.picker_html(data, ANSWER_MODEL, ANSWER_CARD)))
    blocks.append(Block("h3", "Every model on every card"))
    blocks.append(Block("table", table=answer.summary_table(data)))
    model = ANSWER_MODEL if ANSWER_MODEL in data["models"] else data["models"][0]
    blocks.append(Block("h3", f"{model}, recipe by recipe"))
    blocks.append(Block("table", table=answer.model_table(data, model)))
    return blocks


def _glossary_blocks(terms: dict[str, str]) -> list[Block]:
    entries = "".join(f'<dt id="{glossary.anchor(term)}">{html.escape(term)}</dt><dd>{_inline(meaning)}</dd>'
                      for term, meaning in terms.items())
    table = Table(["Term", "Meaning"], [[Cell(term), Cell(meaning)] for term, meaning in terms.items()])
    return [Block("h2", "Glossary", anchor="glossary"),
            Block("p", "Every technique name and term the report uses; in the HTML page each is linked where it "
                       "first appears in a paragraph or a cell."),
            Block("html", f'<dl class="glossary">{entries}</dl>'), Block("md", table=table)]


def _environment_blocks(results) -> list[Block]:
    table = environment.environment_table(results)
    if table is None:
        return []
    blocks = [Block("h3", "Measured and predicted with"), Block("table", table=table)]
    text = environment.environment_text(results)
    return blocks + ([Block("p", text)] if text else [])


def _gpus_blocks(results) -> list[Block]:
    blocks = [Block("h2", "How many GPUs", anchor="gpus")]
    table = results.gpus
    if not table:
        return blocks + [Block("p", "No how-many-GPUs table in these results: `python -m harness predict --claims` "
                                    "writes it.")]
    blocks.append(Block("p", (
        "Past one card: for each model and way of training, the smallest number of GPUs of one size whose ranks "
        f"each fit, sharded with FSDP2 (searched over {', '.join(map(str, table['world_sizes']))}), at micro-batch 1 "
        "per rank with activation checkpointing. A rank fits when what its card must hold (its tensors' peak, the "
        "caching allocator's reserve and what lives outside it, as in the fit table) fits the card as sold; NCCL's "
        "own buffers are not counted. Under each answer: that figure and one rank's tensors by what they hold; "
        "\"host\" is what offloading keeps in host memory for that rank, which no answer checks against a "
        "machine's RAM (a 70B model offloaded to one GPU needs about 1 TB of it). Predicted (analytic "
        "per-rank terms; the 80 GB answers at the shorter sequence also by simulation: the sharded step traced "
        "under torch's fake process group, one rank standing for all). `python -m harness predict --model M "
        "--experiment fsdp2 --world-size N` predicts any other cell.")))
    for seq_len, gpu_table in gpu_count_tables(table):
        blocks.append(Block("h3", f"Sequence {seq_len:,}"))
        blocks.append(Block("table", table=gpu_table))
    peers = peer_table(table)
    if peers is not None:
        blocks.append(Block("h3", "Against ZeRO-3 and DeepSpeed's own estimate"))
        blocks.append(Block("table", table=peers))
    return blocks


def _cpu_text(on_cpu) -> str:
    """What the CPUs that measured computed natively, and what their plan did about the rest."""
    known = on_cpu[on_cpu["cpu_capability"].notna()]
    kinds = [f"{_count(len(group), 'record')} on {capability} (bf16 {'native' if native else 'emulated'})"
             for (capability, native), group in known.groupby(["cpu_capability", "bf16_native"], sort=True)]
    text = ("The CPU runs' kernels, as torch reported them: " + "; ".join(kinds) + "."
            if kinds else "These CPU records predate the lab's recording of the CPU's kernels.")
    if len(known) < len(on_cpu):
        text += f" {_count(len(on_cpu) - len(known), 'older record')} did not record them."
    reasons = on_cpu["emulated"].dropna()
    if len(reasons):
        text += (" Where a CPU only emulates bf16 or fp16 matrix products (torch's scalar fallback, 15 to 180 "
                 "times slower than fp32), the plan runs such cells shorter or leaves them to another machine, "
                 "each record saying why: " + "; ".join(f"{reason} ({count})" for reason, count
                                                          in reasons.value_counts(sort=False).items()) + ".")
    return text


def _counted_blocks(ledger) -> list[Block]:
    """What the rows that count "7B" as 7e9 parameters are judged on, and what the rounding alone does
    to their verdicts (from the rows themselves, so the sentence stays true of the table below it)."""
    rows = [row for row in ledger if row.claim.parameters_counted]
    if not rows:
        return []
    counted = rows[0].claim.parameters_counted
    label = COUNTED_READING.format(count=counted / 1e9)
    changes: dict[tuple[str, str], list[str]] = {}  # (ours, scaled) verdicts -> the rows
    kept = []
    for row in rows:
        scaled = dict(row.readings).get(label)
        # a verdict changes when its kind does: "off by -36.3%" to "off by -38.6%" is the same verdict
        if scaled is not None and scaled.verdict.kind != row.verdict.kind:
            changes.setdefault((row.verdict.label, scaled.verdict.label), []).append(row.claim.id)
        else:
            kept.append(row.claim.id)
    changed = [f"{', '.join(ids)} from {ours} to {scaled}" for (ours, scaled), ids in changes.items()]
    text = (f"{_count(len(rows), 'row')} ({', '.join(row.claim.id for row in rows)}) count \"7B\" as "
            f"{counted / 1e9:g}e9 parameters; Llama-2-7B has {LLAMA_2_7B_PARAMETERS:,} "
            f"({1 - LLAMA_2_7B_PARAMETERS / counted:.1%} fewer). Each is judged on our own figure for Llama-2-7B, "
            f"so the rounding counts against the documents' figure; beside each verdict, the other reading "
            f"(\"{label}\") scales ours x{counted / LLAMA_2_7B_PARAMETERS:.3f} to judge their arithmetic alone. ")
    text += ("Scaled, the verdict goes " + "; ".join(changed) + (f"; {', '.join(kept)} keep theirs" if kept else "")
             + "." if changed else "Scaled, none of these verdicts changes.")
    return [Block("p", text)]


def _prediction_counts(results) -> str:
    """'499 memory predictions, 2 fit tables, 49 speed predictions': each kind of prediction file by its name."""
    return fmt_counts({kind: len(files) for kind, files in predictions_by_kind(results).items()}) or "no predictions"


def _loss_text(comparisons) -> str:
    """The loss section's opening: what is compared, and where a comparison crosses learning rates."""
    text = ("Memory and speed are the same on random weights (but for LLM.int8's outlier columns, which the values "
            "decide); loss is not. Runs on random-init presets keep "
            "their loss in the records but it is not compared here (random init: memory and speed only). The "
            "comparison fine-tunes a base model the lab pretrains itself (`make base`) on different text, every "
            "technique on the same batches for the same steps, and compares final held-out losses. Each run trains at "
            "its configuration's learning rate (the table's Learning rate column): adapters at their own, as is "
            "usual for LoRA.")
    crossed = crossed_learning_rates(comparisons)
    if crossed:
        text += (" Where a run and its reference trained at different learning rates the comparison is of the two "
                 "recipes, not of the technique's arithmetic alone: " + "; ".join(crossed) + ".")
    return text


def _table_or(table: Table | None, missing: str) -> Block:
    """A table, or the sentence that says what produces it."""
    return Block("table", table=table) if table is not None else Block("p", missing)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def build_blocks(results_dir: Path) -> tuple[list[Block], list[FigureResult], dict[str, int], dict[str, str]]:
    """The page's blocks, its figures, the verdict counts and the glossary its HTML links to."""
    results = load_results(results_dir)
    claims = load_claims()
    ledger = build_ledger(results, claims)
    runs = runs_frame(results)
    predictions = predictions_frame(results)
    figures = all_figures(results, runs, predictions, claims)
    counts = verdict_counts(ledger)
    gpu_runs = int((runs["device_type"] == "cuda").sum()) if len(runs) else 0
    cpu_runs = len(runs) - gpu_runs
    other_loops = results.engine_records
    other_gpu = sum(1 for record in other_loops if is_gpu_record(record))

    blocks = [Block("h1", "Fine-tuning under limited VRAM: what the memory arithmetic gets right")]
    blocks += _answer_blocks(results)
    blocks += _environment_blocks(results)
    blocks.append(Block("p", (
        f"Rendered from `{results_dir}`: {_count(len(runs), 'run record')} of the lab's loop ({gpu_runs} on a GPU, "
        f"{cpu_runs} on a CPU) and {len(other_loops)} of other loops ({other_gpu} on a GPU), "
        + (f"{len(results.allocator_records)} under a PYTORCH_CUDA_ALLOC_CONF of their own (judged in the boundary "
           "table alone: every other table and figure is of torch's default allocator, which the predictions "
           "replay), " if results.allocator_records else "")
        + f"{_prediction_counts(results)}, {_count(len(results.probes), 'probe')} "
        f"({', '.join(sorted(results.probes)) or 'none'}), {_count(len(results.microbench), 'micro-benchmark file')}. "
        "Sources checked: " + "; ".join(f"{key} = \"{title}\"" for key, title in SOURCES.items()) + ". "
        f"GB means 1e9 bytes and GiB 2^30 bytes throughout, except a card's size, named as sold: a \"24 GB card\" "
        f"holds 24 GiB (the H200, its measured 139.8 GiB); \"7B\" is Llama-2-7B, {LLAMA_2_7B_PARAMETERS:,} "
        "parameters.")))
    if gpu_runs == 0:
        blocks.append(Block("p", (
            "No GPU run is recorded in these results: every \"measured\" figure below is either absent (and says "
            "so) or a CPU figure labelled as one. Verdicts then rest on the simulation or the analytic formula.")))

    blocks += _fits_blocks(results, runs, figures)
    blocks += _gpus_blocks(results)

    blocks.append(Block("h2", "Verdicts at a glance", anchor="verdicts"))
    blocks.append(Block("badges", ", ".join(f"{kind}: {n}" for kind, n in counts.items() if n)))
    blocks += _counted_blocks(ledger)
    blocks.append(Block("table", table=glance_table(ledger)))

    blocks.append(Block("h2", "The claims ledger", anchor="ledger"))
    blocks.append(Block("p", (
        "One row per claim, decided from the documents' own words (quoted under each claim). Documents' figure: "
        "as the source writes it. Predicted: the analytic formula (bytes per parameter times parameter counts "
        "plus activations and constants) and the simulation (one real training step traced under fake tensors "
        "at full size, no memory used). Measured: a run on a GPU (torch allocator; the device is named); "
        "CPU runs count only for device-independent claims and are labelled CPU. Published: figures others "
        "report for similar setups, in their units. The verdict rests on the best evidence present "
        "(GPU, then CPU where valid, then simulated, then analytic), compares the documents' figure with it as "
        "a relative error (documents minus ours, over ours) against the stated tolerance, and says why. Where "
        "the words allow another fair reading, it is judged too and shown beside the verdict. \"Arithmetic "
        "holds, premise wrong\": the documents' sum is right for the scenario they assume, and no library "
        "trains that way.")))
    blocks.append(Block("table", table=ledger_table(ledger)))

    published = build_ledger(results, load_claims(PUBLISHED_FILE))
    blocks.append(Block("h2", "Other projects' published figures", anchor="published"))
    blocks.append(Block("p", (
        "Memory figures that training frameworks and their documentation publish, checked the same way: the "
        "lab's prediction (and measurement, where a GPU run of the configuration exists) for the configuration "
        "they describe. Verdicts: " + ", ".join(f"{kind}: {n}" for kind, n in verdict_counts(published).items()
                                                if n) + ".")))
    blocks.append(Block("table", table=published_table(published, load_sources(PUBLISHED_FILE))))

    blocks += _ladder_blocks(runs, predictions, figures)
    blocks += _beyond_blocks(runs, predictions)

    blocks.append(Block("h2", "Predicted against measured on the GPU", anchor="accuracy"))
    errors = prediction_errors(runs, predictions)
    if len(errors):
        blocks.append(Block("p", _accuracy_text(errors)))
        blocks.append(Block("table", table=accuracy_table(errors)))
        blocks.append(Block("h3", "By memory category"))
        blocks.append(Block("table", table=accuracy_category_table(errors)))
    else:
        blocks.append(Block("p", "No GPU run with a prediction of its configuration in these results: "
                                 "`make gpu-evidence` on a CUDA machine, then `python -m harness predict --claims`."))

    blocks.append(Block("h2", "What the card holds: reserved and device bytes", anchor="reserved"))
    held = reserved.check_rows(results.records, results.predictions)
    if held:
        blocks.append(Block("p", reserved.text(held)))
        blocks.append(Block("table", table=reserved.table(held)))
    else:
        blocks.append(Block("p", "No GPU run with a prediction of its reserved and device bytes in these results: "
                                 "`python -m harness predict --claims` predicts them."))
    blocks += [Block("p", reserved.oom_sentence(row)) for row in reserved.oom_rows(results.records, results.predictions)]
    blocks.append(Block("h2", "Predicted against measured speed on the GPU", anchor="speed"))
    speed = speed_rows(results)
    if speed:
        blocks.append(Block("p", speed_text(speed)))
        blocks.append(Block("table", table=speed_table(speed)))
    else:
        blocks.append(Block("p", "No GPU run in these results: `make gpu-evidence` on a CUDA machine, then "
                                 "`python -m harness predict --speed-of-runs`."))

    blocks.append(Block("h2", "Figures", anchor="figures"))
    for figure in figures:
        if figure.name in SECTION_FIGURES:
            continue
        blocks.append(Block("h3", figure.title, anchor=figure.name))
        blocks.append(Block("figure", figure=figure))

    blocks.append(Block("h2", "Loss on a pretrained base", anchor="loss"))
    comparisons = loss_parity(results.records, results.folded_records)
    blocks.append(Block("p", _loss_text(comparisons)))
    if results.bases:
        blocks.append(Block("table", table=base_table(results)))
    if comparisons:
        blocks.append(Block("table", table=loss_parity_table(comparisons)))
    else:
        blocks.append(Block("p", "No fine-tune of a pretrained base with held-out evaluation in these results: "
                                 "`make bench` runs them (the matrix's blocks on `models: [base]`)."))

    blocks += _engine_blocks(results)

    on_gpu = runs[runs["device_type"] == "cuda"] if len(runs) else runs
    on_cpu = runs[runs["device_type"] != "cuda"] if len(runs) else runs
    gpu_benchmarks = [entry for entry in results.microbench if entry["device"] != "cpu"]
    cpu_benchmarks = [entry for entry in results.microbench if entry["device"] == "cpu"]
    blocks.append(Block("h2", "Runs on a GPU", anchor="runs"))
    blocks.append(_table_or(runs_table(on_gpu) if len(on_gpu) else None,
                            "No GPU run records in these results: `make bench` (or `make gpu-evidence`) on a CUDA "
                            "machine produces them."))
    on_cuda_path = predictions[predictions["device_type"] == "cuda"] if len(predictions) else predictions
    blocks.append(Block("h3", "Memory predictions"))
    blocks.append(_table_or(predictions_table(on_cuda_path) if len(on_cuda_path) else None,
                            "No predictions: `python -m harness predict --claims` writes them."))
    blocks.append(Block("h2", "Micro-benchmarks on a GPU", anchor="microbench"))
    blocks.append(_table_or(microbench_table(gpu_benchmarks) if gpu_benchmarks else None,
                            "No GPU micro-benchmark file: `make microbench` on a CUDA machine writes "
                            "results/microbench/<device>.json."))

    terms = glossary.glossary(results)
    blocks += _glossary_blocks(terms)
    blocks.append(Block("h2", "Environment and provenance", anchor="provenance"))
    provenance = provenance_tables(results)
    if not provenance:
        blocks.append(Block("p", "Nothing recorded yet."))
    for title, table in provenance:
        blocks.append(Block("h3", title))
        blocks.append(Block("table", table=table))
    if results.folded:
        blocks.append(Block("p", f"{results.folded} older record(s) of a configuration that a newer record "
                                 "measures again were folded: every table and figure shows the newest one."))
    if results.skipped:
        blocks.append(Block("h3", "Files not read"))
        blocks.append(Block("table", table=Table(["File and reason"], [[Cell(s)] for s in results.skipped])))
    blocks.append(Block("h2", "Appendix: the lab checking itself on a CPU", anchor="cpu"))
    blocks.append(Block("p", (
        "Runs and micro-benchmarks on a CPU say nothing about a GPU's memory or speed. They are how the lab "
        "checks itself where no GPU is: every technique runs its real step on tiny models (random weights: memory "
        "and speed only), the CPU's tracked tensor bytes check the simulation's accounting, and ratios show "
        "what a kernel costs relative to its baseline on the same processor.")))
    blocks.append(Block("h3", "Runs on a CPU"))
    if len(on_cpu):
        blocks.append(Block("p", _cpu_text(on_cpu)))
    blocks.append(_table_or(runs_table(on_cpu) if len(on_cpu) else None,
                            f"No CPU run records in `{results_dir}`: `make bench` on a machine without a GPU "
                            "produces them."))
    on_cpu_path = predictions[predictions["device_type"] == "cpu"] if len(predictions) else predictions
    blocks.append(Block("h3", "Predicted against tracked bytes on a CPU"))
    cpu_errors = prediction_errors(runs, predictions, "cpu") if len(runs) and len(predictions) else []
    if len(cpu_errors):
        blocks.append(Block("p", _accuracy_text(cpu_errors, ", measured as their peak of tracked tensor bytes")))
    blocks.append(_table_or(predictions_table(on_cpu_path) if len(on_cpu_path) else None,
                            "No predictions of the CPU code path: `python -m harness predict --claims` writes them."))
    blocks.append(Block("h3", "Micro-benchmarks on a CPU"))
    blocks.append(_table_or(microbench_table(cpu_benchmarks) if cpu_benchmarks else None,
                            "No CPU micro-benchmark file: `make microbench` writes results/microbench/cpu.json."))

    return blocks, figures, counts, terms


def _ladder_blocks(runs, predictions, figures: list[FigureResult]) -> list[Block]:
    rows = ladder.ladder_rows(predictions, runs)
    blocks = [Block("h2", "The optimisation ladder", anchor="ladder"), Block("p", (
        f"From pure bf16 full fine-tuning to QLoRA, one technique at a time, at the configuration torchtune "
        f"publishes its ladder for ({ladder.MODEL}, micro-batch {ladder.MICRO_BATCH} x {ladder.SEQ_LEN:,} "
        "tokens). Each rung keeps the ones above it unless it changes the method (LoRA, QLoRA)."))]
    blocks += [Block("figure", figure=f) for f in figures if f.name == "optimisation-ladder"]
    blocks.append(Block("table", table=ladder.ladder_table(rows)))
    rising = ladder.not_monotone(rows)
    if rising:
        blocks.append(Block("p", "Rungs whose peak, predicted or measured, is above the rung before them "
                                 "(each should lower it): " + "; ".join(rising) + "."))
    return blocks


def _beyond_blocks(runs, predictions) -> list[Block]:
    rows = beyond.technique_rows(predictions, runs)
    if not len(rows):
        return []
    return [Block("h2", "Every technique at 7B, sequence 2,048", anchor="techniques"), Block("p", (
        "The documents' techniques and those practitioners reach for next (GaLore, torchao's low-bit AdamW, "
        "activation offloading, selective checkpointing, Liger's kernels, torch.compile, adapter variants), at "
        "one shape: where each puts the peak, and what is left of it.")),
        Block("table", table=beyond.technique_table(rows))]


def _engine_blocks(results) -> list[Block]:
    """The report's section: a table per device class, GPU first, and the runs another loop could not run."""
    blocks = [Block("h2", "Our loop against Trainer", anchor="engines"), Block("p", (
        "Do the lab's peaks and tokens/s hold for the loops people fine-tune with? The same cells run in "
        "transformers' `Trainer` (TrainingArguments mapped from the experiment) and TRL's `SFTTrainer` (packing "
        "on), measured by the same meters on the same sequences in the same order (`engine:` in an experiment, "
        "`--engine` on `run` and `bench`)."))]
    comparisons = engines.engine_comparisons(results)
    gpu = [c for c in comparisons if engines.on_gpu(c)]
    cpu = [c for c in comparisons if not engines.on_gpu(c)]
    if gpu:
        blocks.append(Block("table", table=engines.engine_table(gpu)))
    else:
        blocks.append(Block("p", "No GPU run in another loop in these results: `make bench` on a CUDA machine runs "
                                 "the cross-check block."))
    if cpu:
        blocks.append(Block("h3", "On a CPU"))
        table = engines.engine_table(cpu)
        # the GPU table above carries the same footnote: once is enough
        blocks.append(Block("table", table=replace(table, note="") if gpu else table))
    elif not gpu:
        blocks.append(Block("p", "No CPU run in another loop either: `make bench` runs the cross-check block."))
    alone = engines.unpaired(results)
    if alone:
        blocks.append(Block("p", "Not compared, for want of the lab's run of the same cell on the same machine (a "
                                 "speed is divided only by one measured on the same processor and instruction set): "
                                 + "; ".join(alone) + "."))
    skipped = engines.not_run(results)
    if skipped:
        blocks.append(Block("p", "Not run in another loop (the record says why): " + "; ".join(skipped) + "."))
    return blocks


def _accuracy_text(errors, how: str = "") -> str:
    """'37 finished runs on NVIDIA H200{how}, each beside ...': the device named once, as its records name it
    (a CPU's name already says "CPU (...)"); `how` says what was measured, after a comma."""
    parts = []
    for method, stats in summary(errors).items():
        parts.append(f"{method}: {stats['within']} of {stats['runs']} runs within ±{TOLERANCES[method]:.0%} "
                     f"(median error {stats['median']:.1%}, largest {stats['max']:.1%})")
    devices = " and ".join(sorted(set(errors["device_name"])))
    return (f"{_count(len(errors), 'finished run')} on {devices}{how}, each beside the predictions of its "
            "configuration, made without a GPU: " + "; ".join(parts) + ".")


# --- Markdown -----------------------------------------------------------------------------------

def _md_cell(cell: Cell) -> str:
    def clean(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")
    return clean(cell.text) + (f"<br><sub>{clean(cell.detail)}</sub>" if cell.detail else "")


def _md_table(table: Table) -> str:
    lines = ["| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---:" if i in table.numeric else "---" for i in range(len(table.columns))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    if table.note:
        lines += ["", f"_{table.note}_"]
    return "\n".join(lines)


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        if block.kind in ("h1", "h2", "h3"):
            parts.append("#" * int(block.kind[1]) + " " + block.text)
        elif block.kind in ("p", "badges"):
            parts.append(block.text)
        elif block.kind in ("table", "md"):
            parts.append(_md_table(block.table))
        elif block.kind == "figure":
            figure = block.figure
            if figure.png is None:
                parts.append(f"_Not drawn: {figure.missing}_")
            else:
                parts.append(f"![{figure.title}](figures/{figure.name}.png)\n\n{figure.caption}")
    return "\n\n".join(parts) + "\n"


# --- HTML ----------------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1f2328;
       margin: 0 auto; max-width: 1500px; padding: 24px 32px 64px; line-height: 1.45; font-size: 15px; }
h1 { font-size: 28px; margin-bottom: 4px; }
h2 { font-size: 22px; margin-top: 40px; border-bottom: 2px solid #d0d7de; padding-bottom: 4px; }
h3 { font-size: 17px; margin-top: 28px; }
nav { margin: 12px 0 20px; font-size: 14px; }
nav a { margin-right: 14px; color: #0969da; text-decoration: none; }
table { border-collapse: collapse; margin: 10px 0 6px; font-size: 13px; width: 100%; }
th, td { border: 1px solid #d0d7de; padding: 5px 8px; vertical-align: top; text-align: left; }
th { background: #f6f8fa; position: sticky; top: 0; }
tr:nth-child(even) td { background: #fbfcfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.detail { color: #57606a; font-size: 11.5px; margin-top: 2px; white-space: normal; text-align: left; }  /* a number keeps one line and its column; its explanation wraps as prose */
.note { color: #57606a; font-size: 13px; font-style: italic; margin-bottom: 18px; }
td.holds, span.holds { background: #dafbe1 !important; }
td.caveat, span.caveat { background: #fff8c5 !important; }
td.off, span.off { background: #ffebe9 !important; }
td.wrong, span.wrong { background: #ffcecb !important; font-weight: 600; }
td.unchecked, span.unchecked { background: #eaeef2 !important; }
td.status-oom { background: #ffebe9 !important; font-weight: 600; }
td.status-failed { background: #eaeef2 !important; font-weight: 600; }
.badges span { display: inline-block; padding: 4px 10px; margin: 0 8px 8px 0; border-radius: 12px;
               border: 1px solid #d0d7de; font-weight: 600; }
table.ledger { table-layout: fixed; }
table.ledger th:nth-child(1) { width: 5%; } table.ledger th:nth-child(2) { width: 17%; }
table.ledger th:nth-child(3) { width: 8%; } table.ledger th:nth-child(4) { width: 9%; }
table.ledger th:nth-child(5) { width: 12%; } table.ledger th:nth-child(6) { width: 11%; }
table.ledger th:nth-child(7) { width: 10%; } table.ledger th:nth-child(8) { width: 28%; }
table.ledger td { overflow-wrap: anywhere; }
table.glance td:nth-child(2) { width: 34%; }
table.runs td { white-space: nowrap; }
table.runs td:nth-child(2) { white-space: normal; overflow-wrap: anywhere; }  /* a long experiment name wraps */
figure { margin: 8px 0 24px; }
figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 13px; margin-top: 6px; max-width: 1100px; }
p.missing { background: #f6f8fa; border-left: 4px solid #bf8700; padding: 8px 12px; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; font-size: 13px; }
.picker { border: 2px solid #0969da; border-radius: 8px; padding: 12px 16px; margin: 8px 0 16px; }
.picker label { margin-right: 18px; font-weight: 600; }
.picker select { font-size: 15px; padding: 2px 4px; }
dl.glossary dt { font-weight: 600; margin-top: 6px; } dl.glossary dd { margin-left: 24px; }
dl.glossary dt:target { background: #fff8c5; }
a.term { color: inherit; text-decoration: underline dotted #57606a; }
.mark { font-size: 11px; padding: 0 5px; border-radius: 8px; margin-left: 4px; cursor: help; }
.mark.measured { background: #dafbe1; } .mark.predicted { background: #ddf4ff; }
"""


def _inline(text: str, link=None) -> str:
    """Escape, then turn `code` spans into <code>; `link` (glossary.linker) links terms outside them."""
    pieces = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else (link(p) if link else p) for i, p in enumerate(pieces))


def _html_table(table: Table, link=None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for index, cell in enumerate(row):
            classes = " ".join(c for c in (cell.css, "num" if index in table.numeric else "") if c)
            attribute = f' class="{classes}"' if classes else ""
            detail = f'<div class="detail">{_inline(cell.detail, link)}</div>' if cell.detail else ""
            cells.append(f"<td{attribute}>{_inline(cell.text, link)}{detail}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    css = f' class="{table.css}"' if table.css else ""
    note = f'<p class="note">{_inline(table.note, link)}</p>' if table.note else ""
    return f"<table{css}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}"


def _badges(counts: dict[str, int]) -> str:
    spans = [f'<span class="{VERDICT_CLASSES[kind]}">{html.escape(kind)}: {n}</span>'
             for kind, n in counts.items() if n]
    return f'<div class="badges">{"".join(spans)}</div>'


def to_html(blocks: list[Block], counts: dict[str, int], terms: dict[str, str] | None = None) -> str:
    link = glossary.linker(terms) if terms else None
    title = next(b.text for b in blocks if b.kind == "h1")
    nav = "".join(f'<a href="#{b.anchor}">{html.escape(b.text)}</a>' for b in blocks if b.kind == "h2" and b.anchor)
    body = []
    for block in blocks:
        anchor = f' id="{block.anchor}"' if block.anchor else ""
        if block.kind == "h1":
            body.append(f"<h1>{html.escape(block.text)}</h1>")
        elif block.kind in ("h2", "h3"):
            body.append(f"<{block.kind}{anchor}>{html.escape(block.text)}</{block.kind}>")
        elif block.kind == "p":
            body.append(f"<p>{_inline(block.text, link)}</p>")
        elif block.kind == "badges":
            body.append(_badges(counts))
        elif block.kind == "html":
            body.append(block.text)
        elif block.kind == "table":
            body.append(_html_table(block.table, link))
        elif block.kind == "figure":
            figure = block.figure
            if figure.png is None:
                body.append(f'<p class="missing">Not drawn: {_inline(figure.missing)}</p>')
            else:
                data = base64.b64encode(figure.png).decode("ascii")
                body.append(f'<figure id="figure-{figure.name}"><img alt="{html.escape(figure.title)}" '
                            f'src="data:image/png;base64,{data}"><figcaption>{_inline(figure.caption)}'
                            "</figcaption></figure>")
        if block.kind == "h1":
            body.append(f"<nav>{nav}</nav>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# --- writing -------------------------------------------------------------------------------------

def render(results_dir: str | Path = "results", out_dir: str | Path = "reports") -> Rendered:
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    blocks, figures, counts, terms = build_blocks(results_dir)
    figure_dir = out_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for figure in figures:
        if figure.png is not None:
            path = figure_dir / f"{figure.name}.png"
            path.write_bytes(figure.png)
            written.append(path)
    for stale in set(figure_dir.glob("*.png")) - set(written):  # no figure from an earlier render survives
        stale.unlink()
    markdown, page = out_dir / "index.md", out_dir / "index.html"
    markdown.write_text(to_markdown(blocks), encoding="utf-8")
    page.write_text(to_html(blocks, counts, terms), encoding="utf-8")
    return Rendered(markdown, page, written, sum(f.png is not None for f in figures), counts)


def main(args) -> int:
    rendered = render(args.results, args.out)
    summary = ", ".join(f"{kind} {n}" for kind, n in rendered.counts.items() if n)
    print(f"report: {rendered.markdown} and {rendered.html} ({rendered.expected_images} figures; verdicts: {summary})")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m harness.report.render", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
