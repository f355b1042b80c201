import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"

# A short workload so that every technique runs in seconds on a 2-core CPU, also where bf16 is emulated
# (AVX2 without AVX512-BF16 or AMX: a bf16 step's time is its matrix products' FLOPs, so its tokens).
QUICK = {"seq_len": 32, "micro_batch": 2, "warmup_steps": 1, "steps": 2, "device": "cpu"}


def pytest_configure(config):
    # Tokenizers and token caches go to a fresh folder: tests never rely on a user's cache. Each parallel
    # worker (pytest-xdist: `make test` runs one per core) has its own, so that no cache file is written by
    # two processes at once.
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        os.environ["HARNESS_CACHE"] = tempfile.mkdtemp(prefix=f"harness-cache-{worker}-")
    else:
        os.environ.setdefault("HARNESS_CACHE", tempfile.mkdtemp(prefix="harness-cache-"))
    # Parallel workers share the cores: each worker's torch, and every run or rank it starts (they inherit the
    # environment), gets its share of them. OpenMP thread pools that together outnumber the cores spin against
    # each other: two runs at once with two threads each on 2 cores took 2.4 times as long as with one each.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The files with the most tests marked slow first (a stable sort: each file keeps its own order). `make
    test`'s parallel workers take whole files in this order (--no-loadscope-reorder): a file that starts real
    runs takes minutes, and one taken last would leave the other workers idle while it ends."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


def _session_folder(tmp_path_factory) -> Path:
    """A folder every parallel worker of this test session shares (the session's own without workers)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def experiments_dir() -> Path:
    return EXPERIMENTS


def run_dict(config, out, **options) -> tuple[Path, dict]:
    """Run a resolved config (harness.config.ResolvedConfig) in its own process; the record as the JSON object on
    disk."""
    from harness import schema
    from harness.lab.runner import run_config

    path, record = run_config(config, out, **options)
    return path, schema.to_dict(record)


@pytest.fixture(scope="session")
def quick_records(tmp_path_factory) -> dict:
    """Every experiment file run once on tiny-llama with the QUICK workload: {name: (path, record)}.

    Run once for the whole session, however many parallel workers ask: each file's run is made by the
    first worker to take its lock and read back by the others. Workers with an odd number take the
    files from the end, so that two workers share the runs instead of waiting on each other."""
    from filelock import FileLock

    from harness.config import experiment_files, resolve

    shared = _session_folder(tmp_path_factory) / "quick-records"
    shared.mkdir(exist_ok=True)
    files = experiment_files(EXPERIMENTS)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    records = {}
    for path in files[::-1] if int(worker.removeprefix("gw")) % 2 else files:
        done = shared / f"{path.stem}.json"
        with FileLock(shared / f"{path.stem}.lock"):
            if not done.exists():
                record_path, record = run_dict(resolve(path, QUICK), shared / "results")
                done.write_text(json.dumps({"path": str(record_path), "record": record}))
        saved = json.loads(done.read_text())
        records[path.stem] = (Path(saved["path"]), saved["record"])
    return {path.stem: records[path.stem] for path in files}


def altered(config, **fields):
    """A resolved config (harness.config.ResolvedConfig) with experiment fields changed past validation, as in a
    hand-edited one: its hash stays the validated one's."""
    import dataclasses

    return dataclasses.replace(config, experiment=dataclasses.replace(config.experiment, **fields))
