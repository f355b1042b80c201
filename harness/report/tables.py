"""Tables of the report as plain data (columns, rows of cells); render.py writes them as Markdown and HTML."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from harness import schema
from harness.report import verdicts
from harness.report.evidence import PROBE_QUANTITIES, Observation
from harness.report.ledger import LedgerRow, basis_short
from harness.report.load import CATEGORIES, Results, count_predictions, device_name
from harness.report.loss import LossComparison
from harness.report.microbench import format_seconds, ratios
from harness.report.units import (CATEGORY_WORDS, UNIT_WORDS, fmt_bytes, fmt_card, fmt_counted, fmt_counts, fmt_gb,
                                  fmt_value, fmt_version, fmt_versions, model_name)

VERDICT_CLASSES = {verdicts.HOLDS: "holds", verdicts.CAVEAT: "caveat", verdicts.OFF: "off",
                   verdicts.WRONG: "wrong", verdicts.PREMISE: "wrong", verdicts.OTHER_SETUP: "unchecked",
                   verdicts.UNCHECKED: "unchecked"}
# Which of a run's memories a ledger quantity's measured figure is (evidence.peak, evidence.peak_reserved): said in
# the cell.
RUN_MEMORY_WORDS = {"peak": "torch's peak allocated; ", "min_peak": "torch's peak allocated; ",
                    "peak_reserved": "torch's peak reserved; "}
# Analytic and simulated predictions this close are shown as one figure.
PREDICTIONS_AGREE = 0.01


@dataclass(frozen=True)
class Cell:
    text: str
    detail: str = ""   # a second, smaller line
    css: str = ""      # a class for HTML (verdict colours, status)


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    note: str = ""
    css: str = ""
    numeric: set[int] = field(default_factory=set)  # column indexes aligned right


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _num(value, digits: int) -> str:
    return "" if _missing(value) else f"{value:,.{digits}f}"


# --- the ledger -------------------------------------------------------------------------------

def verdict_counts(ledger: list[LedgerRow]) -> dict[str, int]:
    counts = {kind: 0 for kind in verdicts.KINDS}
    for row in ledger:
        counts[row.verdict.kind] += 1
    return counts


def verdict_cell(row: LedgerRow) -> Cell:
    """The verdict, its tolerance, and the verdicts of the claim's other readings."""
    # a reading judged within another tolerance than the claim's says its own
    others = "; ".join(f"other reading ({label}): {reading.verdict.label}"
                       + (f" ({reading.claim.tolerance_text})"
                          if reading.claim.tolerance_text != row.claim.tolerance_text else "")
                       for label, reading in row.readings)
    detail = row.claim.tolerance_text + (f"; {others}" if others else "")
    return Cell(row.verdict.label, detail, VERDICT_CLASSES[row.verdict.kind])


def glance_table(ledger: list[LedgerRow]) -> Table:
    rows = []
    for row in ledger:
        ours = _observation_text(row.claim, row.basis) if row.basis is not None else "-"
        rows.append([Cell(row.claim.id), Cell(row.claim.claim), Cell(row.claim.figure_text), Cell(ours),
                     verdict_cell(row), Cell(basis_short(row.basis))])
    return Table(["ID", "Claim", "Documents", "Ours", "Verdict", "Rests on"], rows, css="glance")


def _observation_text(claim, observation: Observation | None) -> str:
    if observation is None:
        return "-"
    if observation.value is None:
        if observation.holds is not None:
            return "true" if observation.holds else "false"
        return f"{observation.status}: {observation.note}" if observation.note else observation.status
    if claim.compare == "statement" and observation.holds is not None:
        return "true" if observation.holds else "false"
    if claim.compare == "error":  # the value is an error; the note says what was found
        return observation.note
    return fmt_value(observation.value, claim.unit)


def _predicted_cell(claim, analytic: Observation | None, simulated: Observation | None, is_probe: bool) -> Cell:
    """One figure where the two methods agree within PREDICTIONS_AGREE (both in the sub-line), else both."""
    if is_probe:
        return Cell("n/a", "a property of the format or the arithmetic")
    found = [(name, obs) for name, obs in (("analytic", analytic), ("simulated", simulated)) if obs is not None]
    if not found:
        return Cell("-", "no prediction for this configuration")
    texts = {name: _observation_text(claim, obs) for name, obs in found}
    files = [f for _, obs in found for f in obs.extra.get("files", ()) if f]
    source = found[0][1].source + (f"; {', '.join(files)}; `python -m harness predict "
                                   "--claims` makes them again" if files else "")
    values = [obs.value for _, obs in found]
    if len(found) == 2 and None not in values and abs(values[0] - values[1]) <= PREDICTIONS_AGREE * abs(values[1]):
        return Cell(texts["simulated"], f"analytic {texts['analytic']}, simulated {texts['simulated']}; {source}")
    return Cell(" / ".join(f"{text} ({name})" for name, text in texts.items()), source)


def _measured_cell(row: LedgerRow) -> Cell:
    claim = row.claim
    if row.probe is not None:
        return Cell(row.probe.note, f"probe on {row.probe.device}, device-independent ({row.probe.source})")
    if claim.evidence["quantity"] in PROBE_QUANTITIES:
        return Cell("no probe file yet", f"needs {claim.needs}")
    gpu, cpu = row.gpu, row.cpu
    if gpu is not None and (gpu.value is not None or gpu.holds is not None):
        text = _observation_text(claim, gpu)
        files = gpu.extra.get("files")
        where = (f"; record {', '.join(f for f in files if f)}; `make bench` on a CUDA machine "
                 "measures it again") if files else ""
        if gpu.extra.get("derived"):  # arithmetic on a measurement is not itself measured
            return Cell(f"{text} derived from a run on {gpu.device}",
                        f"derived: {gpu.extra['derived']}; {gpu.source}{where}")
        # which of a run's memories the figure is: the ledger's peaks are torch's peak allocated (the tensors), where
        # the first section's memory is what the card held (device-used)
        what = RUN_MEMORY_WORDS.get(claim.evidence["quantity"], "")
        return Cell(f"{text} on {gpu.device}", what + gpu.source + (f"; {gpu.note}" if gpu.note else "") + where)
    parts = []
    if gpu is not None:  # an OOM or failed run on a GPU
        parts.append(Cell(f"{gpu.status} on {gpu.device}", f"{gpu.source}; {gpu.note}"))
    else:
        parts.append(Cell("-", f"needs {claim.needs}"))
    if cpu is not None and cpu.value is not None:
        detail = f"CPU (tracked tensor bytes, not a GPU figure): {_observation_text(claim, cpu)}, {cpu.source}"
        return Cell(parts[0].text, parts[0].detail + "; " + detail)
    return parts[0]


def _published_cell(claim) -> Cell:
    if not claim.published:
        return Cell("-")
    return Cell(claim.published["figure"], claim.published["source"])


def _claim_cell(claim) -> Cell:
    detail = f"they write: \"{claim.quote}\"; {claim.model}" if claim.quote else claim.model
    return Cell(claim.claim, detail)


def _why_cell(row: LedgerRow) -> Cell:
    readings = [f"Other reading ({label}): {reading.why}" for label, reading in row.readings]
    return Cell(row.why, " ".join(filter(None, [row.also and f"Also {row.also}.", *readings])))


def ledger_table(ledger: list[LedgerRow]) -> Table:
    rows = []
    for row in ledger:
        claim = row.claim
        is_probe = row.probe is not None or claim.evidence["quantity"] in PROBE_QUANTITIES
        rows.append([
            Cell(claim.id, " + ".join(claim.sources)),
            _claim_cell(claim),
            Cell(claim.figure_text, UNIT_WORDS.get(claim.unit, claim.unit)),
            _predicted_cell(claim, row.analytic, row.simulated, is_probe),
            _measured_cell(row),
            _published_cell(claim),
            verdict_cell(row),
            _why_cell(row),
        ])
    note = ("Predicted: one figure where the analytic formula and the simulation agree within "
            f"{PREDICTIONS_AGREE:.0%} (both in the sub-line), else both. Measured \"-\": no GPU run of that "
            "configuration yet; the sub-line names the run that decides it.")
    return Table(["ID", "Claim", "Documents' figure", "Predicted", "Measured (device)", "Published",
                  "Verdict (tolerance)", "Why"], rows, note=note, css="ledger")


def published_table(ledger: list[LedgerRow], sources: dict[str, str]) -> Table:
    """Other projects' published figures against the lab's, one row each."""
    rows = []
    for row in ledger:
        claim = row.claim
        rows.append([
            Cell(claim.id, "; ".join(sources[key] for key in claim.sources)),
            Cell(claim.claim, f"checked as: {claim.model}"),
            Cell(claim.figure_text, claim.metric or ""),
            _predicted_cell(claim, row.analytic, row.simulated, False),
            _measured_cell(row),
            verdict_cell(row),
            _why_cell(row),
        ])
    note = ("Their figure as they publish it, and what it is: an estimate or rule, or a measurement and which "
            "(peak allocated: what the lab predicts; peak active: nearly the same; peak reserved adds the "
            "allocator's cache). Ours is the lab's figure for the configuration in the sub-line, the source's "
            "where it gives one. The relative error is theirs minus ours, over ours.")
    return Table(["ID", "What they publish", "Their figure", "Predicted", "Measured (device)", "Verdict (tolerance)",
                  "Why"], rows, note=note, css="ledger published")


# --- runs ---------------------------------------------------------------------------------------

def _status_cell(run: pd.Series) -> Cell:
    status = run["status"]
    if status in ("ok", "oom") and run["failed_attempts"]:
        attempts = f"{run['failed_attempts']} later attempt{'s' if run['failed_attempts'] > 1 else ''} failed (kept)"
    else:
        attempts = ""
    # the plan's answer to a CPU that only emulates the cell's dtype (the whole reason is in the record)
    emulated = "" if _missing(run["emulated"]) else (
        "its dtype is emulated here: shortened" if status == "ok" else "its dtype is emulated here: left to another machine")
    if status == "ok":
        shared = "" if _missing(run["shared_gpu"]) else f"beside another process: {run['shared_gpu']}"
        return Cell("ok", "; ".join(text for text in (shared, emulated, attempts) if text), css="status-ok")
    detail = _where_it_stopped(run)
    if status == "failed" and not _missing(run["error_type"]):
        detail = f"{run['error_type']} {detail}".strip()
    return Cell(str(status), "; ".join(text for text in (detail, emulated, attempts) if text), css=f"status-{status}")


def _where_it_stopped(run: pd.Series) -> str:
    """'at backward, step 0': the phase and the step a run that did not finish stopped in, as far as its record says."""
    parts = [f"at {run['error_phase']}" if not _missing(run["error_phase"]) else "",
             f"step {run['error_step']:.0f}" if not _missing(run["error_step"]) else ""]
    return ", ".join(part for part in parts if part)


def _timed_steps(run: pd.Series) -> str:
    """The steps a finished run timed; a run that stopped timed none of the steps it was given (its status
    cell says where it stopped). A cell may be run with several step counts (the cross-check of loops times more)."""
    if run["status"] != "ok" or _missing(run["steps"]):
        return ""
    return f"{run['steps']:.0f} timed step{'' if run['steps'] == 1 else 's'}"


def _budget_cell(run: pd.Series) -> Cell:
    """A budget as what it is: a card of the lab's convention (a "24 GB card" holds 24 GiB) or, for a budget
    counted in 1e9-byte GB, its bytes; beneath, the cap torch's allocator had on the run."""
    if _missing(run["budget_card_bytes"]):
        return Cell("")
    cap = "" if _missing(run["budget_cap_bytes"]) else f"allocator cap {fmt_bytes(run['budget_cap_bytes'])}"
    return Cell(fmt_card(run["budget_card_bytes"]), cap)


def _is_true(value) -> bool:
    """True, also as numpy's bool; None and NaN (not known) are not."""
    return not _missing(value) and bool(value)


def cpu_capability(run: pd.Series) -> str:
    """What the CPU of a run computes natively, as torch reported it (records made before it was recorded: '')."""
    if _missing(run["cpu_capability"]):
        return ""
    return f"{run['cpu_capability']}, bf16 {'native' if run['bf16_native'] else 'emulated'}"


def runs_table(runs: pd.DataFrame) -> Table:
    order = ["device_type", "device_name", "model", "experiment", "seq_len", "micro_batch", "grad_accum",
             "budget_gb", "file"]
    runs = runs.sort_values(order, na_position="first", kind="stable") if len(runs) else runs
    rows = []
    for _, run in runs.iterrows():
        cpu = run["device_type"] != "cuda"
        peak = fmt_gb(run["peak_allocated"])
        if _missing(run["peak_allocated"]) and not _missing(run["memory_reached"]):
            peak = f"≥{fmt_gb(run['memory_reached'])}"
        loss = _num(run["final_loss"], 3)
        rows.append([
            Cell(model_name(run["model"]), "random init" if _is_true(run["random_init"]) else ""),
            Cell(str(run["experiment"]), _timed_steps(run)),
            Cell("CPU" if cpu else str(run["device_name"]),
                 "; ".join(t for t in ("tracked bytes", cpu_capability(run)) if t) if cpu else ""),
            Cell(_num(run["seq_len"], 0)),
            Cell(f"{_num(run['micro_batch'], 0)} x {_num(run['grad_accum'], 0)}"),
            _budget_cell(run),
            _status_cell(run),
            Cell(peak), Cell(fmt_gb(run["peak_reserved"])), Cell(fmt_gb(run["peak_device_used"])),
            Cell(_num(run["tokens_per_s"], 0)),
            Cell("" if _missing(run["mfu"]) else f"{run['mfu'] * 100:.1f}"),
            Cell(loss, "random init: memory and speed only" if _is_true(run["random_init"])
                 else "" if _missing(run["eval_final"]) else f"held-out {run['eval_final']:.3f}"),
            Cell(_num(run["trainable_pct"], 2)),
        ])
    note = ("Memory in GB (1e9 bytes). On CUDA: peak allocated and reserved from torch's allocator, "
            "device-used from NVML (includes the CUDA context). CPU rows: peak tracked tensor bytes, "
            "not a GPU figure; reserved and device-used do not exist there. OOM rows show the memory "
            "reached (≥) where known. Budget: the card a run was capped to, named as sold (a \"24 GB card\" "
            "holds 24 GiB), or a budget in bytes where it was not such a card; beneath, the cap torch's "
            "allocator had. Tokens/s: median step time after warm-up. MFU: against the card's peak for "
            "the dtype the products run in (glossary).")
    return Table(["Model", "Experiment", "Device", "Seq", "Micro-batch x accum.", "Budget", "Status",
                  "Peak alloc. GB", "Reserved GB", "Device-used GB", "Tokens/s", "MFU %", "Final loss",
                  "Trainable %"], rows, note, css="runs", numeric={3, 7, 8, 9, 10, 11, 12, 13})


# --- predicted against measured ----------------------------------------------------------------

def _signed_percent(fraction) -> str:
    return "" if _missing(fraction) else f"{round(fraction * 100, 1) + 0.0:+.1f}"


def accuracy_table(errors: pd.DataFrame) -> Table:
    """Per GPU run: the allocator's peak and what surrounds it, each prediction and its error."""
    rows = []
    for _, run in errors.sort_values(["model", "seq_len", "experiment", "grad_accum"], kind="stable").iterrows():
        cache = None if _missing(run["peak_reserved"]) else run["peak_reserved"] - run["peak_allocated"]
        untracked = (None if _missing(run["tracked_step_peak"])
                     else run["peak_allocated"] - run["tracked_step_peak"])
        rows.append([
            Cell(model_name(run["model"])), Cell(str(run["experiment"])),
            Cell(f"{run['seq_len']} x {run['micro_batch']} x {run['grad_accum']}"), Cell(str(run["device_name"])),
            Cell(fmt_gb(run["peak_allocated"])),
            Cell(fmt_gb(untracked), "the tracker counted more than torch allocated: it runs compiled code eagerly "
                 "(TensorTracker's force_eager stance), counting intermediates the compiled step never allocates; "
                 "its breakdown overstates" if not _missing(untracked) and untracked < 0 else ""),
            Cell(fmt_gb(cache)),
            Cell(fmt_gb(run["device_used_before_load"])), Cell(fmt_gb(run["peak_device_used"])),
            Cell(fmt_gb(run["simulated_total"]), _signed_percent(run["simulated_error"]) + " %",
                 "off" if "simulated" in run["outside"] else ""),
            Cell(fmt_gb(run["analytic_total"]), _signed_percent(run["analytic_error"]) + " %",
                 "off" if "analytic" in run["outside"] else ""),
            Cell("" if _missing(run["mfu"]) else f"{run['mfu'] * 100:.1f}"),
            Cell(run["reason"]),
        ])
    note = ("GB (1e9 bytes). Allocated: torch's peak allocated bytes over the timed steps, what the predictions "
            "predict. Untracked: allocated minus the tracked step's peak of live tensor bytes (allocator "
            "rounding, cuBLAS workspaces). Cache: reserved minus allocated (the caching allocator's free "
            "blocks). Context: NVML device-used before the model was built (CUDA context, kernels). Device "
            "used: NVML's peak for the whole GPU, what a card must hold. Predictions with their error against "
            "allocated; tolerance ±3% simulated, ±10% analytic. MFU: model FLOPs utilisation of the timed "
            "steps at the card's dense peak for the dtype its products run in (an fp32 run's against fp32's "
            "peak, 15 times below bf16's on an H200: a high fp32 MFU is not a fast run).")
    return Table(["Model", "Experiment", "Seq x micro-batch x accum.", "Device", "Allocated", "Untracked",
                  "Cache", "Context", "Device used", "Simulated", "Analytic", "MFU %", "Outside tolerance: why"],
                 rows, note, css="accuracy", numeric={4, 5, 6, 7, 8, 9, 10, 11})


def accuracy_category_table(errors: pd.DataFrame) -> Table:
    """Per GPU run and memory category: bytes alive at the tracked step's peak against each prediction."""
    rows = []
    for _, run in errors.sort_values(["model", "seq_len", "experiment", "grad_accum"], kind="stable").iterrows():
        cells = [Cell(model_name(run["model"])), Cell(str(run["experiment"])),
                 Cell(f"{run['seq_len']} x {run['micro_batch']} x {run['grad_accum']}")]
        for category in CATEGORIES:
            measured = run[f"peak_{category}"]
            if _missing(measured) or (not measured and not run[f"simulated_{category}"]):
                cells.append(Cell("" if _missing(measured) else "0"))
                continue
            detail = " · ".join(f"{label} {_signed_gb(run[f'{method}_{category}'], measured)}"
                                for method, label in (("simulated", "sim"), ("analytic", "ana")))
            cells.append(Cell(fmt_gb(measured), detail))
        rows.append(cells)
    note = ("GB alive at the peak of the tracked step on the GPU, by category, with each prediction's "
            "difference (predicted minus measured, GB). The tracked step counts live tensor storages as the "
            "simulation does, so a difference here is a tensor a predictor does not know about.")
    return Table(["Model", "Experiment", "Seq x micro-batch x accum.", *[CATEGORY_WORDS[c] for c in CATEGORIES]],
                 rows, note, css="accuracy-categories", numeric=set(range(3, 3 + len(CATEGORIES))))


def _signed_gb(predicted, measured) -> str:
    if _missing(predicted) or _missing(measured):
        return "-"
    return f"{round((predicted - measured) / 1e9, 3) + 0.0:+.3f}"


# --- loss on a pretrained base -----------------------------------------------------------------

def base_table(results: Results) -> Table:
    """The lab's pretrained base models: did they learn?"""
    rows = []
    for base in results.bases:
        recipe = base.get("recipe") or {}
        held_out = base.get("held_out") or []
        device = (base.get("environment") or {}).get("device_name") or base.get("device_type", "?")
        identity = schema.base_identity(base.get("recipe_id"), base.get("weights_digest"))
        rows.append([Cell(identity, f"preset {recipe.get('preset')}"),
                     Cell(str(device)),
                     Cell(_num(base.get("parameters"), 0)), Cell(_num(base.get("tokens_trained"), 0)),
                     Cell(_num(held_out[0]["loss"] if held_out else None, 3)),
                     Cell(_num(base.get("final_held_out_loss"), 3)), Cell(_num(base.get("uniform_loss"), 3)),
                     Cell(_num(base.get("seconds"), 0))])
    note = ("Pretrained with bf16 mixed precision on the standard library's modules; held-out loss on every "
            "10th module, never trained on. Uniform: the loss of a model that knows nothing, ln(vocabulary).")
    return Table(["Base", "Device", "Parameters", "Tokens trained", "Held-out loss at start", "Held-out loss at end",
                  "Uniform loss", "Seconds"], rows, note, css="bases", numeric={2, 3, 4, 5, 6, 7})


def loss_parity_table(comparisons: list[LossComparison]) -> Table:
    rows = []
    for comparison in comparisons:
        record, rule, verdict = comparison.record, comparison.rule, comparison.verdict
        config = record.get("config") or {}
        device = (record.get("environment") or {}).get("device_name") or config.get("device", "?")
        rows.append([
            Cell(model_name(record.get("model")), str(config.get("base_checkpoint") or "")),
            Cell(str(device)),
            Cell(str(record.get("experiment"))),
            _learning_rate_cell(comparison),
            # the comparison's steps and shape: one reference's loss differs from another's by them (6 or 30 steps)
            Cell(_num(config.get("steps"), 0), f"sequence {config.get('seq_len')} x micro-batch {config.get('micro_batch')}"),
            Cell(_num(comparison.loss, 4)),
            Cell(rule.reference if rule else "", _num(comparison.reference_loss, 4)),
            Cell("" if comparison.difference is None else f"{round(comparison.difference, 4) + 0.0:+.4f}"),
            Cell("" if comparison.ratio is None else f"{comparison.ratio:.4f}"),
            Cell(f"+{rule.tolerance:.0%}" if rule else ""),
            Cell(verdict.label, verdict.reason, VERDICT_CLASSES[verdict.kind]),
            Cell(rule.why if rule else ""),
        ])
    note = ("Final held-out loss (mean next-token cross-entropy, nats) after the same optimizer steps on the "
            "same batches, each run at its own learning rate (beneath it, the reference's where that differs). "
            "Difference and ratio against the reference run of the same comparison; the "
            "tolerance is the largest allowed relative excess over it. The model's sub-line names the base (its "
            "recipe @ its weights): the recipe pretrained on another CPU gives other weights, so a run is compared "
            "with the reference run on its own base, even where a newer run of that reference's configuration "
            "on the other base is the one the other tables show.")
    return Table(["Model", "Device", "Experiment", "Learning rate", "Steps", "Held-out loss", "Reference",
                  "Difference", "Ratio", "Tolerance", "Verdict", "Why this tolerance"], rows, note, css="loss",
                 numeric={3, 4, 5, 7, 8, 9})


def _learning_rate_cell(comparison: LossComparison) -> Cell:
    """The run's learning rate, and its reference's beneath where the comparison crosses learning rates."""
    rate = comparison.learning_rate
    crossed = comparison.crosses_learning_rates and comparison.reference_learning_rate is not None
    return Cell("" if rate is None else f"{rate:g}",
                f"{comparison.rule.reference} at {comparison.reference_learning_rate:g}" if crossed else "")


def predictions_table(predictions: pd.DataFrame) -> Table:
    if predictions.empty:
        return Table([], [])
    keys = ["model", "experiment", "seq_len", "micro_batch", "world_size", "device_type"]
    wide = predictions.pivot_table(index=keys, columns="method", values="total_bytes", aggfunc="first")
    rows = []
    for index, values in wide.sort_index().iterrows():
        model, experiment, seq, batch, world_size, device_type = index
        analytic, simulated = values.get("analytic"), values.get("simulated")
        difference = ("" if _missing(analytic) or _missing(simulated) or not simulated
                      else f"{round((analytic - simulated) / simulated * 100, 1) + 0.0:+.1f}")
        ranks = f", one of {world_size} ranks" if world_size > 1 else ""
        # `predict --claims` makes both methods: a missing one is a step that method cannot take, said by predict
        missing = Cell("-", f"not predicted: `python -m harness predict --model {model} --experiment {experiment}` "
                            "says why")
        rows.append([Cell(model_name(model)), Cell(experiment), Cell(f"{seq} x {batch}{ranks}"), Cell(device_type),
                     missing if _missing(analytic) else Cell(fmt_gb(analytic, 2)),
                     missing if _missing(simulated) else Cell(fmt_gb(simulated, 2)), Cell(difference or "-")])
    note = ("Predicted peak of one training step, GB (1e9 bytes). Analytic: bytes per parameter and a walk "
            "through one decoder layer. Simulated: the real step traced under fake tensors (no memory used).")
    return Table(["Model", "Experiment", "Seq x batch", "Code path", "Analytic GB", "Simulated GB",
                  "Analytic vs simulated %"], rows, note, css="predictions", numeric={4, 5, 6})


# --- micro-benchmarks -------------------------------------------------------------------------

def microbench_table(entries: list[dict]) -> Table:
    """Median time and ratio to the group's baseline, one column pair per file (devices side by side)."""
    if not entries:
        return Table([], [])
    per_file = [(entry, {(r["group"], r["name"]): r for r in ratios(entry["data"])}) for entry in entries]
    keys: list[tuple[str, str]] = []
    for _, table in per_file:
        keys.extend(k for k in table if k not in keys)
    columns = ["Group", "Benchmark"]
    for entry, _ in per_file:
        columns += [f"{entry['device']}: median", f"{entry['device']}: x baseline"]
    rows = []
    for group, name in keys:
        row = [Cell(group), Cell(name)]
        for _, table in per_file:
            found = table.get((group, name))
            if found is None:
                row += [Cell(""), Cell("")]
                continue
            baseline = found["name"] == found["baseline"]
            row += [Cell(format_seconds(found["median_s"])),
                    Cell("baseline" if baseline else ("" if found["ratio"] is None else f"{found['ratio']:.2f}x"))]
        rows.append(row)
    note = ("Each ratio is a benchmark's median time over its group's baseline median on the same device "
            "(baselines: a bf16 nn.Linear for the matmuls, torch AdamW for optimizer steps, a copy for "
            "quantization, the bare layer for LoRA). CPU files use scaled-down shapes.")
    numeric = set(range(2, len(columns)))
    return Table(columns, rows, note, css="microbench", numeric=numeric)


# --- provenance ---------------------------------------------------------------------------------

def prediction_versions(results: Results) -> dict[str, dict[str, int]]:
    """Library versions in words -> how many files of each kind of prediction were made with them."""
    return count_predictions(results, lambda prediction: fmt_versions(prediction.get("versions")))


def _lab_loop_only(results: Results) -> str:
    """What the provenance tables count: the lab's own loop, the runs of other loops being left to their section."""
    left_out = []
    if results.engine_records:
        left_out.append(f"the {fmt_counted(len(results.engine_records), 'run record')} of other training loops "
                        "(\"Our loop against Trainer\" compares them)")
    if results.allocator_records:
        left_out.append(f"the {fmt_counted(len(results.allocator_records), 'run record')} under an allocator setting "
                        "of their own (the boundary table judges them)")
    if not left_out:
        return ""
    return (f"Runs of the lab's own loop under torch's default allocator "
            f"({fmt_counted(len(results.records), 'run record')}), here and in the two tables below; left out: "
            + "; ".join(left_out) + ".")


def provenance_tables(results: Results) -> list[tuple[str, Table]]:
    devices: dict[tuple, int] = {}
    software: dict[tuple, int] = {}
    commits: dict[tuple, int] = {}
    unrecorded = "not recorded"  # a record of a run stopped or skipped before its environment was read
    for record in results.records:
        environment = record.get("environment") or {}
        key = (device_name(record), environment.get("device_type") or (unrecorded if not environment else ""),
               str(environment.get("driver") or ""), str(environment.get("cuda") or ""),
               environment.get("platform") or "")
        devices[key] = devices.get(key, 0) + 1
        versions = environment.get("versions") or {}
        vkey = tuple((name, fmt_version(versions, name)) for name in sorted(versions))
        software[vkey] = software.get(vkey, 0) + 1
        git = environment.get("git") or {}
        ckey = (str(git["commit"]) if git.get("commit") else unrecorded,
                "" if git.get("dirty") is None else str(git["dirty"]), git.get("code_digest") or "",
                git.get("files_commit") or "", git.get("note") or "")
        commits[ckey] = commits.get(ckey, 0) + 1
    tables = []
    if devices:
        tables.append(("Devices", Table(
            ["Device", "Type", "Driver", "CUDA", "Platform", "Runs"],
            [[Cell(k[0]), Cell(k[1]), Cell(k[2]), Cell(k[3]), Cell(k[4]), Cell(str(n))]
             for k, n in sorted(devices.items())], note=_lab_loop_only(results), numeric={5})))
    if software:
        tables.append(("Software of the runs", Table(
            ["Versions", "Runs"],
            [[Cell(", ".join(f"{name} {version}" for name, version in k) or unrecorded), Cell(str(n))]
             for k, n in sorted(software.items())], numeric={1})))
    if commits:
        tables.append(("Code of the runs", Table(
            ["Commit", "Uncommitted changes", "Code digest (harness/*.py)", "Runs"],
            [[Cell(k[0], f"files of {k[3]}: {k[4]}" if k[3] else ""), Cell(k[1]), Cell(k[2]), Cell(str(n))]
             for k, n in sorted(commits.items())], numeric={3})))
    other = []
    for name, probe in sorted(results.probes.items()):
        other.append([Cell(probe["_file"]), Cell(str(probe.get("device"))), Cell(str(probe.get("created", ""))),
                      Cell(fmt_versions(probe.get("versions")))])
    for text, counts in sorted(prediction_versions(results).items()):
        other.append([Cell(fmt_counts(counts)), Cell("-"), Cell(""), Cell(text)])
    for entry in results.microbench:
        data = entry["data"]
        commit = data.get("commit_info") or {}
        machine = data.get("machine_info") or {}
        cpu = (machine.get("cpu") or {}).get("brand_raw", "")
        other.append([Cell(entry["file"]), Cell(entry["device"]), Cell(str(data.get("datetime", ""))),
                      Cell(f"pytest-benchmark {data.get('version', '?')}, python {machine.get('python_version', '?')}, "
                           f"{cpu}, commit {commit.get('id', '?')}{' (dirty)' if commit.get('dirty') else ''}")])
    if other:
        tables.append(("Probes, predictions and micro-benchmarks", Table(["File", "Device", "Created", "Software"],
                                                                          other)))
    return tables
