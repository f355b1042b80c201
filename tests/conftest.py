import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"

# A short workload so that every technique runs in seconds on a 2-core CPU, also where bf16 is emulated
# (AVX2 without AVX512-BF16 or AMX: a bf16 step's time is its matrix products' FLOPs, so its tokens).
QUICK = {"seq_len": 32, "micro_batch": 2, "warmup_steps": 1, "steps": 2, "device": "cpu"}


def pytest_configure(config):
    # Tokenizers and token caches go to a fresh folder: tests never rely on a user's cache.
    os.environ.setdefault("HARNESS_CACHE", tempfile.mkdtemp(prefix="harness-cache-"))


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
    """Every experiment file run once on tiny-llama with the QUICK workload: {name: (path, record)}."""
    from harness.config import experiment_files, resolve

    out = tmp_path_factory.mktemp("results")
    return {path.stem: run_dict(resolve(path, QUICK), out) for path in experiment_files(EXPERIMENTS)}


def altered(config, **fields):
    """A resolved config (harness.config.ResolvedConfig) with experiment fields changed past validation, as in a
    hand-edited one: its hash stays the validated one's."""
    import dataclasses

    return dataclasses.replace(config, experiment=dataclasses.replace(config.experiment, **fields))
