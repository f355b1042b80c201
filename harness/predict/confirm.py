"""The fit table's longest sequences and largest micro-batches confirmed by simulation (`harness predict
--confirm-fits`).

The fit table (harness.predict.fit_table) searches the analytic device bytes (harness.predict.search):
instant, but its reserved bytes are the tensor peak times one ratio, and the caching allocator can waste
more than that where a long step's large blocks fragment its segments (a second step's forward carving
the first step's cached logit-sized segments; checkpoints pinned in segments of transients). The
simulation replays the allocator over the step's own allocations under the card's cap, freeing and
retrying as torch does: the better answer at the edge, at about ten seconds of a CPU per step of a 7B
model. So each card-limited answer is simulated at the analytic answer, a longest sequence (at a micro-batch)
or a largest micro-batch (at a sequence length) alike (a target's `axis`):

- where the step fits, the analytic answer stands, confirmed (it may lie below the simulated boundary:
  no length above it is searched, an answer that holds is what is asked for);
- where it runs out, the analytic curve moved by what the simulated step needed beyond it gives a
  smaller guess, simulated in turn, and then bisection, until the largest value simulated to fit and
  the smallest simulated to run out are within TOLERANCE of each other (at most MAX_SIMULATIONS steps;
  a search that ends wider keeps the largest value simulated to fit, below the boundary, and the next
  run goes on from its bracket: `unsettled`). A micro-batch is a small whole number: its bracket closes
  only at neighbours.

Each answer is one file under results/fits/confirmed/, stamped with the digest of the predictor's code:
the search resumes where it stopped, and a confirmation made by other predictor code is not used. The fit
table takes the confirmed answers that are current and says, row by row, which method answered. Where the
predictor's code changed, the search starts from what the file it replaces found (its answer and the
length it ran out at, simulated again first): most answers move little, and two steps then settle one.

A target may name the caching allocator's setting (`allocator`, harness.predict.allocator.SETTINGS): the
analytic answer and the simulated steps are then that setting's, and its file says so in its name.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from pathlib import Path

from harness.cards import card_bytes
from harness.measure.budget import card_cap_bytes
from harness.predict.search import (ALLOCATOR_WORDS, Answer, Setup, largest_fitting, largest_micro_batch, limited_by,
                                   longest_sequence, setup, simulate_under_card)

CONFIRMED_FOLDER = Path("fits") / "confirmed"
# The search stops once the longest length simulated to fit is within 1% of the shortest simulated to run out:
# well inside the 3% the boundary's GPU probes bracket (experiments/matrix.yaml, `boundary`).
TOLERANCE = 0.01
MAX_SIMULATIONS = 10
SHORTEST = 2  # the shortest sequence an experiment may ask for (harness.config: one token predicts nothing)
SMALLEST = {"seq_len": SHORTEST, "micro_batch": 1}  # the least each axis may ask for
# Fields of a configuration that do not change one step's memory at a given shape: the search varies the
# shape, and a run's length, its card and its names are not the step's (harness.config.config_hash).
RUN_CONTROL_FIELDS = ("seq_len", "micro_batch", "steps", "warmup_steps", "budget_gb", "budget_card_bytes",
                      "name", "description", "summary", "config_hash", "run_id", "base_checkpoint")


@dataclass(frozen=True)
class Target:
    """One answer to confirm: an experiment file (with these fields) at a model on a card, with the caching allocator
    set as `allocator` says (harness.predict.allocator.SETTINGS): its longest sequence at `micro_batch`, or, where
    `seq_len` is given, its largest micro-batch at that length (`micro_batch` is then the answer, not a field)."""
    experiment: Path
    model: str
    overrides: dict
    card_gb: float
    micro_batch: int = 1
    allocator: str = "default"
    seq_len: int | None = None

    @property
    def axis(self) -> str:
        return "seq_len" if self.seq_len is None else "micro_batch"

    def shape(self, n: int) -> tuple[int, int]:
        """(sequence length, micro-batch) with the searched axis at n."""
        return (n, self.micro_batch) if self.seq_len is None else (self.seq_len, n)

    def analytic(self, found: Setup) -> Answer:
        """The analytic search's answer on the target's axis (harness.predict.search)."""
        if self.seq_len is None:
            return longest_sequence(found, self.card_gb, self.micro_batch)
        return largest_micro_batch(found, self.card_gb, self.seq_len)

    def label(self, name: str) -> str:
        """The target as a line of --confirm-fits says it."""
        checkpointing = " + checkpointing" if self.overrides.get("gradient_checkpointing") else ""
        what = "" if self.seq_len is None else f", micro-batch at sequence {self.seq_len:,}"
        return (f"{name}{checkpointing} @ {self.model} on {self.card_gb:g} GB{what}"
                f"{ALLOCATOR_WORDS.get(self.allocator, '')}")


def _keys(axis: str) -> tuple[str, str]:
    """A confirmation's keys for its answer and the analytic one: a longest sequence's files keep the names they
    have always had (max_seq_len, analytic_max_seq_len); a micro-batch's say max_micro_batch."""
    return f"max_{axis}", f"analytic_max_{axis}"


def step_fingerprint(found: Setup) -> str:
    """What decides a step's memory in a resolved configuration, whatever its file is named: qlora with
    gradient checkpointing set and qlora-gc are one step."""
    from harness.config import config_hash

    config = {k: v for k, v in found.config.as_dict().items() if k not in RUN_CONTROL_FIELDS}
    return config_hash(config)[:12]


def confirmation_path(out_dir: Path, found: Setup, target: Target) -> Path:
    """One file per answer, named by what stays fixed: `b1` a longest sequence at micro-batch 1, `s2048` a largest
    micro-batch at 2,048 tokens; an allocator setting other than the default names itself (torch's default keeps
    the plain name)."""
    allocator = "" if found.allocator == "default" else f"__{found.allocator}"
    fixed = f"b{target.micro_batch}" if target.seq_len is None else f"s{target.seq_len}"
    return (Path(out_dir) / CONFIRMED_FOLDER / f"{target.model.replace('/', '_')}__{target.card_gb:g}gb__{fixed}"
                                               f"{allocator}__{step_fingerprint(found)}.json")


@cache
def predictor_digest() -> str:
    """The code a simulated step comes from (harness.predict.prediction's), which stamps each confirmation: read
    once a process, as its code is loaded once (a file edited while a search runs does not restamp it)."""
    from harness import env
    from harness.predict.prediction import PREDICTOR_MODULES

    return env.code_digest(PREDICTOR_MODULES)


def read_confirmation(path: Path, predictor: str, analytic_value: int, axis: str = "seq_len") -> dict | None:
    """A confirmation that still applies: made by this predictor code from the same analytic answer; None if
    there is none (a file that cannot be read is said so and searched again)."""
    if not path.exists():
        return None
    value, analytic = _keys(axis)
    try:
        confirmation = json.loads(path.read_text())
        current = (confirmation["predictor"] == predictor
                   and confirmation[analytic] == analytic_value)
        missing = [key for key in (value, "fails_at", "resolved", "device_bytes", "probes")
                   if key not in confirmation]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"{path}: not a fit confirmation ({type(error).__name__}: {error}); it is searched again", flush=True)
        return None
    return confirmation if current else None


def earlier_bracket(path: Path) -> dict | None:
    """What an earlier search of the same answer found, whatever code made it (earlier_bracket_of); None where
    there is no readable file to go on."""
    try:
        return earlier_bracket_of(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None  # nothing to go on: the search starts from the analytic answer


def earlier_bracket_of(confirmation: dict) -> dict | None:
    """{"predictor", "max_seq_len" (or "max_micro_batch"), "fails_at"} of a confirmation that found a value to
    fit, the values a new search simulates first; None otherwise."""
    try:
        value = _keys(confirmation.get("axis", "seq_len"))[0]
        if confirmation["resolved"] and confirmation[value] > 0:
            return {key: confirmation[key] for key in ("predictor", value, "fails_at")}
    except (KeyError, TypeError, AttributeError):
        pass
    return None


def _tolerated(fits: int, fails: int) -> bool:
    """The longest length found to fit is close enough below the shortest found to run out."""
    return fits > 0 and fails - fits <= max(1, math.floor(TOLERANCE * fails))


def unsettled(confirmation: dict) -> bool:
    """A search that found a value to fit but ran out of steps (MAX_SIMULATIONS) before it came within the
    tolerance of one that ran out: its answer is a lower bound, and the next `--confirm-fits` goes on from its
    bracket (far below a formula that over-promises much, halving takes more steps than one search has)."""
    fits, fails = confirmation[_keys(confirmation.get("axis", "seq_len"))[0]], confirmation["fails_at"]
    return bool(confirmation["resolved"]) and fits > 0 and fails is not None and not _tolerated(fits, fails)


def search(target: Target, device_type: str = "cuda", found: Setup | None = None,
           earlier: dict | None = None) -> dict | None:
    """The confirmed answer of one target (see the module's text), or None where the analytic answer has nothing to
    confirm (nothing fits, or the search stopped at its limit). An answer the model's context ends is searched
    like one the card ends (`--solve` checks it; the fit table confirms only the card's, `confirm_one`).
    `earlier` (earlier_bracket): an earlier search's answer and the value it saw run out, simulated first where
    they lie below the analytic answer: after a change to the predictor's code most answers move little, and two
    simulated steps then settle one."""
    started = time.perf_counter()
    found = found or setup(target.experiment, target.model, target.overrides, device_type, target.allocator)
    analytic = target.analytic(found)
    if analytic.value == 0 or limited_by(analytic, target.axis, found.context) == "search limit":
        return None
    axis, smallest = target.axis, SMALLEST[target.axis]
    value_key, analytic_key = _keys(axis)
    cap = card_bytes(target.card_gb)
    allocator_cap = card_cap_bytes(target.card_gb, found.config.technique, found.unified_bytes)

    def analytic_device(n: int) -> int:
        return found.device(*target.shape(n))

    # the values to try before any other: an earlier answer and the value it ran out at, below the analytic one
    earlier_values = (earlier[value_key], earlier["fails_at"]) if earlier else ()
    hints = [n for n in earlier_values if n is not None and smallest <= n < analytic.value]
    probes, fits, fails, n, drop = [], 0, None, (hints or [analytic.value])[0], 0
    while len(probes) < MAX_SIMULATIONS:
        step = simulate_under_card(target.experiment, target.model, *target.shape(n), target.overrides,
                                   device_type, cap, allocator_cap, target.allocator)
        probes.append({axis: n, "fits": step.fits, "device_bytes": step.device_bytes,
                       "needed_bytes": step.needed_bytes, "analytic_device_bytes": analytic_device(n)})
        if step.fits:
            fits = max(fits, n)
        else:
            fails = n if fails is None else min(fails, n)
        if fails is None:
            if fits == analytic.value:
                break  # the analytic answer holds
            # an earlier answer holds: up to the value it ran out at, else to the analytic answer
            n = next((hint for hint in hints if hint > fits), analytic.value)
            continue
        if _tolerated(fits, fails):
            break
        if fits:
            n = (fits + fails) // 2
            continue
        if n <= smallest:
            break  # not even the smallest value fits
        # the analytic curve moved up by what this step needed beyond it: about where the simulated boundary is;
        # at least TOLERANCE below the step that ran out, so that a guess that fits closes the search, and twice
        # as far below as the last guess went where that one ran out too (a failed request sees only part of
        # what the step lacks); never below half of it, as a bisection from the smallest value would go
        excess = step.needed_bytes - analytic_device(n)
        guess = largest_fitting(analytic_device, cap - excess, fails - 1).value
        guess = max(smallest, fails // 2, min(guess, math.floor(fails * (1 - TOLERANCE)), fails - 2 * drop))
        drop, n = fails - guess, guess
    held = {p[axis]: p["device_bytes"] for p in probes}
    fixed = {"micro_batch": target.micro_batch} if axis == "seq_len" else {"seq_len": target.seq_len}
    return {"experiment": found.config.name, "model": target.model, "card_gb": target.card_gb, "axis": axis,
            **fixed, "allocator": target.allocator,
            "gradient_checkpointing": found.config.experiment.gradient_checkpointing,
            "step": step_fingerprint(found), "predictor": predictor_digest(),
            analytic_key: analytic.value,
            # every probe fits (the analytic answer holds), or the largest found to fit: 0 where none did
            value_key: fits, "fails_at": fails, "resolved": fails is None or fits > 0 or fails <= smallest,
            "device_bytes": held.get(fits), "earlier": earlier,
            "probes": probes, "seconds": time.perf_counter() - started}


def confirmed_answer(found: Setup, target: Target, analytic: Answer, out_dir: Path | None,
                     predictor: str | None = None) -> tuple[Answer, dict | None]:
    """The answer to use: a current confirmation's where one exists under `out_dir`, else the analytic one; and
    the confirmation (None where the analytic answer stands unconfirmed). An unresolved search (nothing found
    to fit in MAX_SIMULATIONS steps) leaves the analytic answer, and its confirmation says so."""
    if out_dir is None or analytic.limited_by != "card" or analytic.value == 0:
        return analytic, None
    confirmation = read_confirmation(confirmation_path(out_dir, found, target), predictor or predictor_digest(),
                                     analytic.value, target.axis)
    return _answer_of(confirmation, analytic), confirmation


def _settled(path: Path, analytic: Answer, axis: str) -> dict | None:
    """A current confirmation at `path` whose search is over (not `unsettled`): nothing to search again."""
    current = read_confirmation(path, predictor_digest(), analytic.value, axis)
    return current if current is not None and not unsettled(current) else None


def _answer_of(confirmation: dict | None, analytic: Answer) -> Answer:
    """A resolved confirmation as an answer: its device bytes, and those of the value it saw run out (None where
    the analytic answer stands: no value above it was simulated); the analytic answer where there is no
    confirmation or its search found nothing to fit."""
    if confirmation is None or not confirmation["resolved"]:
        return analytic
    axis = confirmation.get("axis", "seq_len")
    value = confirmation[_keys(axis)[0]]
    failed = [p["device_bytes"] for p in confirmation["probes"] if p[axis] == confirmation["fails_at"]]
    return Answer(value, confirmation["device_bytes"], failed[0] if failed else None,
                  analytic.limited_by if value == analytic.value else "card", len(confirmation["probes"]))


def settle(found: Setup, target: Target, analytic: Answer, out_dir: Path | None,
           device_type: str = "cuda") -> tuple[Answer, dict | None, Path | None]:
    """One answer as `harness predict --solve` gives it, the fit table's where they are the same step: a current
    confirmation under `out_dir` is read, not searched again; else the same search runs now (from that file's
    bracket where an older one exists), and its answer is not written (`--confirm-fits` writes the table's
    files). Returns the answer (the analytic one where the search found nothing to fit, or had nothing to
    confirm), the confirmation, and the file it was read from (None where it was searched now)."""
    path = None if out_dir is None else confirmation_path(out_dir, found, target)
    current = None if path is None else _settled(path, analytic, target.axis)
    if current is not None:
        return _answer_of(current, analytic), current, path
    confirmation = search(target, device_type, found, earlier_bracket(path) if path is not None else None)
    return _answer_of(confirmation, analytic), confirmation, None


@lru_cache(maxsize=64)
def _setup_of(experiment: Path, model: str, overrides: str) -> Setup:
    """A step's setup, made once a process for all its cards and allocator settings (its analytic predictions
    shared): most targets only need their analytic answer, to find that there is nothing to search."""
    return setup(experiment, model, json.loads(overrides))


def confirm_one(target: Target, out_dir: Path, deadline: float | None) -> tuple[str, str]:
    """Search one target unless it has no card-limited answer, a current confirmation exists or the deadline has
    passed: (what became of it: "searched", "failed", "late" or "" for nothing to do, and a line that says so)."""
    found = replace(_setup_of(target.experiment, target.model, json.dumps(target.overrides, sort_keys=True)),
                    allocator=target.allocator)
    analytic = target.analytic(found)
    label = target.label(found.config.name)
    if analytic.limited_by != "card" or analytic.value == 0:
        return "", ""
    path = confirmation_path(out_dir, found, target)
    if _settled(path, analytic, target.axis) is not None:
        return "", ""
    if deadline is not None and time.time() > deadline:
        return "late", f"{label}: not started (time budget)"
    try:
        confirmation = search(target, found=found, earlier=earlier_bracket(path))
    except Exception as error:  # noqa: BLE001 (one target's failure is said, and the others go on)
        # said here, not raised: an exception crossing processes must pickle, and not every one does
        return "failed", f"{label}: not confirmed ({type(error).__name__}: {error})"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}")
    temporary.write_text(json.dumps(confirmation, indent=1) + "\n")
    temporary.replace(path)  # a file is whole or absent: an interrupted search leaves nothing half-written
    value = confirmation[_keys(target.axis)[0]]
    verdict = ("stands" if value == analytic.value else
               f"{value:,} (runs out at {confirmation['fails_at']:,})"
               if confirmation["resolved"] else "runs out; nothing found to fit")
    return "searched", (f"{label}: analytic {analytic.value:,} -> {verdict}, {len(confirmation['probes'])} "
                        f"simulated steps, {confirmation['seconds']:.0f} s")
