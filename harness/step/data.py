"""Token batches: a corpus, a tokenizer of the model's vocabulary size, a fixed batch order.

The offline default corpus is the Python standard library's own source files, which
exist wherever Python does. Models of random shape get a byte-level BPE trained on that
corpus with exactly the model's vocabulary size (cached); pretrained models use their own
tokenizer. Local text files and hub datasets go through `datasets`.

Batch order depends only on the seed and the sequence index, so every technique, and
every split of a batch into micro-batches, sees the same token sequences.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from harness.env import cache_dir


# Parts of the standard library: "stdlib" is all of it (the benchmark default); the lab's
# base model is pretrained on the library modules and fine-tuned on the test modules, two
# different kinds of code. Each part has a held-out "eval" split: every 10th document.
STDLIB_PARTS = {"stdlib": None, "stdlib-lib": False, "stdlib-tests": True}
# What reads any other source (a local text file or folder, a hub dataset); a machine may lack it.
DATA_PACKAGE = "datasets"
EVAL_EVERY_NTH_DOCUMENT = 10


def _is_test_module(path: Path) -> bool:
    return any(part in ("test", "tests", "idle_test") or part.startswith("test_") for part in path.parts)


_INSTALLED_PACKAGES = ("site-packages", "dist-packages")  # beside the standard library, not part of it


def _stdlib_modules(root: Path) -> list[Path]:
    """The standard library's .py files under `root`, relative to it, in path order (as sorting the
    paths orders them: part by part). Folders of installed packages are not entered (a walk into
    them would be most of a run's start on an interpreter that holds many)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _INSTALLED_PACKAGES]
        relative = Path(folder).relative_to(root)
        found += [relative / name for name in files if name.endswith(".py")]
    return sorted(found)


@functools.lru_cache(maxsize=4)  # a run reads its split twice (tokenizer, then tokens)
def _stdlib_texts(max_bytes: int, part: bool | None = None, split: str = "train") -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total, index = [], 0, -1
    for relative in _stdlib_modules(root):
        path = root / relative
        if part is not None:
            if _is_test_module(relative) != part:
                continue
            index += 1
            if (index % EVAL_EVERY_NTH_DOCUMENT == 0) != (split == "eval"):
                continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text.encode())
        if total >= max_bytes:
            break
    return texts


def corpus_texts(source: str, max_bytes: int, text_field: str = "text", split: str = "train") -> list[str]:
    """The first `max_bytes` of text of a corpus, in a fixed order."""
    if source in STDLIB_PARTS:
        if STDLIB_PARTS[source] is None and split == "eval":
            raise ValueError("data source stdlib has no held-out split (it is all training text): "
                             "evaluate on stdlib-lib or stdlib-tests")
        if STDLIB_PARTS[source] is not None and split not in ("train", "eval"):
            raise ValueError(f"data source {source}: split must be 'train' or 'eval', not {split!r}")
        return _stdlib_texts(max_bytes, STDLIB_PARTS[source], split)
    datasets = importlib.import_module(DATA_PACKAGE)

    path = Path(source)
    if path.exists():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else [str(path)]
        dataset = datasets.load_dataset("text", data_files=files, split="train", sample_by="document")
    else:
        dataset = datasets.load_dataset(source, split=split)  # a hub dataset: needs a network
    texts, total = [], 0
    for row in dataset:
        texts.append(row[text_field])
        total += len(row[text_field].encode())
        if total >= max_bytes:
            break
    return texts


def corpus_id(source: str, texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return f"{Path(source).name or source}-{digest.hexdigest()[:12]}"


def trained_tokenizer(texts: list[str], vocab_size: int, corpus: str):
    """A byte-level BPE with exactly `vocab_size` tokens, trained once per corpus and cached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = cache_dir() / "tokenizers" / f"{corpus}-bpe{vocab_size}.json"
    if not path.exists():
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(texts, trainer=trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tokenizer.save(str(tmp))
        os.replace(tmp, path)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")


def token_stream(texts: list[str], tokenizer, corpus: str) -> np.ndarray:
    """All documents tokenized and joined with the end-of-text token (cached)."""
    key = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:12]
    path = cache_dir() / "tokens" / f"{corpus}-{key}.npy"
    if path.exists():
        return np.load(path)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32
    stream = np.asarray(ids, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, stream)
    os.replace(tmp, path)
    return stream


def sequence_batch(stream: np.ndarray, seq_len: int, first: int, count: int, seed: int) -> torch.Tensor:
    """Sequences number first .. first+count-1 of the seeded order, as a [count, seq_len] tensor."""
    windows = len(stream) - seq_len
    if windows <= 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one sequence of {seq_len}")
    # Each sequence's start depends only on (seed, index): batches are identical across techniques.
    starts = [np.random.default_rng([seed, index]).integers(0, windows) for index in range(first, first + count)]
    return torch.from_numpy(np.stack([stream[s:s + seq_len].astype(np.int64) for s in starts]))


class Batches:
    """Micro-batches for optimizer step `step`: grad_accum tensors of [micro_batch, seq_len]."""

    def __init__(self, stream: np.ndarray, seq_len: int, micro_batch: int, grad_accum: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.stream, self.seq_len, self.micro_batch, self.grad_accum, self.seed = (
            stream, seq_len, micro_batch, grad_accum, seed)
        self.rank, self.world_size = rank, world_size

    def for_rank(self, rank: int, world_size: int) -> Batches:
        """This rank's slice of each global batch: its micro-batch of every world_size in turn (rank 0 of
        1 gets every sequence, in the same order)."""
        return Batches(self.stream, self.seq_len, self.micro_batch, self.grad_accum, self.seed, rank, world_size)

    def step(self, step: int, device: torch.device) -> list[torch.Tensor]:
        per_step = self.micro_batch * self.grad_accum * self.world_size
        return [sequence_batch(self.stream, self.seq_len,
                               step * per_step + (i * self.world_size + self.rank) * self.micro_batch,
                               self.micro_batch, self.seed).to(device)
                for i in range(self.grad_accum)]


def model_tokenizer(data, model_source):
    """(tokenizer, description): a pretrained model's own, else a BPE of the model's vocabulary
    size trained on the training split of the data (so every split shares one tokenizer)."""
    if not model_source.random_init:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_source.name), model_source.name
    texts = corpus_texts(data.source, data.max_bytes, data.text_field, data.split)
    corpus = corpus_id(data.source, texts)
    vocab = model_source.config.vocab_size
    return trained_tokenizer(texts, vocab, corpus), f"byte-level BPE, {vocab} tokens, trained on {corpus}"


def load_batches(data, model_source, seq_len: int, micro_batch: int, grad_accum: int, seed: int,
                 split: str | None = None, tokenizer=None):
    """Batches of a split (default: the data's own) and a description of the data for the record."""
    if tokenizer is None:
        tokenizer, tokenizer_name = model_tokenizer(data, model_source)
    else:
        tokenizer_name = getattr(tokenizer, "name_or_path", "") or "given"
    split = split or data.split
    texts = corpus_texts(data.source, data.max_bytes, data.text_field, split)
    corpus = corpus_id(data.source, texts)
    stream = token_stream(texts, tokenizer, corpus)
    vocab = model_source.config.vocab_size
    if int(stream.max()) >= vocab:
        raise ValueError(f"tokenizer produces id {int(stream.max())} outside the model's vocabulary of {vocab}")
    info = {"source": data.source, "split": split, "corpus": corpus, "documents": len(texts),
            "tokens": int(len(stream)), "tokenizer": tokenizer_name}
    return Batches(stream, seq_len, micro_batch, grad_accum, seed), tokenizer, info
