"""The run configuration's schema: the section dataclasses, every field's default and one-line doc (`doc(...)`),
and the checks of a loaded config (`validate`, `validate_world`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from gpt_simple.config.errors import ConfigError, suggest


def doc(default: Any, text: str, **meta: Any) -> Any:
    """A dataclass field with a default and a doc line (lists/dicts get a factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata={"doc": text, **meta})
    return field(default=default, metadata={"doc": text, **meta})


NOT_ARCHITECTURE = ("init_from",)  # model fields that no checkpoint's architecture check compares


@dataclass
class ModelConfig:
    vocab_size: int = doc(50304, "Embedding rows; >= the tokenizer's vocabulary (padded to a multiple of 64 for speed).")
    block_size: int = doc(1024, "Longest context the model supports; data.seq_len must not exceed it.")
    n_layer: int = doc(12, "Number of transformer blocks.")
    n_head: int = doc(12, "Attention heads (query heads).")
    n_kv_head: int = doc(0, "Key/value heads for grouped-query attention; 0 means n_head (plain multi-head).")
    n_embd: int = doc(768, "Residual stream width.")
    pos_embedding: str = doc("learned", "Position encoding: 'learned' (GPT-2) or 'rope'.", choices=("learned", "rope"))
    rope_theta: float = doc(10000.0, "RoPE base frequency (pos_embedding = 'rope').")
    norm: str = doc("layernorm", "Normalisation: 'layernorm' or 'rmsnorm'.", choices=("layernorm", "rmsnorm"))
    norm_eps: float = doc(1e-5, "Epsilon of the normalisation layers.")
    mlp: str = doc("gelu", "Feed-forward: 'gelu' (GPT-2) or 'swiglu'.", choices=("gelu", "swiglu"))
    mlp_ratio: float = doc(4.0, "Hidden width of the MLP as a multiple of n_embd (SwiGLU uses 2/3 of it, rounded to 64).")
    bias: bool = doc(True, "Bias terms in linear layers and norms.")
    dropout: float = doc(0.0, "Dropout probability (attention and residual); 0 for pretraining.")
    tie_embeddings: bool = doc(True, "Share the token embedding with the output head.")
    init_from: str = doc("", "A local Hugging Face model folder (GPT-2 or Llama layout: config.json + safetensors or pytorch_model.bin) whose weights the run's first launch starts from; the fields above must agree with its config.json. Ignored once the run has a checkpoint. See docs/huggingface.md.")


@dataclass
class DataConfig:
    dir: str = doc("data/demo", "Folder of prepared buckets: DIR/<bucket>/*.bin + *.idx (see `gpt-simple prepare`).")
    demo: bool = doc(False, "Build the embedded demo corpus (Python's own stdlib, byte-level) into `dir` if it is missing.")
    seq_len: int = doc(1024, "Tokens per training sequence (each sequence reads seq_len + 1 tokens).")
    seed: int = doc(1234, "Seed of the document order in every bucket.")
    curriculum: list = doc([], "Phases: [{tokens = N, mix = {bucket = weight, ...}}, ...]; empty = one phase over all buckets by size.")
    allow_bucket_exhaustion: bool = doc(False, "When a bucket runs dry: false = save and HALT; true = drop it, renormalise the mix, continue.")
    audit: bool = doc(False, "Append every step's token spans to output_dir/data_audit.jsonl (rank 0).")
    prefetch: int = doc(2, "Batches prepared ahead by a background thread (0 = load in the loop).")
    max_epochs: int = doc(1, "Passes each bucket may be read (each in a fresh seeded document order); past the last one it is exhausted.")
    epochs: dict = doc({}, "Per-bucket pass limits overriding max_epochs: {bucket = passes, ...}.")
    amend: bool = doc(False, "Resume under a changed data plan (curriculum, buckets added, shards appended) from the checkpoint's step on, instead of refusing it; see docs/data.md, 'Amending the plan'.")


@dataclass
class OptimizerConfig:
    lr: float = doc(6e-4, "Peak learning rate.")
    min_lr_ratio: float = doc(0.1, "Learning rate at the end of the cosine decay, as a fraction of lr.")
    warmup_steps: int = doc(700, "Linear warm-up steps from 0 to lr.")
    decay_steps: int = doc(0, "Steps of the cosine decay after warm-up; 0 means until training.max_steps.")
    weight_decay: float = doc(0.1, "AdamW weight decay on matrices (never on norms, biases or embeddings).")
    beta1: float = doc(0.9, "AdamW beta1.")
    beta2: float = doc(0.95, "AdamW beta2.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    fused: str = doc("auto", "Fused AdamW kernel: 'auto' (on CUDA), 'true' or 'false'.", choices=("auto", "true", "false"))


@dataclass
class TrainingConfig:
    output_dir: str = doc("outputs/run", "Run directory: checkpoints, run_state.json, metrics, logs.")
    max_steps: int = doc(600000, "Optimizer steps of the whole run (across every resumed job).")
    stop_at_step: int = doc(0, "Stop (save, status STOPPED) on reaching this step, leaving max_steps and so the learning-rate schedule as they are; 0 = off. `gpt-simple verify --replay` trains its K steps with it. Not for a chain of jobs: an orchestrator resubmits a STOPPED run, and each later job would stop at once.")
    global_batch_size: int = doc(512, "Sequences per optimizer step, whatever the world size.")
    micro_batch_size: int = doc(16, "Sequences per forward/backward on one rank; the rest is gradient accumulation.")
    seed: int = doc(1337, "Seed of the model initialisation (identical on every world size).")
    device: str = doc("auto", "'auto' (cuda if available, else cpu), 'cpu' or 'cuda'.", choices=("auto", "cpu", "cuda"))
    dtype: str = doc("auto", "Compute dtype: 'auto' (bf16 on CUDA, fp32 on CPU), 'bf16' or 'fp32'.", choices=("auto", "bf16", "fp32"))
    deterministic: bool = doc(False, "torch.use_deterministic_algorithms(True), and CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts: on GPUs, a replay (`gpt-simple verify --replay`) is `exact` only with it. Slower on GPUs; no effect on CPU results.")
    compile: bool = doc(False, "torch.compile each transformer block.")
    compile_cache_dir: str = doc("auto", "With compile: where torch's compilation caches live (inductor, FX graph, AOT autograd, Triton), shared by every job of the run so that a resumed launch's compile is a cache hit. 'auto' = OUTPUT_DIR/compile_cache; a path (e.g. fast local disk, if the output dir is slow); '' = torch's default (TORCHINDUCTOR_CACHE_DIR, else the node's /tmp).")
    activation_checkpointing: bool = doc(False, "Recompute each block's activations in the backward pass to save memory.")
    log_steps: int = doc(10, "Log a console line, metrics.jsonl and TensorBoard every N steps.")
    tensorboard: bool = doc(True, "Write TensorBoard scalars to output_dir/tensorboard.")
    peak_flops: float = doc(0.0, "Peak FLOP/s of one device for MFU; 0 = known GPU table, or a measured matmul rate on CPU.")
    save_steps: int = doc(1000, "Periodic (async) checkpoint every N steps; 0 disables periodic saves.")
    keep_last_k: int = doc(3, "Keep the newest K checkpoints (0 keeps all).")
    keep_milestone_every: int = doc(0, "Also keep every checkpoint whose step is a multiple of this (0 = none).")
    async_save: bool = doc(True, "Periodic saves with torch.distributed.checkpoint.async_save (the loop blocks only for staging).")
    verify_checkpoints: bool = doc(True, "Check a checkpoint's recorded CRC-32 checksums before loading it (a mismatch falls back to the one before); false skips the extra read for very large checkpoints.")
    resume: str = doc("auto", "'auto' (newest committed checkpoint, else fresh), 'scratch', or a checkpoint path.")
    max_runtime_seconds: float = doc(0.0, "Deadline in seconds from process start (0 = SLURM_JOB_END_TIME / GPT_SIMPLE_MAX_RUNTIME / none).")
    setup_timeout_seconds: float = doc(300.0, "Set-up bound: process-group creation, rendezvous and set-up collectives give up after this many seconds (a resumable, transient failure).")
    collective_timeout_seconds: float = doc(1800.0, "After set-up, a collective gives up after this many seconds (a resumable, transient failure): how long the survivors of a lost or hung node wait; keep it above the longest wait a rank may see (a save, an evaluation).")
    walltime_reserve_seconds: float = doc(60.0, "Time kept before the deadline to write the final checkpoint (raised to 1.5x the measured save time when saves take longer).")


@dataclass
class ParallelConfig:
    replicate_degree: int | str = doc(1, "Hybrid sharding (HSDP): model replicas, each sharded over world size / degree ranks (a 2-D mesh, replicate x shard); 1 = plain FSDP over every rank; 'auto' = one replica per node (world size / LOCAL_WORLD_SIZE).")


@dataclass
class EvalConfig:
    every_steps: int = doc(0, "Evaluate on the validation splits after every N steps (0 = only at the end, if at_end).")
    tokens: int = doc(65536, "Validation tokens per bucket per evaluation (capped by what the split holds).")
    at_end: bool = doc(False, "Also evaluate after the last step of the run.")
    dir: str = doc("", "Folder of validation buckets prepared separately (same bucket names and tokenizer); empty = data.dir/BUCKET/val.")


@dataclass
class WandbConfig:
    enabled: bool = doc(False, "Also log to Weights & Biases (pip install 'gpt-simple[wandb]'; rank 0): one W&B run per training run, resumed by every job (see docs/orchestration.md).")
    project: str = doc("gpt-simple", "W&B project.")
    entity: str = doc("", "W&B entity (user or team); empty = the account's default.")
    mode: str = doc("auto", "'online', 'offline' (files under dir, upload later with `wandb sync`), or 'auto' ($WANDB_MODE, else online).", choices=("auto", "online", "offline"))
    name: str = doc("", "Display name of the W&B run; empty = the output_dir's folder name.")
    group: str = doc("", "W&B group (e.g. a sweep or an ablation); empty = none.")
    tags: list = doc([], "W&B tags, e.g. ['gpt2', 'ablation'].")
    notes: str = doc("", "Free-text notes shown with the W&B run.")
    dir: str = doc("", "Folder for W&B's local files (DIR/wandb/); empty = $WANDB_DIR if set, else output_dir.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture(self) -> dict:
        """The fields that decide the shapes and meaning of the weights (not where the first ones came from)."""
        return {k: v for k, v in dataclasses.asdict(self.model).items() if k not in NOT_ARCHITECTURE}

    def arch_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.architecture(), sort_keys=True).encode()).hexdigest()[:16]


def section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def field_types(cls: type) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _check_choices(cfg: Config) -> None:
    for section in section_classes():
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            choices = f.metadata.get("choices")
            if choices and getattr(obj, f.name) not in choices:
                raise ConfigError(
                    f"{section}.{f.name}: {getattr(obj, f.name)!r} is not one of {', '.join(map(repr, choices))}"
                )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    _check_choices(cfg)
    m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.training
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        _require(getattr(m, name) > 0, f"model.{name}: must be > 0, got {getattr(m, name)}")
    _require(m.n_embd % m.n_head == 0, f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    kv = m.n_kv_head or m.n_head
    _require(0 < kv <= m.n_head and m.n_head % kv == 0,
             f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head})")
    if m.pos_embedding == "rope":
        _require((m.n_embd // m.n_head) % 2 == 0, "model: rope needs an even head size (n_embd / n_head)")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout: must be in [0, 1), got {m.dropout}")
    _require(m.mlp_ratio > 0, f"model.mlp_ratio: must be > 0, got {m.mlp_ratio}")
    _require(m.norm_eps > 0, f"model.norm_eps: must be > 0, got {m.norm_eps}")

    _require(d.seq_len > 0, f"data.seq_len: must be > 0, got {d.seq_len}")
    _require(d.seq_len <= m.block_size, f"data.seq_len ({d.seq_len}) must not exceed model.block_size ({m.block_size})")
    _require(d.prefetch >= 0, f"data.prefetch: must be >= 0, got {d.prefetch}")
    _require(bool(d.dir), "data.dir: must name a folder")
    _validate_curriculum(d.curriculum)
    _require(d.max_epochs >= 1, f"data.max_epochs: must be >= 1, got {d.max_epochs}")
    for bucket, passes in d.epochs.items():
        _require(isinstance(passes, int) and not isinstance(passes, bool) and passes >= 1,
                 f"data.epochs.{bucket}: must be an integer >= 1, got {passes!r}")

    _require(o.lr > 0, f"optimizer.lr: must be > 0, got {o.lr}")
    _require(0.0 <= o.min_lr_ratio <= 1.0, f"optimizer.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    _require(o.warmup_steps >= 0, f"optimizer.warmup_steps: must be >= 0, got {o.warmup_steps}")
    _require(o.decay_steps >= 0, f"optimizer.decay_steps: must be >= 0, got {o.decay_steps}")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay: must be >= 0, got {o.weight_decay}")
    for name in ("beta1", "beta2"):
        _require(0.0 <= getattr(o, name) < 1.0, f"optimizer.{name}: must be in [0, 1), got {getattr(o, name)}")
    _require(o.eps > 0, f"optimizer.eps: must be > 0, got {o.eps}")
    _require(o.grad_clip >= 0, f"optimizer.grad_clip: must be >= 0, got {o.grad_clip}")

    _require(t.max_steps > 0, f"training.max_steps: must be > 0, got {t.max_steps}")
    _require(t.stop_at_step >= 0, f"training.stop_at_step: must be >= 0, got {t.stop_at_step}")
    _require(t.setup_timeout_seconds > 0, f"training.setup_timeout_seconds: must be > 0, got {t.setup_timeout_seconds}")
    _require(t.collective_timeout_seconds > 0,
             f"training.collective_timeout_seconds: must be > 0, got {t.collective_timeout_seconds}")
    _require(cfg.eval.every_steps >= 0, f"eval.every_steps: must be >= 0, got {cfg.eval.every_steps}")
    _require(cfg.eval.tokens > 0, f"eval.tokens: must be > 0, got {cfg.eval.tokens}")
    _require(o.warmup_steps < t.max_steps,
             f"optimizer.warmup_steps ({o.warmup_steps}) must be < training.max_steps ({t.max_steps})")
    _require(t.global_batch_size > 0, f"training.global_batch_size: must be > 0, got {t.global_batch_size}")
    _require(t.micro_batch_size > 0, f"training.micro_batch_size: must be > 0, got {t.micro_batch_size}")
    _require(t.global_batch_size % t.micro_batch_size == 0,
             f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
             f"training.micro_batch_size ({t.micro_batch_size})")
    for name in ("log_steps",):
        _require(getattr(t, name) > 0, f"training.{name}: must be > 0, got {getattr(t, name)}")
    for name in ("save_steps", "keep_last_k", "keep_milestone_every", "max_runtime_seconds",
                 "walltime_reserve_seconds", "peak_flops"):
        _require(getattr(t, name) >= 0, f"training.{name}: must be >= 0, got {getattr(t, name)}")
    _require(bool(t.output_dir), "training.output_dir: must name a folder")
    _require(bool(t.resume), "training.resume: must be 'auto', 'scratch' or a checkpoint path")
    _require(bool(cfg.wandb.project), "wandb.project: must name a W&B project")
    _require(all(isinstance(tag, str) and tag for tag in cfg.wandb.tags),
             f"wandb.tags: must be a list of non-empty strings, got {cfg.wandb.tags!r}")
    r = cfg.parallel.replicate_degree
    _require(r == "auto" or (isinstance(r, int) and r >= 1),
             f"parallel.replicate_degree: must be an integer >= 1 or 'auto', got {r!r}")


def validate_world(cfg: Config, world_size: int) -> None:
    """Rules that depend on how many ranks the job has."""
    t = cfg.training
    per_step = t.micro_batch_size * world_size
    _require(t.global_batch_size % per_step == 0,
             f"training.global_batch_size ({t.global_batch_size}) must be divisible by micro_batch_size x world size "
             f"({t.micro_batch_size} x {world_size} = {per_step})")


def _validate_curriculum(phases: list) -> None:
    for i, phase in enumerate(phases):
        where = f"data.curriculum[{i}]"
        _require(isinstance(phase, dict), f"{where}: must be a table {{tokens = N, mix = {{bucket = weight}}}}")
        for key in sorted(set(phase) - {"tokens", "mix"}):
            raise ConfigError(f"{where}: unknown key {key!r}{suggest(key, ['tokens', 'mix'])}")
        tokens = phase.get("tokens", 0)
        _require(isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0,
                 f"{where}.tokens: must be an integer >= 0, got {tokens!r}")
        _require(tokens > 0 or i == len(phases) - 1, f"{where}.tokens: only the last phase may omit its token budget")
        mix = phase.get("mix")
        _require(isinstance(mix, dict) and mix, f"{where}.mix: must be a non-empty table of bucket = weight")
        for bucket, weight in mix.items():
            _require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
                     f"{where}.mix.{bucket}: weight must be a number >= 0, got {weight!r}")
        _require(sum(mix.values()) > 0, f"{where}.mix: weights must not all be 0")
