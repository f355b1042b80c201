"""The report's answer past one card: how many GPUs, of which size, with which sharding and offload.

Read from the table `harness predict --claims` writes (results/fits/how-many-gpus__cuda.json, a
prediction: the analytic per-rank search over world sizes, the simulation checking the 80 GB answers
at the shorter sequence). Beside the full fine-tuning answers: ZeRO-3 at the same world size as the lab
predicts it, and DeepSpeed's own estimator.
"""

from __future__ import annotations

import pandas as pd

from harness.report.tables import Cell, Table
from harness.report.units import CATEGORY_WORDS, fmt_bytes, fmt_percent, gib

# what DeepSpeed's estimate_zero3_model_states_mem_needs counts per rank on the card, in the lab's categories
MODEL_STATES = ("weights", "gradients", "optimizer_state")


def _breakdown(categories: dict, host_bytes: int | None) -> str:
    parts = [f"{CATEGORY_WORDS[name]} {fmt_bytes(value)}" for name, value in categories.items() if value]
    if host_bytes:
        parts.append(f"host {fmt_bytes(host_bytes)}")
    return ", ".join(parts)


def _has_device_bytes(row: pd.Series) -> bool:
    return not pd.isna(row.get("device_bytes", float("nan")))  # tables written before device bytes lack it


def _deciding_bytes(row: pd.Series, per: str) -> str:
    """What the card must hold, the figure a fit is decided on, the tensors beside: the tensor peak alone can lie
    under the card while the allocator's reserve and the CUDA context take it over."""
    tensors = f"{fmt_bytes(row['analytic_bytes'])} per {per}"
    if not _has_device_bytes(row):
        return tensors
    return f"on the card {fmt_bytes(row['device_bytes'])} per {per}; tensors {tensors}"


def _answer_cell(row: pd.Series, largest: int) -> Cell:
    if row["limited_by"] == "context":
        return Cell("-", f"past the model's context ({int(row['context']):,})")
    if row["limited_by"] == "not sharded":
        return Cell("-", f"one GPU: {_deciding_bytes(row, 'step')}; QLoRA is not sharded here", css="status-oom")
    if row["limited_by"] == "world sizes":
        return Cell(f"> {largest}", f"at {largest}: {_deciding_bytes(row, 'rank')}", css="status-oom")
    size = int(row["world_size"])
    # each answer's breakdown is at its own peak, which may lie in another moment of the step than its neighbour's
    at = f" at {row['peak_at']}" if isinstance(row.get("peak_at"), str) else ""
    detail = f"{_deciding_bytes(row, 'rank')}{at}: " + _breakdown(row["categories"], row["host_bytes"])
    if not pd.isna(row.get("simulated_bytes", float("nan"))):
        detail += f"; simulated {fmt_bytes(row['simulated_bytes'])}"
    return Cell(f"{size} GPU{'' if size == 1 else 's'}", detail)


def gpu_count_tables(table: dict) -> list[tuple[int, Table]]:
    """One table per sequence length: model and way of training as rows, cards as columns."""
    rows = pd.DataFrame(table["rows"])
    cards = [int(gb) for gb in table["cards"]]
    largest = max(table["world_sizes"])
    out = []
    for seq_len, of_seq in rows.groupby("seq_len", sort=True):
        lines = []
        for (model, way), answers in of_seq.groupby(["model", "row"], sort=False):
            by_card = answers.set_index("card_gb")
            lines.append([Cell(model), Cell(way)] + [_answer_cell(by_card.loc[card], largest) for card in cards])
        columns = ["Model", "Training"] + [
            f"{card} GB card ({gib(table['cards'][str(card)]['card_bytes']):.1f} GiB)" for card in cards]
        out.append((int(seq_len), Table(columns, lines, css="fits", numeric=set(range(2, 2 + len(cards))))))
    return out


def _tracker_cell(snapshot: dict | None, ours: int) -> Cell:
    if not snapshot:
        return Cell("-", "not run for this answer")
    parts = ", ".join(f"{name.lower()} {fmt_bytes(value)}" for name, value in snapshot.items()
                      if value and name != "Total")
    return Cell(fmt_bytes(snapshot["Total"]), f"{fmt_percent(snapshot['Total'] / ours - 1, signed=True)} against the "
                                              f"lab's; {parts}")


def _estimate_cell(row: dict) -> Cell:
    """DeepSpeed's estimate beside the lab's own model states, never beside the whole rank: it counts model states
    (and its largest layer) alone, no activations and no buffers, so a percentage against the rank's peak measures
    what it leaves out rather than how well it counts what it counts."""
    estimate = row.get("deepspeed_zero3_bytes")
    if estimate is None:
        return Cell("-", "DeepSpeed is not installed")
    states = {name: row["zero3_categories"].get(name, 0) for name in MODEL_STATES}
    held = fmt_bytes(sum(states.values()))
    if row.get("zero3_host_bytes"):
        # offloaded, DeepSpeed counts on the card only its largest layer; the lab's rank keeps its states on the host
        return Cell(fmt_bytes(estimate), "offloaded, it counts its largest layer alone (4 bytes per parameter), no "
                                         f"model states: no percentage; the lab's ZeRO-3 rank holds {held} of model "
                                         f"states on the card at its peak, {fmt_bytes(row['zero3_host_bytes'])} "
                                         "on the host")
    missing = [CATEGORY_WORDS[name] for name, value in states.items() if not value]
    if missing:
        # the lab's peak falls where part of the states is not held (no gradients yet): unlike what DeepSpeed sums
        return Cell(fmt_bytes(estimate), f"no percentage: the lab's ZeRO-3 peak holds no {' or '.join(missing)}, "
                                         f"which DeepSpeed counts; its model states there: {held}")
    return Cell(fmt_bytes(estimate), f"{fmt_percent(estimate / sum(states.values()) - 1, signed=True)} against the "
                                     f"lab's ZeRO-3 model states at its peak, {held}; its own adds its largest layer")


def peer_table(table: dict) -> Table | None:
    """The full fine-tuning answers beside ZeRO-3 and DeepSpeed's estimator, at the same world size."""
    rows = [r for r in table["rows"] if r.get("zero3_bytes") and r["world_size"]]
    if not rows:
        return None
    lines = []
    for row in rows:
        ours = row.get("simulated_bytes") or row["analytic_bytes"]
        lines.append([Cell(row["model"]), Cell(row["row"]), Cell(f"{row['seq_len']:,}"), Cell(f"{row['card_gb']} GB"),
                      Cell(str(row["world_size"])),
                      Cell(fmt_bytes(ours), "simulated" if row.get("simulated_bytes") else "analytic"),
                      _tracker_cell(row.get("fsdp_mem_tracker"), ours),
                      Cell(fmt_bytes(row["zero3_bytes"]), _breakdown(row["zero3_categories"], row["zero3_host_bytes"])),
                      _estimate_cell(row)])
    return Table(["Model", "Training", "Sequence", "Card", "GPUs", "FSDP2 per rank (lab)", "torch's FSDPMemTracker",
                  "ZeRO-3 per rank (lab)", "DeepSpeed's ZeRO-3 estimate"], lines, numeric={4, 5, 6, 7, 8},
                 note="torch's FSDPMemTracker (torch.distributed._tools) ran on the lab's own sharded step under "
                      "the same fake tensors and fake process group as the simulation, where it was run (the 80 GB "
                      "answers at the shorter sequence, not offloaded: it counts one memory). "
                      "DeepSpeed's estimate_zero3_model_states_mem_needs counts 18 bytes per parameter over the "
                      "ranks plus 4 bytes per parameter of the largest layer, and no activations, no gathered "
                      "layers and no gradient buckets: at long sequences it falls far below what a rank holds. "
                      "Its percentage is against the lab's ZeRO-3 model states (weights, gradients, optimizer "
                      "state) at the lab's peak, and only where that peak holds all three; offloaded, DeepSpeed "
                      "counts on the card 4 bytes per parameter of its largest layer alone. The "
                      "lab counts a ZeRO-3 rank's 16-bit parameters and gradients, fp32 masters and AdamW's two "
                      "fp32 states (16 bytes per parameter over the ranks), the fp32 copy of the gradient "
                      "partition during the step, the parameters gathered ahead and the reduce buckets "
                      "(harness.predict.analytic.sharded_candidates). FSDP2 keeps no 16-bit copy of the shards: "
                      "it casts each layer as it gathers it.")
