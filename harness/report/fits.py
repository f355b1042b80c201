"""The fit table in full: what fits each card, at which sequence length and micro-batch.

Read from the fit table `harness predict --claims` writes (results/fits/, a prediction: the
analytic search, which `harness predict --solve` confirms by simulation for any one cell).
Where a GPU run of the same model and technique at the reference shape exists, its measured
peak stands beside the predicted one, marked measured.
"""

from __future__ import annotations

import pandas as pd

from harness.report.tables import Cell, Table
from harness.report.units import fmt_bytes, gib

# Published "longest sequence that fits" figures of other projects, by the name of the case
# `harness predict --claims` answers (harness.predict.solve.COMPARED_CASES): (source, {card GB: tokens}).
PUBLISHED_MAX_SEQ_LEN = {
    "llama-3.1-8b qlora r32 + checkpointing": (
        "Unsloth's context-length table, its Hugging Face + Flash Attention 2 column", {24: 5_789, 40: 12_264,
                                                                                         80: 28_454}),
}


def _seq_text(row: pd.Series) -> str:
    if row["max_seq_len"] == 0:
        return "-"
    text = f"{row['max_seq_len']:,}"
    return text + " (context)" if row["seq_len_limited_by"] == "context" else text


def fit_tables(table: dict, runs: pd.DataFrame) -> list[tuple[str, Table]]:
    """One table per model: techniques as rows, cards as columns."""
    rows = pd.DataFrame(table["rows"])
    cards = [int(gb) for gb in table["cards"]]
    out = []
    for model, of_model in rows.groupby("model", sort=False):
        lines = []
        for experiment, of_experiment in of_model.groupby("experiment", sort=False):
            plain = of_experiment[~of_experiment["gradient_checkpointing"]].set_index("card_gb")
            checkpointed = of_experiment[of_experiment["gradient_checkpointing"]].set_index("card_gb")
            line = [Cell(experiment), _peak_cell(plain, checkpointed, runs, model, experiment,
                                                 table["reference_shape"])]
            for card in cards:
                without, with_gc = plain.loc[card], checkpointed.loc[card]
                fits = without["max_seq_len"] > 0 or with_gc["max_seq_len"] > 0
                line.append(Cell(f"{_seq_text(without)} / {_seq_text(with_gc)}",
                                 f"micro-batch at {table['micro_batch_seq_len']:,}: {without['max_micro_batch']} / "
                                 f"{with_gc['max_micro_batch']}",
                                 css="" if fits else "status-oom"))
            lines.append(line)
        seq_len, micro_batch = table["reference_shape"]
        columns = ["Technique", f"Tensor peak at {seq_len} x {micro_batch}, predicted"] + [
            f"{card} GB card ({gib(table['cards'][str(card)]['card_bytes']):.1f} GiB)" for card in cards]
        out.append((model, Table(columns, lines, css="fits", numeric=set(range(2, 2 + len(cards))))))
    return out


def _peak_cell(plain: pd.DataFrame, checkpointed: pd.DataFrame, runs: pd.DataFrame, model: str,
               experiment: str, reference_shape: list[int]) -> Cell:
    predicted = plain["reference_peak_bytes"].iloc[0]
    detail = f"checkpointing: {fmt_bytes(checkpointed['reference_peak_bytes'].iloc[0])}"
    measured = runs[(runs["device_type"] == "cuda") & (runs["model"] == model) & (runs["experiment"] == experiment)
                    & (runs["seq_len"] == reference_shape[0]) & (runs["micro_batch"] == reference_shape[1])
                    & (runs["status"] == "ok") & (runs["grad_accum"] == 1) & runs["budget_gb"].isna()]
    if len(measured):
        run = measured.iloc[0]
        detail += (f"; measured, torch's peak allocated (the same tensor peak): {fmt_bytes(run['peak_allocated'])} "
                   f"on {run['device_name']} ({run['file']})")
    return Cell(f"{fmt_bytes(predicted)}", detail)


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
            lines.append([Cell(case), Cell(f"{card} GB"), Cell(f"{tokens:,}", source), Cell(f"{predicted:,}"),
                          Cell(f"{predicted / tokens:.2f}"),
                          _measured_under_budget(runs, row, table["cards"][str(card)]["card_bytes"])])
    if not lines:
        return None
    return Table(["Case", "Card", "Published longest sequence", "Ours (predicted)", "Ours / published",
                  "Measured under the card's budget"], lines, numeric={2, 3, 4},
                 note="Ours: the longest sequence whose predicted device bytes (the tensors' peak, the caching "
                      "allocator's reserve over it and the CUDA context) fit the card, by the analytic search. "
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
    return Cell("; ".join(parts), str(chosen.iloc[0]["device_name"]))
