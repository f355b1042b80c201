"""The lab's own pretrained base model: its recipe, where its checkpoint lives, and its identity.

Random weights give the real memory and speed of a technique but say nothing about what it
costs in loss. `harness base` (harness.lab.pretrain) pretrains a small Llama-shaped model on
the standard library's modules and caches the checkpoint with its tokenizer; experiments name
it as `model: base` and fine-tune it on the standard library's tests, a different kind of
text, with a held-out split to evaluate on.

The recipe (and so the checkpoint) depends on the device class: a few million parameters
on a CPU (minutes), a ~100M-parameter model on a GPU; a CPU that only emulates bf16 pretrains
the CPU recipe in fp32 (`recipe_for`), and the base's name says so. The base's identity is its recipe and
a digest of its weights' bytes: a bit-identical base pretrained on another machine is the
same base, and fine-tunes of it are the same configurations.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness import schema
from harness.env import cache_dir
from harness.presets import PRESETS

BASE_SOURCE = "base"
PRETRAINING_FILE = "pretraining.json"  # the pretraining record, kept beside the weights
PRETRAIN_DATA = "stdlib-lib"  # the fine-tunes (experiments/matrix.yaml) use stdlib-tests
PRETRAINING_TECHNIQUE = "bf16-mixed"  # what a base is pretrained in unless its recipe says otherwise


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the checkpoint: its id is a digest of these fields."""
    preset: str
    steps: int
    seq_len: int
    micro_batch: int
    lr: float
    warmup_steps: int
    eval_every: int
    eval_sequences: int = 64
    max_bytes: int = 4_000_000
    seed: int = 0
    technique: str = PRETRAINING_TECHNIQUE
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    final_lr_ratio: float = 0.1  # cosine decay ends at this fraction of the peak

    @property
    def tokens(self) -> int:
        return self.steps * self.micro_batch * self.seq_len


RECIPES = {
    # ~5M parameters, ~0.4M tokens: about a minute and a half on 2 CPU cores.
    "cpu": Recipe("tiny-llama", steps=200, seq_len=128, micro_batch=16, lr=3e-3, warmup_steps=20, eval_every=50),
    # ~100M parameters, ~66M tokens: sized to take minutes on one H100 (an estimate: not yet run).
    "cuda": Recipe("llama-100m", steps=2000, seq_len=1024, micro_batch=32, lr=1e-3, warmup_steps=100,
                   eval_every=250, max_bytes=40_000_000),
}


# What a CPU that only emulates bf16 pretrains in: the same recipe in fp32, minutes instead of hours.
EMULATED_BF16_TECHNIQUE = "fp32"


def pretrained_here(recipe: Recipe, device_type: str) -> Recipe:
    """The recipe as this machine pretrains it: in fp32 on a CPU whose bf16 matrix products are emulated
    (harness.env.emulated_dtypes), else as it is."""
    from harness.env import emulated_dtypes

    if recipe.technique != EMULATED_BF16_TECHNIQUE and "bf16" in emulated_dtypes(device_type):
        return replace(recipe, technique=EMULATED_BF16_TECHNIQUE)
    return recipe


def recipe_for(device_type: str) -> Recipe:
    """The recipe this machine pretrains for a device class, and so the base `model: base` means here."""
    return pretrained_here(RECIPES[device_type], device_type)


def recipe_id(recipe: Recipe) -> str:
    # the preset's shape too: a changed preset is a different model under the same name
    identity = {**asdict(recipe), "shape": PRESETS[recipe.preset]}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    # a base pretrained in another precision than the recipe's own says so in its name
    label = recipe.preset if recipe.technique == PRETRAINING_TECHNIQUE else f"{recipe.preset}-{recipe.technique}"
    return f"{label}-{digest}"


def checkpoint_dir(recipe: Recipe) -> Path:
    return cache_dir() / "base" / recipe_id(recipe)


def base_checkpoint_path(device_type: str = "cpu") -> Path | None:
    """The cached base checkpoint for a device class, or None if it has not been pretrained."""
    folder = checkpoint_dir(recipe_for(device_type))
    return folder if (folder / PRETRAINING_FILE).exists() else None


def weights_digest(folder: Path) -> str:
    """A digest of the checkpoint's weight files: the same bytes, the same base."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def base_identity(device_type: str) -> str | None:
    """Which pretrained checkpoint `model: base` means now: its recipe and the digest of its
    weights, so that a retrained base with other weights makes every fine-tune on it a new
    configuration, and a bit-identical one made elsewhere does not. None where it has not
    been pretrained yet."""
    folder = base_checkpoint_path(device_type)
    return None if folder is None else checkpoint_identity(folder)


def checkpoint_identity(folder: Path) -> str:
    """A pretrained checkpoint's portable name: its recipe id and the digest of its weights."""
    record = json.loads((folder / PRETRAINING_FILE).read_text())
    return schema.base_identity(folder.name, record.get("weights_digest") or weights_digest(folder))


def resolve_base(device_type: str) -> Path:
    folder = base_checkpoint_path(device_type)
    if folder is None:
        raise FileNotFoundError(f"model source '{BASE_SOURCE}': no pretrained base for {device_type} yet; "
                                "run `make base` (python -m harness base) first")
    return folder


