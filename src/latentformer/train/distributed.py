"""Process group, device choice and model wrapping (DDP or FSDP2), applied outside the model.

Under `torchrun` the env vars RANK / WORLD_SIZE / LOCAL_RANK are set; the process group is
initialized from them (NCCL on CUDA, gloo on CPU). Without them the run is a single process.
Order of wrappers follows torchtitan: activation checkpointing, then compile, then DDP/FSDP.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group if the environment names one; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    kind = best_device() if device == "auto" else device
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={device}: CUDA is not available on this machine")
    if kind == "mps" and best_device() != "mps":
        raise ValueError("train.device=mps: MPS is not available on this machine")
    if kind == "cuda":  # set_device needs an index; under torchrun each rank takes its local GPU
        kind = f"cuda:{local_rank}"
    dev = torch.device(kind)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank, world, local_rank, local_world, dev)


def shutdown() -> None:
    """Destroy the process group now, not at interpreter exit: the caller drops what holds it first
    (models, device meshes), and the collection here frees what only reference cycles still hold."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each Block's activations in backward (torch.utils.checkpoint, non-reentrant).

    The block's `forward` is wrapped in place, so parameter names and checkpoints are unchanged.
    """
    for block in model.layers:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def cast_residual_stream(model: nn.Module, dtype: torch.dtype) -> None:
    """Carry the residual stream in `dtype` (the autocast dtype) instead of the embedding's fp32:
    the embedding output is cast, and every block's `x + f(x)` then stays in `dtype` (Megatron's
    default, fp32_residual_connection=False). Norms still compute in fp32. A forward hook, so
    parameters and checkpoints are unchanged."""
    model.embed.register_forward_hook(lambda module, args, out: out.to(dtype))


def compile_model(model: nn.Module) -> None:
    """torch.compile the whole model in place (parameter names unchanged). Whole-model rather
    than per-block: the output layer and the loss fuse with the last block, which per-block
    compilation leaves eager (1.6x slower per block on an H100: NOTES.md, "Training")."""
    model.compile()


def wrap_model(model: nn.Module, env: DistEnv, parallel: str) -> nn.Module:
    """DDP (gradients all-reduced) or FSDP2 (`fully_shard` each Block, then the root)."""
    if not env.distributed:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        # routed experts a micro-batch never picks get no gradient
        find_unused_parameters=bool(model.config.is_moe),
    )
