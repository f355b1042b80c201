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


def _breakdown(categories: dict, host_bytes: int | None) -> str:
    parts = [f"{CATEGORY_WORDS[name]} {fmt_bytes(value)}" for name, value in categories.items() if value]
    if host_bytes:
        parts.append(f"host {fmt_bytes(host_bytes)}")
    return ", ".join(parts)


def _answer_cell(row: pd.Series, largest: int) -> Cell:
    if row["limited_by"] == "context":
        return Cell("-", f"past the model's context ({int(row['context']):,})")
    if row["limited_by"] == "not sharded":
        return Cell("-", f"one GPU: {fmt_bytes(row['analytic_bytes'])} per step; QLoRA is not sharded here",
                    css="status-oom")
    if row["limited_by"] == "world sizes":
        return Cell(f"> {largest}", f"at {largest}: {fmt_bytes(row['analytic_bytes'])} per rank", css="status-oom")
    size = int(row["world_size"])
    # each answer's breakdown is at its own peak, which may lie in another moment of the step than its neighbour's
    at = f" at {row['peak_at']}" if isinstance(row.get("peak_at"), str) else ""
    detail = f"{fmt_bytes(row['analytic_bytes'])} per rank{at}: " + _breakdown(row["categories"], row["host_bytes"])
    if not pd.isna(row.get("device_bytes", float("nan"))):  # tables written before device bytes lack it
        detail = f"on the card {fmt_bytes(row['device_bytes'])} per rank; tensors {detail}"
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


def peer_table(table: dict) -> Table | None:
    """The full fine-tuning answers beside ZeRO-3 and DeepSpeed's estimator, at the same world size."""
    rows = [r for r in table["rows"] if r.get("zero3_bytes") and r["world_size"]]
    if not rows:
        return None
    lines = []
    for row in rows:
        ours = row.get("simulated_bytes") or row["analytic_bytes"]
        estimate = row.get("deepspeed_zero3_bytes")
        states = sum(row["zero3_categories"][k] for k in ("weights", "gradients", "optimizer_state"))
        estimate_cell = Cell("-", "DeepSpeed is not installed") if estimate is None else Cell(
            fmt_bytes(estimate), f"{fmt_percent(estimate / row['zero3_bytes'] - 1, signed=True)} against the lab's "
                                 f"ZeRO-3; its model states alone: {fmt_bytes(states)} in the lab's terms")
        lines.append([Cell(row["model"]), Cell(row["row"]), Cell(f"{row['seq_len']:,}"), Cell(f"{row['card_gb']} GB"),
                      Cell(str(row["world_size"])),
                      Cell(fmt_bytes(ours), "simulated" if row.get("simulated_bytes") else "analytic"),
                      _tracker_cell(row.get("fsdp_mem_tracker"), ours),
                      Cell(fmt_bytes(row["zero3_bytes"]), _breakdown(row["zero3_categories"], row["zero3_host_bytes"])),
                      estimate_cell])
    return Table(["Model", "Training", "Sequence", "Card", "GPUs", "FSDP2 per rank (lab)", "torch's FSDPMemTracker",
                  "ZeRO-3 per rank (lab)", "DeepSpeed's ZeRO-3 estimate"], lines, numeric={4, 5, 6, 7, 8},
                 note="torch's FSDPMemTracker (torch.distributed._tools) ran on the lab's own sharded step under "
                      "the same fake tensors and fake process group as the simulation, where it was run (the 80 GB "
                      "answers at the shorter sequence, not offloaded: it counts one memory). "
                      "DeepSpeed's estimate_zero3_model_states_mem_needs counts 18 bytes per parameter over the "
                      "ranks plus 4 bytes per parameter of the largest layer, and no activations, no gathered "
                      "layers and no gradient buckets: at long sequences it falls far below what a rank holds. The "
                      "lab counts a ZeRO-3 rank's 16-bit parameters and gradients, fp32 masters and AdamW's two "
                      "fp32 states (16 bytes per parameter over the ranks), the fp32 copy of the gradient "
                      "partition during the step, the parameters gathered ahead and the reduce buckets "
                      "(harness.predict.analytic.sharded_candidates). FSDP2 keeps no 16-bit copy of the shards: "
                      "it casts each layer as it gathers it.")
