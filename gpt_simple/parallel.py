"""Process group, device mesh, and the parallelize function: FSDP2 per block + root (plain, or hybrid on a 2-D
replicate x shard mesh), mixed precision, AC, compile, and the reshard policy of a step's micro-batches. The
only module that knows FSDP."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from gpt_simple.config import ConfigError, TrainingConfig
from gpt_simple.runtime import log


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    mesh_shape: tuple[int, int] | None = None  # (replicate, shard), from parallel.replicate_degree (mesh_shape())

    def __post_init__(self):
        if self.mesh_shape is None:
            self.mesh_shape = (1, self.world_size)

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


def make_deterministic() -> None:
    """training.deterministic: deterministic kernels only. cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA creates
    its handle, so this runs before the device is chosen; without it a GPU's reductions may split differently from
    one launch to the next, and a replay differs in the last bits."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


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
                                    store=restart_round_store(rank, world_size, timeout),
                                    device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Dist(rank, local_rank, world_size, device, backend)


def restart_round_store(rank: int, world_size: int, timeout: datetime.timedelta):
    """torchrun's store (MASTER_ADDR:MASTER_PORT), its keys under a prefix of this restart round. torchrun's agent
    keeps one store across the rounds of `--max-restarts`, and a restarted group read the dead round's peer
    addresses from it (gloo: connectFullMesh ... Connection refused, to a port nobody listens on). None outside
    torchrun: env:// as usual."""
    round_ = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if round_ is None:
        return None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):  # the agent hosts it; every rank is a client
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    else:
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"gpt-simple/restart-{round_}", store)


# Failures of the fabric, not of the run (see is_fabric_failure, docs/orchestration.md).
FABRIC_PATTERNS = ("connection reset by peer", "connection refused", "connection closed by peer",
                   "connectfullmesh", "broken pipe", "timed out", "timeout", "socket closed",
                   "nccl communicator was aborted", "nccl error")


def is_fabric_failure(error: BaseException) -> bool:
    """A peer lost, a rendezvous or connect failure, a collective timeout: only torch.distributed's own errors,
    connection errors, and a RuntimeError from a collective whose message names the network qualify."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    dist_errors = tuple(getattr(dist, n) for n in ("DistNetworkError", "DistBackendError", "DistStoreError")
                        if hasattr(dist, n))
    if dist_errors and isinstance(error, dist_errors):
        return True
    if type(error) is RuntimeError or type(error).__name__ in ("DistError",):
        text = str(error).lower()
        return any(p in text for p in FABRIC_PATTERNS) or ("gloo" in text and "peer" in text)
    return False


def set_collective_timeout(timeout_s: float, groups=None) -> str | None:
    """After set-up: collectives of the training loop (a save, an evaluation on one rank) may legitimately wait
    longer than set-up should. Applies to every process group (the default one, the mesh's, the checkpoint
    manager's): a gloo send to a peer that died mid-collective can wait on its group's timeout alone, so that is
    what bounds how long the survivors of a lost node hang. torch has no public way to change a group's timeout
    after it is made; its private _set_pg_timeout does it. Where that is missing, the groups keep the bound they
    were made with (training.setup_timeout_seconds), and the reason is returned for the launch to announce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:
        return (f"this torch ({torch.__version__}) cannot change a process group's timeout after set-up "
                f"(no torch.distributed.distributed_c10d._set_pg_timeout)")
    world = getattr(dist.distributed_c10d, "_world", None)
    if groups is None:
        groups = list(getattr(world, "pg_map", {})) or [None]
    for group in groups:
        try:
            setter(datetime.timedelta(seconds=timeout_s), group)
        except ValueError:  # a group this rank is not part of
            pass
    return None


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mesh_shape(degree: int | str, world_size: int, local_world_size: int | None = None) -> tuple[int, int]:
    """(replicate, shard) for parallel.replicate_degree on `world_size` ranks. 'auto' is one replica per node:
    torchrun numbers ranks node by node, LOCAL_WORLD_SIZE of them per node, so the shard groups (consecutive
    ranks) stay inside a node and only the replicas' gradient all-reduce crosses the network."""
    if degree == "auto":
        local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if world_size % local:
            raise ConfigError(f"parallel.replicate_degree = 'auto': the world size ({world_size}) is not a multiple "
                              f"of the processes per node (LOCAL_WORLD_SIZE {local}); set the degree explicitly")
        degree = world_size // local
    if not isinstance(degree, int) or degree < 1 or world_size % degree:
        raise ConfigError(f"parallel.replicate_degree ({degree}) must divide the world size ({world_size})")
    return degree, world_size // degree


def describe_mesh(shape: tuple[int, int]) -> str:
    kind = "plain FSDP" if shape[0] == 1 else "HSDP" if shape[1] > 1 else "replicated"
    return f"mesh {shape[0]}x{shape[1]} (replicate x shard; {kind})"


def build_mesh(shape: tuple[int, int], device: torch.device, timeout_s: float | None = None) -> DeviceMesh | None:
    """The 2-D mesh for fully_shard, or None for one replica: fully_shard's own default (a 1-D mesh over the
    world), so that degree 1 runs exactly the code it always ran. Every rank must call it (it makes the groups,
    which get the set-up bound `timeout_s` like the default group, not torch's 30 minutes)."""
    if shape[0] == 1:
        return None
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))
    if timeout_s is not None:
        set_collective_timeout(timeout_s, [mesh.get_group(0), mesh.get_group(1)])
    return mesh


def compute_dtype(training: TrainingConfig, device: torch.device) -> torch.dtype:
    if training.dtype == "bf16" or (training.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def parallelize(model: nn.Module, training: TrainingConfig, device: torch.device,
                mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard each block, then the root (embeddings, final norm, head), in place; returns the same module. With a
    2-D mesh (build_mesh) FSDP2 shards over its inner dimension and replicates over the outer one (HSDP): the
    gradients are reduce-scattered inside a shard group, then all-reduced across the replicas.

    The model arrives fully initialised and identical on every rank, so sharding keeps each rank's slice of
    the same weights and initialisation does not depend on the world size.
    """
    if training.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if training.compile:
        use_compile_cache(training)
        for block in model.blocks:
            block.compile()
    param_dtype = compute_dtype(training, device)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    model.to(device)
    # On one rank resharding frees nothing (the shard is the whole tensor) and each re-gather is a copy of
    # every weight: keep the blocks gathered through the step (prepare_micro_batch reshards after the last one).
    sharded = dist.is_initialized() and (mesh.size(1) if mesh is not None else dist.get_world_size()) > 1
    for i, block in enumerate(model.blocks):
        # The last block's parameters are needed again at once by the root's backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=sharded and i < len(model.blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def compile_cache_dir(training: TrainingConfig) -> str | None:
    """The folder torch.compile's caches go to for this run (None: torch's default)."""
    if training.compile_cache_dir == "auto":
        return os.path.join(training.output_dir, "compile_cache")
    return training.compile_cache_dir or None


def use_compile_cache(training: TrainingConfig) -> None:
    """Point inductor (and with it the FX graph, AOT autograd and Triton caches) at the run's cache folder before
    the first compile: every launch of a chain then finds the graphs the one before compiled, on whatever node it
    lands. The caches key on the graph, torch version and device, so a stale entry is a miss, never a wrong
    kernel. A TORCHINDUCTOR_CACHE_DIR the user set wins, and is said."""
    path = compile_cache_dir(training)
    if path is None:
        return
    theirs = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if theirs and os.path.abspath(theirs) != os.path.abspath(path):
        log.info(f"compile cache: TORCHINDUCTOR_CACHE_DIR={theirs} (set in the environment) instead of {path}")
        return
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(path)


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
