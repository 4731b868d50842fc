"""Process group, device, and the parallelize function: FSDP2 per block + root, mixed precision, AC, compile,
and the reshard policy of a step's micro-batches. The only module that knows FSDP."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from gpt_simple.config import TrainingConfig


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device = 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        # TF32 for the fp32 matmuls left under bf16 autocasting (optimizer-side, loss): ~free accuracy-wise.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_choice: str, timeout_s: float = 1800) -> Dist:
    """Join the torchrun job, or make a one-rank group so FSDP2 and DCP run the same code for world size 1."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_choice, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Dist(rank, local_rank, world_size, device, backend)


def set_collective_timeout(timeout_s: float) -> None:
    """After set-up: collectives of the training loop (a save, an evaluation on one rank) may legitimately wait
    longer than set-up should. Uses torch's private _set_pg_timeout where it exists (else the set-up bound stays)."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if dist.is_initialized() and setter is not None:
        setter(datetime.timedelta(seconds=timeout_s))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def compute_dtype(training: TrainingConfig, device: torch.device) -> torch.dtype:
    if training.dtype == "bf16" or (training.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def parallelize(model: nn.Module, training: TrainingConfig, device: torch.device) -> nn.Module:
    """Shard each block, then the root (embeddings, final norm, head), in place; returns the same module.

    The model arrives fully initialised and identical on every rank, so sharding keeps each rank's slice of
    the same weights and initialisation does not depend on the world size.
    """
    if training.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if training.compile:
        for block in model.blocks:
            block.compile()
    param_dtype = compute_dtype(training, device)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    model.to(device)
    # On one rank resharding frees nothing (the shard is the whole tensor) and each re-gather is a copy of
    # every weight: keep the blocks gathered through the step (prepare_micro_batch reshards after the last one).
    sharded = dist.is_initialized() and dist.get_world_size() > 1
    for i, block in enumerate(model.blocks):
        # The last block's parameters are needed again at once by the root's backward: keep them gathered.
        fully_shard(block, mp_policy=policy, reshard_after_forward=sharded and i < len(model.blocks) - 1)
    fully_shard(model, mp_policy=policy)
    return model


def prepare_micro_batch(model: nn.Module, index: int, count: int) -> None:
    """Before forward/backward of micro-batch `index` of `count`: gradients are reduced once, after the last
    one; on one rank the blocks also stay gathered until then (see parallelize)."""
    last = index == count - 1
    model.set_requires_gradient_sync(last)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        model.set_reshard_after_backward(last)


def reshard_all(model: nn.Module) -> None:
    """Free every gathered weight, as after a training step (a forward without backward, e.g. an evaluation,
    leaves some gathered)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
