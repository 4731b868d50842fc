"""GPU benchmark: GPT-2 124M and a ~350M GPT-2 (medium) at seq 1024 on one GPU through the real train.py.

bf16 through FSDP2's MixedPrecisionPolicy (training.dtype = bf16), torch.compile per block, fused AdamW
(optimizer.fused = auto picks it on CUDA), TF32 for the fp32 matmuls left over. Each model trains MAX_STEPS
steps on the embedded demo corpus (byte-level tokens; no download) with an async periodic save at SAVE_STEP
and the synchronous final save at the end. Reported, from the run's own metrics.jsonl and events.jsonl:

  * tokens/s and MFU (model FLOPs per token x tokens/s over the GPU's bf16 dense peak from
    gpt_simple.flops.GPU_PEAK_FLOPS), median of the logged windows after the first (compilation);
  * the memory high-water mark (torch.cuda.max_memory_allocated, logged by the trainer as max_memory_gb);
  * the loop's blocking time for the async save, against the synchronous final save of the same state size.

    python bench/gpu.py [--quick | --smoke] [--json FILE]

--smoke trains GPT-2 124M for a few steps (and --quick the same 40 steps, 124M only). Without CUDA it checks
the runs' configs (parsed, validated and sized on the meta device, as train.py would) and prints a skipped row;
it exits 0 either way.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import Mode, main_for  # noqa: E402
from bench.launch import ROOT, TrainRun, scratch_dir  # noqa: E402
from bench.models import step_tokens  # noqa: E402
from bench.stats import median  # noqa: E402
from bench.table import row  # noqa: E402

GPT2 = ROOT / "configs" / "gpt2.toml"

# name -> (model overrides, micro batch); the global batch is 4 micro-batches (gradient accumulation 4).
MODELS = {
    "GPT-2 124M": ([], 16),
    "GPT-2 350M": (["--model.n_layer", "24", "--model.n_head", "16", "--model.n_embd", "1024"], 8),
}
STEPS = {"full": (40, 30, 5), "quick": (40, 30, 5), "smoke": (6, 3, 1)}  # max steps, async save at, log every
TARGET_MFU = {"GPT-2 124M": "≥ 0.45", "GPT-2 350M": "≥ 0.50"}
SKIP = "no CUDA device (torch.cuda.is_available() is False): the GPU benchmark needs one GPU"


def overrides(mode: Mode, model: list[str], micro: int) -> list[str]:
    max_steps, save_step, log_steps = STEPS[mode.level]
    return [*model, "--data.dir", "data/demo", "--data.demo", "true", *mode.data(),
            "--data.allow_bucket_exhaustion", "true",
            "--training.device", "cuda", "--training.dtype", "bf16", "--training.compile", "true",
            "--optimizer.fused", "auto", "--optimizer.warmup_steps", "2",
            "--training.micro_batch_size", str(micro), "--training.global_batch_size", str(4 * micro),
            "--training.max_steps", str(max_steps), "--training.log_steps", str(log_steps),
            "--training.save_steps", str(save_step), "--training.tensorboard", "false"]


def one(name: str, mode: Mode, root: Path) -> list[dict]:
    import torch
    model, micro = MODELS[name]
    run = TrainRun(root / name.replace(" ", "-"), overrides(mode, model, micro), config=GPT2,
                   name=name).start().finish(timeout=1800)
    records = run.metrics()[1:]  # the first window includes compilation
    saves = {e["type"]: e for e in run.events() if e.get("event") == "save"}
    _, flops_per_token = step_tokens(overrides(mode, model, micro), GPT2)
    tps, mfu = median([r["tokens_per_s"] for r in records]), median([r["mfu"] for r in records])
    memory = max(r.get("max_memory_gb", 0.0) for r in records)
    periodic, final = saves.get("periodic"), saves.get("final")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return [
        row(f"{name}: tokens/s on 1 GPU", tps, None, None, "report", unit="tok/s",
            note=f"{gpu}; micro batch {micro} x 4 accumulation, seq 1024, bf16, compile, fused AdamW"),
        row(f"{name}: MFU", tps * flops_per_token / 1e12, tps * flops_per_token / mfu / 1e12, min(1.0, mfu),
            TARGET_MFU[name], unit="TFLOP/s",
            note="baseline: the bf16 dense peak of the GPU (metrics.GPU_PEAK_FLOPS)" +
                 ("; the run exceeded it, so that table's entry is wrong: capped at 1" if mfu > 1 else "")),
        row(f"{name}: memory high-water", memory, None, None, "report", unit="GiB",
            note="torch.cuda.max_memory_allocated, as the trainer logs it (max_memory_gb)"),
        row(f"{name}: async save blocking", periodic and periodic["blocking_s"], final and final["total_s"],
            periodic and final and periodic["blocking_s"] / final["total_s"], "≤ 10%", unit="s",
            note="baseline: the synchronous final save of the same run"),
    ]


def run(mode: Mode = Mode()) -> list[dict]:
    import torch
    names = list(MODELS) if mode.level == "full" else ["GPT-2 124M"]
    if not torch.cuda.is_available():
        sizes = []
        for name in names:  # what can be checked without a GPU: the configs train.py would be given
            model, micro = MODELS[name]
            tokens, flops = step_tokens(overrides(mode, model, micro), GPT2)
            sizes.append(f"{name}: {tokens:,} tokens/step, {flops / 1e9:.2f} GFLOP/token")
        return [row(f"GPU: {' / '.join(names)}, bf16, compile", None, None, None, "skipped",
                    note=f"{SKIP}; configs checked ({'; '.join(sizes)})")]
    root = scratch_dir("gpu")
    return [r for name in names for r in one(name, mode, root)]


if __name__ == "__main__":
    sys.exit(main_for(run, __doc__.splitlines()[0]))
