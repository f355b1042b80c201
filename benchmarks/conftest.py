"""Sizes, device and bookkeeping shared by every micro-benchmark.

MICROBENCH_SIZE picks the shapes: `cuda` (LLM shapes: hidden 4096, MLP 11008, 512 to
4096 tokens), `cpu` (the same proportions scaled down so that a 2-core run takes a
couple of minutes), `tiny` (a smoke run that executes each benchmark once or twice), or
`auto` (the default: `cuda` where torch sees a GPU, else `cpu`).

Every benchmark names its group and whether it is the group's baseline in extra_info,
so that ratios (median / baseline median) can be computed from the JSON alone.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import pytest
import torch


@dataclass(frozen=True)
class Sizes:
    hidden: int               # model width: the input features of an MLP up-projection
    mlp: int                  # MLP width: its output features
    tokens: tuple[int, ...]   # tokens per forward (batch x sequence), one benchmark each


SIZES = {
    "tiny": Sizes(hidden=128, mlp=256, tokens=(16,)),
    "cpu": Sizes(hidden=1024, mlp=2752, tokens=(512,)),
    "cuda": Sizes(hidden=4096, mlp=11008, tokens=(512, 2048, 4096)),
}

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# "cpu", or the GPU's name: the device a figure belongs to travels with every benchmark.
DEVICE_LABEL = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"


def size_name() -> str:
    name = os.environ.get("MICROBENCH_SIZE", "auto")
    if name == "auto":
        return "cuda" if DEVICE.type == "cuda" else "cpu"
    if name not in SIZES:
        raise pytest.UsageError(f"MICROBENCH_SIZE={name}: expected auto or one of {', '.join(SIZES)}")
    return name


def pytest_generate_tests(metafunc):
    if "tokens" in metafunc.fixturenames:
        metafunc.parametrize("tokens", SIZES[size_name()].tokens, ids=lambda t: f"t{t}")


@pytest.fixture(scope="session")
def sizes() -> Sizes:
    return SIZES[size_name()]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def measure(benchmark, sizes):
    """Time fn with the device synchronised inside the timed call, and label the result."""

    def run(fn, group: str, baseline: bool, shape: dict, **extra):
        benchmark.group = group
        benchmark.extra_info.update({"device": DEVICE_LABEL, "group": group, "baseline": baseline,
                                     "shape": shape, "size": size_name(), "sizes": asdict(sizes),
                                     "torch_threads": torch.get_num_threads(),
                                     # other work on the machine skews CPU timings (the 1-minute load includes this run)
                                     "load_average_1min": os.getloadavg()[0], **extra})

        def timed():
            out = fn()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize(DEVICE)  # kernels are asynchronous: time their completion
            return out

        return benchmark(timed)

    return run


def assert_finite(tensor: torch.Tensor, shape) -> None:
    assert tuple(tensor.shape) == tuple(shape), (tuple(tensor.shape), tuple(shape))
    assert torch.isfinite(tensor.float()).all()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.float()
    return float((approx.float() - exact).norm() / exact.norm())
