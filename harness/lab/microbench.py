"""Run the kernel micro-benchmarks in benchmarks/ and save their JSON under results/microbench/.

`python -m harness.lab.microbench` (what `make microbench` runs) uses the sizes of the
device found: LLM shapes on CUDA, scaled-down shapes on CPU. The file is named after
the device the benchmarks report in their extra_info (`cpu.json`,
`nvidia-h100-80gb-hbm3.json`); a run at other sizes than the device's own gets the size
as a suffix (`cpu-tiny.json`), so it never replaces a real measurement. The file
appears only when the whole suite passed, in one rename.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from harness.env import device_slug
from harness.report.microbench import device_of, format_table, load, ratios

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SIZES = ("auto", "tiny", "cpu", "cuda")
# A smoke run: every benchmark executes at least once, and the whole suite takes seconds.
QUICK = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.05", "--benchmark-warmup=off"]


def output_name(data: dict) -> str:
    device = device_of(data)
    size = data["benchmarks"][0]["extra_info"]["size"]
    native = "cpu" if device == "cpu" else "cuda"
    return device_slug(device) + ("" if size == native else f"-{size}") + ".json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.lab.microbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="auto",
                        help="shapes: auto (cuda where a GPU is, else cpu), tiny (a smoke run), cpu, cuda")
    parser.add_argument("--out", type=Path, default=Path("results/microbench"), help="folder for the JSON")
    parser.add_argument("--quick", action="store_true", help="one round per benchmark (default with --size tiny)")
    args, pytest_args = parser.parse_known_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / f".microbench-{os.getpid()}.json.tmp"
    timing = QUICK if args.quick or args.size == "tiny" else []
    command = [sys.executable, "-m", "pytest", str(BENCHMARKS), "-q", f"--benchmark-json={partial}",
               *timing, *pytest_args]
    # pytest-benchmark measures nothing inside a pytest-xdist worker (it reads PYTEST_XDIST_WORKER), so a
    # run started from one (the test suite under `make test`) must not hand those variables on.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST_")}
    try:
        code = subprocess.run(command, env={**env, "MICROBENCH_SIZE": args.size}).returncode
        if code != 0:
            print(f"micro-benchmarks failed (pytest exit status {code}); nothing saved", file=sys.stderr)
            return code
        if not partial.exists():
            print("micro-benchmarks ran but pytest-benchmark wrote no JSON (disabled?); nothing saved", file=sys.stderr)
            return 1
        data = load(partial)
        path = args.out / output_name(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    print()
    print(format_table(ratios(data), device_of(data)))
    print(f"saved: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
