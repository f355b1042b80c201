"""The lab's one door to its environment: device, NVML, software versions, git, caches.

Everything a record says about where it was made, and everything the lab asks the machine
(is there a GPU, how large, who else uses it, what a CPU runs natively), is asked here.
Importing this module does not import torch: the report and the planner use it without one
(only a CPU's features are torch's to tell).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

# The libraries a record names the versions of: the stack, and the extras whose code a technique runs (Liger's
# kernels changed what they hold between releases: harness.predict.liger). None: not installed.
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "tokenizers", "accelerate", "trl",
            "torchao", "liger-kernel", "deepspeed")
PACKAGE_ROOT = Path(__file__).resolve().parent


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cache_dir() -> Path:
    """Where the lab keeps what it makes once (tokenized corpora, the pretrained base)."""
    path = Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "harness"))
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- software ---------------------------------------------------------------------------

def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def software_versions() -> dict:
    return {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}}


def code_digest(modules: tuple[str, ...] | None = None) -> str:
    """A digest of the harness's own source files (all, or the named ones, relative to the
    package): which code made a record, also where the copy that ran has no git history."""
    paths = sorted(PACKAGE_ROOT.rglob("*.py")) if modules is None else [PACKAGE_ROOT / name for name in modules]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(PACKAGE_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_state(folder: Path | None = None) -> dict:
    """The project's commit of the code that ran, whether it had uncommitted changes, and a digest of the
    harness's source (the commit alone can mislead where a copy of a tree carries an older .git).

    Only the project's own repository names the commit: a copy of the project inside another git
    repository would otherwise record that repository's commit and state, which say nothing of this code,
    so there commit and dirty are None and code_digest alone identifies the code."""
    folder = folder or PACKAGE_ROOT.parent
    commit = _git(folder, "rev-parse", "HEAD") if _is_project_repository(folder) else None
    dirty = None
    if commit is not None:
        status = _git(folder, "status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return {"commit": commit, "dirty": dirty, "code_digest": code_digest()}


def _is_project_repository(folder: Path) -> bool:
    """Whether git's top level for `folder` is the project's root itself (the folder that holds the
    package and pyproject.toml), not an enclosing repository the project was copied into."""
    top = _git(folder, "rev-parse", "--show-toplevel")
    return (top is not None and Path(top).resolve() == Path(folder).resolve()
            and (Path(folder) / "pyproject.toml").is_file())


def _git(folder: Path, *arguments: str) -> str | None:
    """git's output in `folder`, stripped; None where git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", *arguments], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# -- the GPU, through NVML (no CUDA context is created) ------------------------------------

def nvml_handle(index: int = 0):
    """NVML's handle of GPU `index`, or None where there is no NVIDIA driver (or no such GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() > index:
            return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no NVIDIA driver library here
        pass
    return None


def gpu_name(index: int = 0) -> str | None:
    handle = nvml_handle(index)
    if handle is None:
        return None
    import pynvml

    name = pynvml.nvmlDeviceGetName(handle)
    return name.decode() if isinstance(name, bytes) else name


def gpu_count() -> int:
    """The NVIDIA GPUs NVML sees (0 without a driver)."""
    if nvml_handle(0) is None:
        return 0
    import pynvml

    return pynvml.nvmlDeviceGetCount()


def gpu_total_gb(index: int = 0) -> float | None:
    handle = nvml_handle(index)
    if handle is None:
        return None
    import pynvml

    return pynvml.nvmlDeviceGetMemoryInfo(handle).total / 1e9


def device_used_bytes(handle) -> int | None:
    """What the whole device has in use (every process, the CUDA contexts included)."""
    if handle is None:
        return None
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def gpu_users(index: int = 0) -> tuple[int, list[int]] | None:
    """(bytes in use, pids of compute processes) on a GPU, or None where NVML cannot tell."""
    handle = nvml_handle(index)
    if handle is None:
        return None
    import pynvml

    try:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return None
    return device_used_bytes(handle), [p.pid for p in processes]


def driver_version() -> str | None:
    if nvml_handle() is None:
        return None
    import pynvml

    return pynvml.nvmlSystemGetDriverVersion()


# -- the device a run measures --------------------------------------------------------------

def resolve_device(choice: str) -> str:
    """'auto' becomes 'cuda' where a GPU is present, else 'cpu'."""
    return ("cuda" if gpu_name() else "cpu") if choice == "auto" else choice


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return gpu_name() or "CUDA device"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu}, {os.cpu_count()} cores)"


def device_slug(name: str) -> str:
    """A folder name for a device: records of different devices never share a folder."""
    if name.startswith("CPU"):
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


# -- what a CPU runs natively ------------------------------------------------------------------

# Half-precision formats whose matrix products a CPU may only emulate: torch then falls back to
# scalar loops (on an AVX2-only CPU a bf16 product of 1024-square matrices took 2.4 s against fp32's
# 0.014 s), so a bf16 step there measures the emulation, not the technique.
HALF_DTYPES = ("bf16", "fp16")


@functools.cache
def cpu_features() -> dict:
    """torch's own report of this CPU: the kernels it dispatches to (`AVX2`, `AVX512`, ...) and whether
    oneDNN computes bf16 and fp16 matrix products natively (AVX512-BF16, AMX, AVX512-FP16) or they are
    emulated. The environment variables ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA lower both, as on an
    older CPU. Imports torch: asked only where a CPU run is planned or measured."""
    import torch

    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "fp16_native": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())}


def emulated_dtypes(device_type: str = "cpu") -> frozenset[str]:
    """The half-precision formats this device only emulates (none on a GPU)."""
    if device_type != "cpu":
        return frozenset()
    features = cpu_features()
    return frozenset(dtype for dtype in HALF_DTYPES if not features[f"{dtype}_native"])


def current_environment(device_type: str) -> dict:
    """Enough to decide whether a record is current: the device (on a CPU, what it runs natively) and the
    software versions."""
    environment = {"device_name": device_name(device_type), "versions": software_versions()}
    if device_type == "cpu":
        environment["cpu"] = cpu_features()
    return environment


def run_environment(device) -> dict:
    """Everything a run record says about its machine (`device` is the torch.device it ran on)."""
    import torch

    environment = {"device_type": device.type, "platform": platform.platform(), "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "versions": software_versions(),
                   "git": git_state()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        environment.update(device_total_bytes=props.total_memory, cuda=torch.version.cuda,
                           capability=f"{props.major}.{props.minor}", driver=driver_version())
        if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
            # the caching allocator's settings (expandable_segments:True...): they change reserved bytes
            environment["cuda_alloc_conf"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    else:
        environment["cpu"] = cpu_features()
    environment["device_name"] = device_name(device.type)
    return environment


def fingerprint(environment: dict) -> str:
    """What makes two measurements comparable: the device and the software versions.

    The code commit is recorded in every record but left out here, so that a commit that
    does not touch the measurement does not invalidate every finished run.
    """
    keys = {"device": environment.get("device_name"), "versions": environment.get("versions")}
    if environment.get("cpu"):  # the same CPU with bf16 emulated (a lowered capability) measures otherwise
        keys["cpu"] = environment["cpu"]
    if environment.get("cuda_alloc_conf"):  # another allocator setting reserves otherwise
        keys["cuda_alloc_conf"] = environment["cuda_alloc_conf"]
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
