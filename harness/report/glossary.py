"""The glossary: every technique name and term the report uses, and the links to it where it appears.

Technique names take their meaning from the lab's own registry (harness.techniques, whose summaries
the runs carry), experiment names from the descriptions their run records carry; the terms the
report itself coins (its columns and marks) are defined here, once.
"""

from __future__ import annotations

import re
from pathlib import Path

from harness.config import ConfigError, load_experiment
from harness.device_memory import CUDA_CONTEXT_BYTES
from harness.report.load import Results
from harness.techniques import TECHNIQUES

# What transformers' Trainer runs for `bf16=True` on a model loaded in fp32: autocast to bf16 around
# fp32 weights (transformers/training_args.py, `bf16`: "Whether to use bf16 (mixed) precision").
TRAINER_BF16 = "what transformers' Trainer runs for `bf16=True` on a model loaded in fp32"

TERMS: dict[str, str] = {
    "+ checkpointing": "gradient (activation) checkpointing: the forward pass keeps only each layer's input and "
                       "the backward pass recomputes the rest, trading compute for activation memory",
    "(context)": "the longest sequence is the model's own context length: the card would hold a longer one",
    "measured": "read on a GPU during a real run: the peaks by torch's allocator, device-used by NVML, and the "
                "bytes of each kind (weights, activations, ...) by the lab's tracker of live tensors, at their "
                "peak in an untimed step; the device and the record file are named",
    "predicted": "computed without a GPU: by the analytic formula (bytes per parameter x parameter counts plus "
                 "activations) or by the simulation (one real training step traced under fake tensors)",
    "derived": "computed from a measured figure by arithmetic the report shows (a scaling, a count x bytes): "
               "never itself a measurement",
    "analytic": "the lab's formula: parameter counts x bytes per parameter for weights, gradients and optimizer "
                "state, plus activations per token",
    "simulated": "one real training step of the lab run under torch's fake tensors at full size: every "
                 "allocation counted, no memory used",
    "peak allocated": "the most bytes torch's tensors held at once (torch.cuda.max_memory_allocated)",
    "reserved": "the bytes torch's caching allocator took from the card (torch.cuda.max_memory_reserved): "
                "allocated plus the cache it keeps for reuse and its rounding",
    "device-used": "the card's memory in use as NVML reports it: reserved plus the CUDA context and any other "
                   "process",
    "tracked bytes": "on a CPU, the bytes of every live tensor the lab's tracker counted in the step: how the lab "
                     "checks its accounting without a GPU, never a GPU figure",
    "outside the allocator": f"what a card holds beside the caching allocator's segments: the CUDA context "
                             f"({CUDA_CONTEXT_BYTES / 2**30:.2f} GiB on the H200) and the kernels CUDA loads on "
                             "first use; predicted device bytes are the reserved bytes plus these",
    "GB / GiB": "GB is 1e9 bytes, GiB 2^30 bytes; a card sold as \"24 GB\" holds 24 GiB",
    "micro-batch": "the sequences one forward and backward pass takes at once",
    "gradient accumulation": "k micro-batches' gradients summed before one optimizer step: the batch the "
                             "optimizer sees grows k times, the memory of a step hardly at all",
    "tokens/s": "tokens trained per second over the timed steps of a run (sequence x micro-batch x accumulation "
                "per step)",
    "host-bound": "a step whose time is the host's: Python, the modules' calls and the dispatcher issue its "
                  "kernels more slowly than the GPU runs them (small shapes, many small kernels)",
    "device-bound": "a step whose time is the GPU's: its kernels take longer than the host takes to issue them",
    "calibration run": "a GPU run whose figures set the device constants of the reserved and device-bytes "
                       "predictions (harness/device_memory.py); the check counts the others apart",
    "untracked": "torch's peak allocated less the tracked step's peak of live tensor bytes: the allocator's "
                 "rounding and what libraries allocate outside tensors (cuBLAS workspaces)",
    "FSDPMemTracker": "torch's own memory tracker for FSDP2 (torch.distributed._tools), run on the lab's sharded "
                      "step to check its per-rank figures",
    "MFU": "model FLOPs utilisation: the FLOPs the model's step needs per token x tokens/s, over the card's "
           "data-sheet peak FLOPs per second for the dtype its matrix products run in (harness/measure/throughput.py; "
           "fp32 without TF32 has a peak 15 times below bf16's on an H200, so an fp32 run's MFU can be high while "
           "it runs about 3 times slower than bf16, as the lab's 7B runs on the H200 did)",
}


def technique_terms() -> dict[str, str]:
    """The registry's techniques, in its own words."""
    terms = {name: technique.summary for name, technique in TECHNIQUES.items() if technique.summary}
    if "bf16-mixed" in terms:
        terms["bf16-mixed"] += f"; {TRAINER_BF16}"
    if "bf16-pure" in terms:
        terms["bf16-pure"] += "; no fp32 copy of anything, so small updates can round away"
    return terms


# The lab's experiment files: where a name the report shows without a run (a prediction's, a fit-table recipe's)
# finds its description.
EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


def experiment_terms(results: Results) -> dict[str, str]:
    """Experiment names the report shows, each with the description its record carries, or, for one only
    predicted (the fit table's and the predictions' experiments), its experiment file's."""
    terms: dict[str, str] = {}
    for record in sorted(results.records, key=lambda r: r.get("_file", "")):
        name, description = record.get("experiment"), (record.get("config") or {}).get("description")
        if name and description and name not in TECHNIQUES:
            terms.setdefault(name, description)
    predicted = {p.get("experiment") for p in results.predictions}
    for row in (results.fits or {}).get("rows", []):
        predicted.add(f"{row['experiment']}-gc" if row.get("gradient_checkpointing") else row["experiment"])
    for name in sorted(n for n in predicted if n and n not in terms and n not in TECHNIQUES):
        path = EXPERIMENTS_DIR / f"{name}.yaml"
        try:
            description = load_experiment(path)[1].description if path.exists() else ""
        except ConfigError:
            description = ""  # `harness validate` names what is wrong with it; the glossary goes without
        if description:
            terms[name] = description
    return dict(sorted(terms.items()))


# The projections of a Llama-style decoder layer, by the block they belong to.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def adapter_targets(results: Results) -> dict[str, str]:
    """For each adapter experiment the runs used: the rank and the layers its adapters sit on, as
    its records say (the documents leave this open; the lab's choice moves every LoRA figure). Every
    record carries the LoRA settings; only a run with an adapter uses them."""
    found: dict[str, str] = {}
    for record in sorted(results.records, key=lambda r: r.get("_file", "")):
        config = record.get("config") or {}
        lora = config.get("lora") or {}
        name = record.get("experiment")
        if config.get("adapter") in (None, "none") or not name or not lora.get("target_modules") or name in found:
            continue
        targets = lora["target_modules"]
        blocks = [block for block, names in (("attention", ATTENTION_PROJECTIONS), ("MLP", MLP_PROJECTIONS))
                  if any(target in names for target in targets)]
        which = (": attention's and the MLP's, where the documents speak of those of attention"
                 if blocks == ["attention", "MLP"] else "")
        found[name] = (f"adapters of rank {lora.get('r')} on {', '.join(targets)} "
                       f"({len(targets)} projections of every layer{which})")
    return found


def glossary(results: Results) -> dict[str, str]:
    terms = {**technique_terms(), **experiment_terms(results)}
    for name, targets in adapter_targets(results).items():
        if name in terms:
            terms[name] += f"; {targets}"
    return {**terms, **TERMS}


def anchor(term: str) -> str:
    return "g-" + re.sub(r"[^a-z0-9]+", "-", term.lower()).strip("-")


def linker(terms: dict[str, str]):
    """A function that links the first mention of each glossary term in a piece of escaped HTML text;
    a name counts only whole (lora is not linked inside qlora or lora-gc)."""
    names = sorted((t for t in terms if len(t) > 2), key=len, reverse=True)
    if not names:
        return lambda text: text
    pattern = re.compile(r"(?<![\w/.-])(" + "|".join(re.escape(n) for n in names) + r")(?![\w-])")

    def link(text: str) -> str:
        seen: set[str] = set()

        def one(match: re.Match) -> str:
            name = match.group(1)
            if name in seen:
                return name
            seen.add(name)
            return f'<a class="term" href="#{anchor(name)}">{name}</a>'

        return pattern.sub(one, text)

    return link
