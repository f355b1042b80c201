"""Ratios of the kernel micro-benchmarks: each benchmark's median over its group's baseline median.

Reads pytest-benchmark JSON files (results/microbench/*.json) and imports no torch, so
reports can use it. `python -m harness.report.microbench FILE...` prints the table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def device_of(data: dict) -> str:
    """The device the benchmarks ran on ("cpu" or a GPU name), from their extra_info."""
    devices = {b.get("extra_info", {}).get("device") for b in data["benchmarks"]}
    if len(devices) != 1 or None in devices:
        raise ValueError(f"expected one device in the benchmarks' extra_info, found {sorted(map(str, devices))}")
    return devices.pop()


def ratios(data: dict) -> list[dict]:
    """One row per benchmark: group, name, median seconds, baseline name, median / baseline median.

    The ratio is None in a group without exactly one baseline. Rows keep the file's order
    within a group, baseline first.
    """
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        group = bench.get("extra_info", {}).get("group") or bench.get("group") or ""
        groups.setdefault(group, []).append(bench)
    rows = []
    for group, benches in groups.items():
        baselines = [b for b in benches if b.get("extra_info", {}).get("baseline")]
        baseline = baselines[0] if len(baselines) == 1 else None
        for bench in sorted(benches, key=lambda b: b is not baseline):
            median = bench["stats"]["median"]
            rows.append({
                "group": group,
                "name": bench["name"],
                "median_s": median,
                "baseline": baseline["name"] if baseline else None,
                "ratio": median / baseline["stats"]["median"] if baseline else None,
            })
    return rows


def format_seconds(value: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def format_table(rows: list[dict], device: str = "") -> str:
    width = max([len(r["name"]) for r in rows] + [9])
    lines = [f"micro-benchmarks{' on ' + device if device else ''}: median time, and ratio to the group's baseline"]
    group = None
    for row in rows:
        if row["group"] != group:
            group = row["group"]
            lines.append(f"{group}:")
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        mark = "  (baseline)" if row["name"] == row["baseline"] else ""
        lines.append(f"  {row['name']:<{width}} {format_seconds(row['median_s']):>10} {ratio:>8}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        print("usage: python -m harness.report.microbench results/microbench/FILE.json ...", file=sys.stderr)
        return 2
    for path in paths:
        data = load(path)
        print(format_table(ratios(data), device_of(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
