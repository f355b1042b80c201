"""Sharding a model over ranks: torch's FSDP2 (`fully_shard`), as torchtitan and torchtune apply it.

Every decoder layer is one FSDP unit (its parameters are all-gathered before its forward and its
gradients reduce-scattered after its backward), and the root module holds what is left (embeddings,
final norm, output head). A sharded model is built on the meta device, wrapped (checkpointing,
adapters), sharded, and only then materialised, shard by shard: no rank ever holds the whole model,
which is how a 70B model is loaded on cards smaller than it.

Mixed precision is FSDP2's own: with a 16-bit autocast the parameters are all-gathered in that dtype
and gradients reduced in fp32 (`MixedPrecisionPolicy`); fp32 shards stay the master weights.
`cpu_offload` keeps shards, their gradients and the optimizer state in host memory and steps there
(`CPUOffloadPolicy`).

The process group is torchrun's (`join_ranks`) in a run, and torch's fake process group
(`fake_ranks`) in a simulation: one process stands for every rank, its collectives return at once,
and its tensors have the shapes each rank's would have.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from harness.step.models import DTYPES
from harness.techniques import Technique

# torch.distributed's backend for a device type (gloo runs several ranks on a CPU).
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


def is_sharded(cfg) -> bool:
    return cfg.sharding != "none"


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: torchrun's environment, or one rank alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def join_ranks(device: torch.device) -> None:
    """Join the process group torchrun's rendezvous set up (its environment names the peers)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(BACKENDS[device.type])


@contextmanager
def fake_ranks(world_size: int):
    """torch's fake process group of `world_size` ranks, this process rank 0: collectives do nothing,
    and every tensor has the shape rank 0's would have. Yields its device mesh."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield device_mesh("cpu")
    finally:
        dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: the modules of the classes transformers never splits across devices."""
    # the transformers model's own list, wherever a wrapper (peft) holds it
    names = next((set(m._no_split_modules) for m in model.modules() if getattr(m, "_no_split_modules", None)), set())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by")
    return layers


def device_mesh(device_type: str):
    """Every rank of the default process group, in one dimension (made outside any fake tensor mode:
    a mesh holds real tensors)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (torch.distributed.get_world_size(),))


def fully_shard_model(model: nn.Module, technique: Technique, cpu_offload: bool, device: torch.device,
                      mesh=None) -> nn.Module:
    """FSDP2 over `mesh` (every rank of the default process group unless given): one unit per decoder
    layer, then the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = mesh or device_mesh(device.type)
    compute = DTYPES.get(technique.autocast)
    precision = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=precision, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=precision, offload_policy=offload)
    return model


def reset_adapters(model: nn.Module) -> None:
    """peft's own initialisation of LoRA's matrices (A random, B zero), once a sharded model has storage:
    materialising gave every linear layer, adapters included, the base model's random init."""
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters") and hasattr(module, "lora_A"):
            for name in module.lora_A:
                module.reset_lora_parameters(name, True)
