"""Result records: one JSON file per run, written atomically, with the environment in it.

Importing this module does not import torch, so reports can read records without it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

SCHEMA_VERSION = 1
STATUSES = ("ok", "oom", "skipped", "failed")
# Results rather than errors: a measurement, an out-of-memory, or a run its machine cannot do
# (a missing optional package, said in the record). Only ok and oom records are final.
FINISHED = ("ok", "oom", "skipped")
MEASURED = ("ok", "oom")
# Attempts of a cell that ended without a measurement while the cell had one: kept, not records.
ATTEMPTS_FOLDER = "attempts"
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "tokenizers", "accelerate")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def code_digest(modules: tuple[str, ...] | None = None) -> str:
    """A digest of the harness's own source files (all, or the named ones): which code made a
    record, also where the copy that ran has no git history of its own."""
    package = Path(__file__).resolve().parent
    paths = sorted(package.rglob("*.py")) if modules is None else [package / name for name in modules]
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_state(folder: Path | None = None) -> dict:
    """The commit of the code that ran, whether it had uncommitted changes, and a digest of the
    harness's source (the commit alone can mislead where a copy of a tree carries an older .git)."""
    folder = folder or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty if commit else None, "code_digest": code_digest()}


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name from NVML (creates no CUDA context), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() > 0:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
            return name.decode() if isinstance(name, bytes) else name
    except Exception:  # no NVIDIA driver here
        pass
    return None


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


def software_versions() -> dict:
    return {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}}


def current_environment(device_type: str) -> dict:
    """The torch-free part of the environment: enough to decide whether a record is current."""
    return {"device_name": device_name(device_type), "versions": software_versions()}


def fingerprint(environment: dict) -> str:
    """What makes two measurements comparable: the device and the software versions.

    The code commit is recorded in every record but left out here, so that a commit that
    does not touch the measurement does not invalidate every finished run.
    """
    keys = {"device": environment.get("device_name"), "versions": environment.get("versions")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def record_path(out_dir: str | Path, device: str, name: str, model: str, config_hash: str, repeat: int = 0) -> Path:
    """One file per (device, experiment, model, resolved configuration, repeat).

    Two configurations never share a file, nor do two devices.
    """
    model_slug = "".join(c if c.isalnum() or c in "-." else "_" for c in model)[-60:]
    suffix = f"-r{repeat}" if repeat else ""
    return Path(out_dir) / device_slug(device) / f"{name}__{model_slug}__{config_hash[:12]}{suffix}.json"


def find_records(folder: str | Path) -> list[Path]:
    """Every record under a folder (temporary files of interrupted writes start with '.')."""
    return sorted(p for p in Path(folder).rglob("*.json")
                  if not p.name.startswith(".") and "logs" not in p.parts and ATTEMPTS_FOLDER not in p.parts)


def write_atomic(path: str | Path, record: dict) -> Path:
    """Write to a temporary file in the same folder, fsync, rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=1, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_record(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
