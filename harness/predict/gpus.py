"""How many GPUs: the smallest world size whose per-rank step fits a card, for the models people shard.

For each model, way of training (GPU_ROWS) and sequence length, the analytic per-rank peak
(harness.predict.analytic.sharded_candidates) is searched over world sizes 1, 2, 4, ... 64 for every
card; a rank fits when its predicted device bytes (the caching allocator's reserved bytes and what lives
outside it, harness.device_memory) fit the card as sold (harness.cards.card_bytes), as in the fit table.
NCCL's own buffers are not among the bytes outside the allocator that the lab has measured. The
simulation (the sharded step under torch's fake process group) checks the answers for the 80 GB card at
the shorter sequence, where torch's own FSDPMemTracker, run on the same fake step, stands
beside it. Beside each full fine-tuning answer stand ZeRO-3 at the same world size, as the lab predicts
it, and DeepSpeed's own estimate (`estimate_zero3_model_states_mem_needs`: model states and the largest
layer, no activations), where DeepSpeed is installed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from harness.cards import card_bytes

GPU_MODELS = ("mistral-7b", "llama-2-13b", "llama-3-70b", "mixtral-8x7b")
GPU_CARDS = (24, 40, 80, 141)
GPU_SEQ_LENS = (2048, 8192)
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)
GPUS_PER_NODE = 8
SIMULATED_CARD = 80  # the card whose answers the simulation checks, at the shorter sequence
# Ways of training: (experiment file, overrides, whether it shards). Every row checkpoints activations,
# as anyone sharding a 70B model does; QLoRA is not sharded here (harness.techniques.SHARDING_EXCLUDES):
# one GPU or none. DeepSpeed's ZeRO-3 estimate stands beside the full fine-tuning rows.
GPU_ROWS = {
    "full fine-tuning (bf16-mixed)": ("fsdp2-gc", {}, True),
    "full, offloaded to host memory": ("fsdp2-offload-gc", {}, True),
    "LoRA": ("fsdp2-lora", {"gradient_checkpointing": True}, True),
    "QLoRA (one GPU)": ("qlora-gc", {}, False),
}
FULL_ROWS = ("fsdp2-gc", "fsdp2-offload-gc")  # ZeRO-3 and DeepSpeed's estimate stand beside these


def _peak(experiment: Path, model: str, seq_len: int, world_size: int, overrides: dict, method: str = "analytic"):
    from harness.predict.prediction import predict

    return predict(experiment, model, seq_len, 1, method, "cuda", {**overrides, "world_size": world_size})


def smallest_world_size(experiment: Path, model: str, seq_len: int, overrides: dict, card_gb: float,
                        sizes: tuple[int, ...]) -> tuple[int | None, dict]:
    """The smallest of `sizes` whose analytic per-rank step fits a card of `card_gb` (None: none does), and
    the predictions seen."""
    from harness.predict.prediction import fits

    seen = {}
    for size in sizes:
        seen[size] = _peak(experiment, model, seq_len, size, overrides)
        if fits(seen[size], card_gb):
            return size, seen
    return None, seen


def deepspeed_zero3_estimate(total_params: int, largest_layer_params: int, world_size: int,
                             offload: bool) -> int | None:
    """DeepSpeed's estimate_zero3_model_states_mem_needs, GPU bytes per rank (None without DeepSpeed)."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        return None
    per_node = min(world_size, GPUS_PER_NODE)
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        total_params, largest_layer_params, num_gpus_per_node=per_node, num_nodes=math.ceil(world_size / per_node),
        cpu_offload=offload, cpu_offload_params=offload, zero_init=True)
    return int(gpu_bytes)


def fsdp_mem_tracker(experiment: Path, model: str, seq_len: int, world_size: int, overrides: dict) -> dict:
    """torch's own FSDPMemTracker on the lab's sharded step, under the same fake tensors and fake process
    group as the simulation (its documented use is a GPU's): its peak snapshot, bytes by its categories
    (sharded and unsharded parameters and gradients, all-gather and reduce-scatter buffers, activations,
    temporaries, optimizer state) and "Total"."""
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from harness.config import resolve
    from harness.predict.simulate import fake_step
    from harness.step.models import resolve_source
    from harness.step.train import Progress, build_training, train_step

    resolved = resolve(experiment, {**overrides, "model": model, "seq_len": seq_len, "micro_batch": 1,
                                    "world_size": world_size, "device": "cpu"})
    cfg, technique, source = resolved.experiment, resolved.technique, resolve_source(model)
    with fake_step(technique, cfg, "cuda") as mesh:
        built, optimizer, _ = build_training(source, technique, cfg, torch.device("cpu"), optimizer_device="cuda",
                                             mesh=mesh)
        batch = [torch.randint(0, source.config.vocab_size, (1, seq_len))]
        train_step(built, optimizer, batch, technique.autocast, None, Progress())  # the optimizer's state
        tracker = FSDPMemTracker(built, optimizer)
        tracker.track_inputs(tuple(batch))
        with tracker:
            train_step(built, optimizer, batch, technique.autocast, None, Progress())
        (snapshot,) = tracker.get_tracker_snapshot("peak").values()
    return {str(getattr(key, "value", key)): value for key, value in snapshot.items()}


def gpu_count_table(experiments_dir: Path, simulate: bool = True):
    from harness import env, schema
    from harness.predict.analytic import shape_of
    from harness.step.models import resolve_source

    started = time.perf_counter()
    rows = []
    for model in GPU_MODELS:
        config = resolve_source(model).config
        context = getattr(config, "max_position_embeddings", None)
        params = shape_of(config).parameters()
        largest_layer = max(params["embeddings"] // (1 if shape_of(config).tied_embeddings else 2),
                            (params["total"] - params["embeddings"]) // config.num_hidden_layers)
        for label, (name, overrides, sharded) in GPU_ROWS.items():
            experiment = experiments_dir / f"{name}.yaml"
            sizes = WORLD_SIZES if sharded else (1,)
            for seq_len in GPU_SEQ_LENS:
                common = {"row": label, "experiment": name, "overrides": overrides, "model": model, "seq_len": seq_len}
                if context and seq_len > context:
                    rows += [{**common, "card_gb": gb, "world_size": None, "limited_by": "context",
                              "context": context} for gb in GPU_CARDS]
                    continue
                for card_gb in GPU_CARDS:
                    size, seen = smallest_world_size(experiment, model, seq_len, overrides, card_gb, sizes)
                    answer = seen[size] if size else seen[max(seen)]
                    row = {**common, "card_gb": card_gb, "world_size": size,
                           "limited_by": None if size else ("not sharded" if not sharded else "world sizes"),
                           "analytic_bytes": answer.total_bytes, "device_bytes": answer.device_bytes,
                           "categories": answer.categories, "peak_at": answer.peak_at,
                           "host_bytes": answer.host_bytes, "at_world_size": answer.world_size}
                    if size and name in FULL_ROWS:
                        # ZeRO-3 at the same world size: the lab's terms, and DeepSpeed's own estimate
                        zero3 = _peak(experiment, model, seq_len, size, {**overrides, "sharding": "zero3"})
                        row.update(zero3_bytes=zero3.total_bytes, zero3_categories=zero3.categories,
                                   zero3_host_bytes=zero3.host_bytes,
                                   deepspeed_zero3_bytes=deepspeed_zero3_estimate(
                                       params["total"], largest_layer, size, "offload" in name))
                    if simulate and size and card_gb == SIMULATED_CARD and seq_len == GPU_SEQ_LENS[0]:
                        simulated = _peak(experiment, model, seq_len, size, overrides, "simulated")
                        row.update(simulated_bytes=simulated.total_bytes, simulated_categories=simulated.categories,
                                   simulated_host_bytes=simulated.host_bytes)
                        if name in FULL_ROWS and "offload" not in name:  # torch's tracker counts one memory
                            row["fsdp_mem_tracker"] = fsdp_mem_tracker(experiment, model, seq_len, size, overrides)
                    rows.append(row)
    return schema.GpuCountTable(
        method="analytic", device_type="cuda", world_sizes=list(WORLD_SIZES),
        cards={str(gb): {"card_bytes": card_bytes(gb), "cap_bytes": card_bytes(gb)} for gb in GPU_CARDS},
        rows=rows, versions=env.software_versions(), predictor=gpu_table_predictor(),
        seconds=time.perf_counter() - started)


def gpu_table_predictor() -> str:
    from harness import env
    from harness.imports import source_files

    return env.code_digest(source_files(__name__))
