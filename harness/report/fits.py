"""The fit table in full: what fits each card, at which sequence length and micro-batch.

Read from the fit table `harness predict --claims` writes (results/fits/, a prediction: the
analytic search, which `harness predict --solve` confirms by simulation for any one cell).
Where a GPU run of the same model and technique at the reference shape exists, its measured
peak stands beside the predicted one, marked measured.
"""

from __future__ import annotations

import pandas as pd

from harness.measure.budget import budget_cap_bytes
from harness.report.answer import (EXPANDABLE, expandable_answer, lab_experiment, random_weights_words, seq_method,
                                   stands_for_answer)
from harness.report.tables import Cell, Table
from harness.report.units import fmt_bytes, gib
from harness.techniques import Technique

# Published "longest sequence that fits" figures of other projects, by the name of the case
# `harness predict --claims` answers (harness.predict.fit_table.COMPARED_CASES): (source, {card GB: tokens}).
PUBLISHED_MAX_SEQ_LEN = {
    "llama-3.1-8b qlora r32 + checkpointing": (
        "Unsloth's context-length table, its Hugging Face + Flash Attention 2 column", {24: 5_789, 40: 12_264,
                                                                                         80: 28_454}),
}


SIMULATED_MARK = "†"  # an answer confirmed by simulation (harness.predict.confirm); unmarked: analytic
# what expandable segments buy: the answers they lengthen by at least this much are listed (a smaller gain is
# within what two simulations of one step at the edge disagree by)
EXPANDABLE_LISTED_GAIN = 0.10


def _seq_text(row: pd.Series) -> str:
    if row["max_seq_len"] == 0:
        return "-"
    text = f"{row['max_seq_len']:,}"
    if row.get("seq_len_method") == "simulated":
        text += SIMULATED_MARK
    return text + " (context)" if row["seq_len_limited_by"] == "context" else text


def _micro_batch_text(row: pd.Series) -> str:
    text = f"{row['max_micro_batch']}"
    return text + SIMULATED_MARK if row.get("micro_batch_method") == "simulated" else text


def confirmed_counts(table: dict, axis: str = "seq_len") -> tuple[int, int]:
    """(answers confirmed by simulation, card-limited answers) of one axis, "seq_len" or "micro_batch": how much of
    the fit table the simulation holds. A micro-batch has no context to end it: every one that fits is the card's."""
    def limited(row: dict) -> bool:
        return ((row.get(f"analytic_max_{axis}") or row[f"max_{axis}"]) > 0
                and (axis != "seq_len" or row["seq_len_limited_by"] == "card"))
    rows = [row for row in table["rows"] if limited(row)]
    return sum(row.get(f"{axis}_method") == "simulated" for row in rows), len(rows)


def fit_tables(table: dict, runs: pd.DataFrame, random_peaks: dict | None = None) -> list[tuple[str, Table]]:
    """One table per model: techniques as rows, cards as columns. `random_peaks` (answer.random_weights_peaks):
    the steps whose bytes the weights' values change, where a random-init run is not the table's tensor peak."""
    rows = pd.DataFrame(table["rows"])
    cards = [int(gb) for gb in table["cards"]]
    out = []
    for model, of_model in rows.groupby("model", sort=False):
        lines = []
        for experiment, of_experiment in of_model.groupby("experiment", sort=False):
            plain = of_experiment[~of_experiment["gradient_checkpointing"]].set_index("card_gb")
            checkpointed = of_experiment[of_experiment["gradient_checkpointing"]].set_index("card_gb")
            line = [Cell(experiment), _peak_cell(plain, checkpointed, runs, model, experiment,
                                                 table["reference_shape"], random_peaks or {})]
            for card in cards:
                without, with_gc = plain.loc[card], checkpointed.loc[card]
                fits = without["max_seq_len"] > 0 or with_gc["max_seq_len"] > 0
                detail = (f"micro-batch at {table['micro_batch_seq_len']:,}: {_micro_batch_text(without)} / "
                          f"{_micro_batch_text(with_gc)}")
                if any(_expandable_says_more(row) for row in (without, with_gc)):
                    detail += "; expandable segments: " + " / ".join(_expandable_text(row) for row in (without, with_gc))
                line.append(Cell(f"{_seq_text(without)} / {_seq_text(with_gc)}", detail,
                                 css="" if fits else "status-oom"))
            lines.append(line)
        seq_len, micro_batch = table["reference_shape"]
        columns = ["Technique", f"Tensor peak at {seq_len} x {micro_batch}, predicted"] + [
            f"{card} GB card ({gib(table['cards'][str(card)]['card_bytes']):.1f} GiB)" for card in cards]
        out.append((model, Table(columns, lines, css="fits", numeric=set(range(2, 2 + len(cards))))))
    return out


def _expandable_says_more(row: pd.Series) -> bool:
    """Whether a fit row's answer with expandable segments tells a reader something: simulated, or the model's
    context where the default allocator's answer is the card's."""
    answer = row.get(EXPANDABLE)
    return bool(expandable_answer(row)) or (isinstance(answer, dict) and answer["seq_len_limited_by"] == "context"
                                            and answer["max_seq_len"] > 0 and row["seq_len_limited_by"] == "card")


def _expandable_text(row: pd.Series) -> str:
    """A fit row's answer with expandable segments, as a cell says it: simulated, the model's context, or neither."""
    answer = row.get(EXPANDABLE)
    if not isinstance(answer, dict) or answer["max_seq_len"] == 0:
        return "-" if isinstance(answer, dict) else "not answered"
    if expandable_answer(row) or answer["seq_len_limited_by"] == "context":
        return _seq_text(pd.Series(answer))
    return "not simulated yet"


def expandable_table(table: dict) -> tuple[Table | None, str]:
    """What PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True buys: the answers it lengthens by at least
    EXPANDABLE_LISTED_GAIN, both simulated, largest gain first; and a sentence that counts them all."""
    pairs = [(row, answer) for row in table["rows"] if (answer := expandable_answer(row))
             and row.get("seq_len_method") == "simulated" and row["max_seq_len"] > 0]
    if not pairs:
        return None, ""
    gains = sorted(((answer["max_seq_len"] / row["max_seq_len"] - 1, row, answer) for row, answer in pairs),
                   key=lambda item: -item[0])
    listed = [item for item in gains if item[0] >= EXPANDABLE_LISTED_GAIN]
    lowered = [item for item in gains if item[1].get("simulated_fails_at") is not None]
    median = sorted(gain for gain, _, _ in gains)[len(gains) // 2]
    said = (f"With PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, {len(pairs)} of the card-limited answers are "
            f"simulated under both settings: the median answer is {median:+.1%} longer, "
            f"{sum(gain > 0 for gain, _, _ in gains)} are longer and {sum(gain < 0 for gain, _, _ in gains)} "
            f"shorter; of the {len(lowered)} whose default answer fragmentation lowered below the formula's, "
            f"{sum(gain > 0 for gain, _, _ in lowered)} are longer with it. "
            f"Listed: those {EXPANDABLE_LISTED_GAIN:.0%} longer or more.")
    only = [f"{row['model']} {row['experiment']}{' + checkpointing' if row['gradient_checkpointing'] else ''} on "
            f"{row['card_gb']:g} GB ({answer['max_seq_len']:,})" for row in table["rows"]
            if row["max_seq_len"] == 0 and (answer := expandable_answer(row)) and answer["max_seq_len"] > 0]
    if only:
        said += (" Where the formula fits nothing with the default allocator (its reserve a ratio over the tensors; "
                 "not simulated), expandable segments fit, simulated: " + "; ".join(only) + ".")
    if not listed:
        return None, said
    lines = [[Cell(row["model"]), Cell(row["experiment"] + (" + checkpointing" if row["gradient_checkpointing"] else "")),
              Cell(f"{row['card_gb']:g} GB"), Cell(_seq_text(pd.Series(row))),
              Cell(_seq_text(pd.Series(answer)), f"analytic {answer['analytic_max_seq_len']:,}"),
              Cell(f"{gain:+.0%}")] for gain, row, answer in listed]
    return Table(["Model", "Recipe", "Card", "Default allocator", "Expandable segments", "Gain"], lines,
                 numeric={3, 4, 5},
                 note="Both answers confirmed by simulation: the step traced, the caching allocator replayed "
                      "under the card's cap with each setting (torch's default: segments given back only when "
                      "wholly free; expandable segments: the whole free pages anywhere unmapped and mapped "
                      "again where a request fits). Reproduce one: `python -m harness predict --solve seq_len "
                      "--model M --experiment E --card GB --allocator expandable_segments`."), said


def _peak_cell(plain: pd.DataFrame, checkpointed: pd.DataFrame, runs: pd.DataFrame, model: str,
               experiment: str, reference_shape: list[int], random_peaks: dict) -> Cell:
    """The tensors' peak at the reference shape, without and with checkpointing, each with torch's peak allocated
    beside where a GPU run measured it (said apart where the run's random weights are not the table's step:
    `random_peaks`, answer.random_weights_peaks)."""
    predicted = plain["reference_peak_bytes"].iloc[0]
    without = _measured_peak_words(runs, model, experiment, reference_shape,
                                   random_peaks.get((model, experiment)), predicted)
    gc = lab_experiment(experiment, True)
    with_gc = _measured_peak_words(runs, model, gc, reference_shape, random_peaks.get((model, gc)),
                                   checkpointed["reference_peak_bytes"].iloc[0])
    detail = "; ".join(part for part in (
        without, f"checkpointing: {fmt_bytes(checkpointed['reference_peak_bytes'].iloc[0])}"
                 + (f", {with_gc}" if with_gc else "")) if part)
    return Cell(f"{fmt_bytes(predicted)}", detail)


def _measured_peak_words(runs: pd.DataFrame, model: str, experiment: str, reference_shape: list[int],
                         random_peak: int | None, predicted: int) -> str:
    """Torch's peak allocated of the first finished GPU run of `experiment` at the reference shape (the whole card,
    no accumulation), as a fit table's peak cell says it; empty where no run measured it."""
    measured = runs[(runs["device_type"] == "cuda") & (runs["model"] == model) & (runs["experiment"] == experiment)
                    & (runs["seq_len"] == reference_shape[0]) & (runs["micro_batch"] == reference_shape[1])
                    & (runs["status"] == "ok") & (runs["grad_accum"] == 1) & runs["budget_gb"].isna()]
    if not len(measured):
        return ""
    run = measured.iloc[0]
    on = f"{fmt_bytes(run['peak_allocated'])} on {run['device_name']} ({run['file']})"
    if not stands_for_answer(run["random_init"], random_peak):
        return (f"measured from random weights, torch's peak allocated: {on}, not this table's step: "
                + random_weights_words(random_peak, predicted))
    return f"measured, torch's peak allocated (the same tensor peak): {on}"


def published_comparison(table: dict, runs: pd.DataFrame) -> Table | None:
    """Our longest sequence beside other projects' published ones for the same case, and what GPU
    runs of the case under that card's budget measured."""
    cases = {(row["case"], row["card_gb"]): row for row in table["cases"]}
    lines = []
    for case, (source, figures) in PUBLISHED_MAX_SEQ_LEN.items():
        for card, tokens in figures.items():
            row = cases.get((case, card))
            if row is None:
                continue
            predicted = row["max_seq_len"]
            lines.append([Cell(case), Cell(f"{card} GB"), Cell(f"{tokens:,}", source),
                          Cell(f"{predicted:,}", f"predicted: {seq_method(row)}"),
                          Cell(f"{predicted / tokens:.2f}"),
                          _measured_under_budget(runs, row, table["cards"][str(card)]["card_bytes"])])
    if not lines:
        return None
    return Table(["Case", "Card", "Published longest sequence", "Ours (predicted)", "Ours / published",
                  "Measured under the card's budget"], lines, numeric={2, 3, 4},
                 note="Ours: the longest sequence whose predicted device bytes (the tensors' peak, the caching "
                      "allocator's reserve over it and the CUDA context) fit the card: the fit table's answer, "
                      "by the analytic search or confirmed by simulation (each says which). "
                      "Measured: GPU runs of the case with the allocator capped at the card's budget, each "
                      "sequence tried, fitting or not.")


def _measured_under_budget(runs: pd.DataFrame, case: dict, card_bytes: int) -> Cell:
    """GPU runs of the case's configuration capped at the card: which sequence lengths fit."""
    if not len(runs) or "experiment" not in case:
        return Cell("-")
    chosen = runs[(runs["device_type"] == "cuda") & (runs["experiment"] == case["experiment"])
                  & (runs["model"] == case["model"]) & runs["budget_card_bytes"].eq(card_bytes)]
    if not len(chosen):
        return Cell("-", "no GPU run under this budget yet")
    parts = []
    for _, run in chosen.sort_values("seq_len").iterrows():
        if run["status"] == "ok":
            parts.append(f"{int(run['seq_len']):,}: fits, peak {gib(run['peak_allocated']):.2f} GiB allocated, "
                         f"{gib(run['peak_reserved']):.2f} GiB reserved")
        else:
            parts.append(f"{int(run['seq_len']):,}: {run['status']} in {run['error_phase']}")
    caps = _caps_words(chosen, None)  # the room the runs had: the boundary table below sets it beside the card's
    return Cell("; ".join(parts), f"{chosen.iloc[0]['device_name']}"
                                  + (f"; {caps}the boundary table compares it with the card's" if caps else ""))


# The boundary's criterion: a fit answer never over-promises and lies within this fraction below the longest
# sequence that really trains on the emulated card (the boundary plan probes the answer and this much above it).
BOUNDARY_SHORTFALL = 0.03


def boundary_table(table: dict, runs: pd.DataFrame, predictions: list[dict] = (),
                   allocator_runs: pd.DataFrame | None = None) -> Table | None:
    """Every fit answer a GPU run under its emulated card (micro-batch 1), or a simulation replaying the
    allocator under that card's cap at the answer, has checked: the longest sequence that trained, the
    shortest that ran out, and whether the answer over-promises or lies within BOUNDARY_SHORTFALL below the
    boundary. allocator_runs: runs under an allocator setting of their own (`cuda_alloc_conf`), each judged by
    the fit answer with that setting."""
    if allocator_runs is not None and len(allocator_runs):
        runs = pd.concat([runs, allocator_runs], ignore_index=True) if len(runs) else allocator_runs
    capped = runs[(runs["device_type"] == "cuda") & runs["budget_card_bytes"].notna() & (runs["micro_batch"] == 1)
                  & (runs["grad_accum"] == 1) & runs["status"].isin(["ok", "oom"])] if len(runs) else runs
    # a card by its bytes: a budget run's record gives the card it emulated in bytes (older ones in GB of 1e9 B)
    card_of = {spec["card_bytes"]: int(gb) for gb, spec in table["cards"].items()}
    rows = {(lab_experiment(row["experiment"], row["gradient_checkpointing"]), row["model"], row["card_gb"]): row
            for row in table["rows"]}
    rows.update({(case["experiment"], case["model"], case["card_gb"]): case for case in table["cases"]})
    # by the card emulated (a card of the fit table by its size, another by its bytes) and the allocator setting
    measured = {}
    if len(capped):
        settings = capped.get("cuda_alloc_conf", pd.Series(None, index=capped.index, dtype=object)).fillna("")
        for (experiment, model, card_bytes, conf), group in capped.groupby(
                ["experiment", "model", "budget_card_bytes", settings]):
            measured[experiment, model, card_of.get(int(card_bytes), int(card_bytes)), conf] = group
    simulated = {}
    for prediction in predictions:
        replay = prediction.get("budget_replay")
        if prediction.get("method") != "simulated" or not replay or prediction.get("micro_batch") != 1:
            continue
        for gb in table["cards"]:
            key = (prediction["experiment"], prediction["model"], int(gb), "")
            row = rows.get(key[:3])
            if (row is not None and row["max_seq_len"] == prediction["seq_len"] and replay["cap_bytes"]
                    == budget_cap_bytes(int(gb), "cuda", Technique(**prediction["technique"]))):
                simulated[key] = prediction
    lines = []
    for experiment, model, card, conf in sorted(set(measured) | set(simulated), key=str):
        group, probe = measured.get((experiment, model, card, conf)), simulated.get((experiment, model, card, conf))
        trained = [] if group is None else sorted(int(n) for n in group.loc[group["status"] == "ok", "seq_len"])
        ran_out = [] if group is None else sorted(int(n) for n in group.loc[group["status"] == "oom", "seq_len"])
        row, setting = rows.get((experiment, model, card)), allocator_answer_key(conf)
        answered = _answer_with(row, setting)
        answer = None if answered is None else answered["max_seq_len"]
        fit_card = card in card_of.values()
        verdict, css = boundary_verdict(answer, trained, ran_out) if group is not None else (
            "not yet measured", "")
        where = "no GPU run yet" if group is None else (
            f"{', '.join(sorted(set(group['device_name'].astype(str))))}; "
            f"{_caps_words(group, probe)}"
            f"{', '.join(group.sort_values('seq_len')['file'])}")
        lines.append([Cell(f"{experiment} @ {model}" + (f", PYTORCH_CUDA_ALLOC_CONF={conf}" if conf else "")),
                      Cell(f"{card} GB" if fit_card else f"{gib(card):.2f} GiB",
                           "emulated" if fit_card else "emulated; not a card of the fit table"),
                      Cell("-" if answer is None else f"{answer:,}", _no_answer(row, setting, conf)
                           if answer is None else f"predicted: {seq_method(answered)}"),
                      _simulated_cell(probe) if setting is None
                      else _confirmed_cell(answered),
                      Cell(f"{trained[-1]:,}" if trained else "-", _tried_words(trained, "trained")),
                      Cell(f"{ran_out[0]:,}" if ran_out else "-", _tried_words(ran_out, "ran out")),
                      Cell(verdict, where, css=css)])
    if not lines:
        return None
    return Table(["Configuration", "Card", "Fit answer (predicted)", "Simulated at the answer",
                  "Longest that trained", "Shortest that ran out", "The answer, measured"], lines,
                 numeric={2, 4, 5},
                 note="Measured: GPU runs at micro-batch 1 with the allocator capped at the card less what lives "
                      "outside it (an emulated card), each sequence tried a record, fitting or not; the fit answer "
                      "is the fit table's for that card (with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                      "where a run set it, its answer with that setting, simulated). The boundary lies between "
                      "the longest sequence that trained and the shortest that ran out. The aim: the answer never "
                      f"over-promises and lies within {BOUNDARY_SHORTFALL:.0%} below the boundary. Simulated: the "
                      "step at the answer traced (fake tensors) and the caching allocator replayed under the same "
                      "cap, freeing its cache and retrying as torch does, before a GPU runs it. `make gpu-evidence` "
                      f"probes each answer and {BOUNDARY_SHORTFALL:.0%} above it (the `boundary` plan of "
                      "experiments/matrix.yaml); `python -m harness predict --claims` simulates them.")


def allocator_answer_key(conf: str | None) -> str | None:
    """Which fit answer judges a run under this PYTORCH_CUDA_ALLOC_CONF: torch's default allocator's (None),
    the answer with expandable segments (EXPANDABLE), or none ("": a setting the predictor does not replay)."""
    options = {name.strip(): value.strip().lower() for name, _, value in
               (part.partition(":") for part in (conf or "").split(",") if part.strip())}
    if options.get(EXPANDABLE) == "true" and set(options) == {EXPANDABLE}:
        return EXPANDABLE
    return None if not options or options == {EXPANDABLE: "false"} else ""


def _answer_with(row: dict | None, setting: str | None) -> dict | None:
    """A fit row's answer under an allocator setting (allocator_answer_key's): the row's own for torch's default,
    its simulated one with expandable segments, none for a setting the predictor does not replay."""
    if row is None or setting is None:
        return row
    return expandable_answer(row) if setting == EXPANDABLE else None


def _no_answer(row: dict | None, setting: str | None, conf: str) -> str:
    if row is None:
        return "no fit answer for this configuration"
    if setting == EXPANDABLE:
        return "its answer with expandable segments is not simulated yet (`python -m harness predict --confirm-fits`)"
    return f"the predictor does not replay PYTORCH_CUDA_ALLOC_CONF={conf}"


def _confirmed_cell(answer: dict | None) -> Cell:
    """Under an allocator setting, the simulation at the answer is its confirmation's (harness.predict.confirm)."""
    if answer is None:
        return Cell("-", "not simulated under the card's cap with this setting")
    ran_out = answer.get("simulated_fails_at")
    return Cell("fits", "confirmed by simulation under the card's cap with this setting"
                + (f"; runs out at {ran_out:,}" if ran_out is not None else ""))


def _tried_words(lengths: list[int], what: str) -> str:
    """The lengths that trained (or ran out) below the one a cell shows: every one where several did."""
    if len(lengths) > 1:
        return f"{what}: {', '.join(f'{n:,}' for n in lengths)}"
    return "the only one" if lengths else "none"


def _caps_words(group: pd.DataFrame, simulated: dict | None) -> str:
    """The allocator caps the runs had, and how they compare with the cap the simulation replays for the card:
    runs capped higher had more room than the card now leaves, so the boundary they bracket lies above its own."""
    caps = sorted({int(cap) for cap in group["budget_cap_bytes"].dropna()}) if "budget_cap_bytes" in group else []
    if not caps:
        return ""
    words = f"allocator capped at {', '.join(f'{gib(cap):.2f}' for cap in caps)} GiB"
    replayed = simulated["budget_replay"]["cap_bytes"] if simulated else None
    if replayed is not None and caps[0] > replayed:
        words += (f", {gib(caps[0] - replayed):.2f} GiB more room than the {gib(replayed):.2f} GiB the simulation "
                  "replays for this card (the card less what lives outside the allocator): the boundary these runs "
                  "bracket lies above the card's")
    elif replayed is not None and caps[-1] < replayed:
        words += (f", {gib(replayed - caps[-1]):.2f} GiB less room than the {gib(replayed):.2f} GiB the simulation "
                  "replays for this card: the boundary these runs bracket lies below the card's")
    return words + "; "


def _simulated_cell(prediction: dict | None) -> Cell:
    if prediction is None:
        return Cell("-", "not simulated under the card's cap")
    replay = prediction["budget_replay"]
    file = prediction.get("_file", "")
    if replay["oom"]:
        oom = replay["oom"]
        return Cell("runs out", f"asks {gib(oom['requested']):.2f} GiB with {gib(oom['allocated']):.2f} GiB "
                                f"allocated under a {gib(replay['cap_bytes']):.2f} GiB cap; {file}", css="status-oom")
    return Cell("fits", f"{gib(replay['peak_reserved']):.2f} GiB reserved under a {gib(replay['cap_bytes']):.2f} "
                        f"GiB cap; {file}")


def boundary_verdict(answer: int | None, trained: list[int], ran_out: list[int]) -> tuple[str, str]:
    """What the runs under an emulated card say of its fit answer, and the cell's shading."""
    if answer is None:
        return "no fit answer to judge", ""
    if any(n <= answer for n in ran_out):
        return f"over-promises: {min(ran_out):,} tokens ran out", "wrong"
    longest = max(trained, default=None)
    if longest is not None and longest > answer * (1 + BOUNDARY_SHORTFALL):
        return f"more than {BOUNDARY_SHORTFALL:.0%} short: {longest:,} tokens trained", "off"
    shortest_out = min(ran_out, default=None)
    if longest is not None and longest >= answer and shortest_out is not None and (
            shortest_out <= answer * (1 + BOUNDARY_SHORTFALL)):
        return f"holds: within {BOUNDARY_SHORTFALL:.0%} below the boundary", "holds"
    low = f"{longest:,} trained" if longest is not None else "nothing trained yet"
    high = f"{shortest_out:,} ran out" if shortest_out is not None else "nothing ran out yet"
    return f"consistent, not yet bracketed within {BOUNDARY_SHORTFALL:.0%} ({low}, {high})", ""
