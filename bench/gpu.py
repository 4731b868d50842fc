"""GPU benchmark: GPT-2 124M and a ~350M GPT-2 (medium) at seq 1024 on one GPU through the real train.py.

bf16 through FSDP2's MixedPrecisionPolicy (training.dtype = bf16), torch.compile per block, fused AdamW
(optimizer.fused = auto picks it on CUDA), TF32 for the fp32 matmuls left over. Each model trains MAX_STEPS
steps on the embedded demo corpus (byte-level tokens; no download) with an async periodic save at SAVE_STEP
and the synchronous final save at the end. Reported, from the run's own metrics.jsonl and events.jsonl:

  * tokens/s and MFU (model FLOPs per token x tokens/s over the GPU's bf16 dense peak from
    gpt_simple.metrics.GPU_PEAK_FLOPS), median of the logged windows after the first (compilation);
  * the memory high-water mark (torch.cuda.max_memory_allocated, logged by the trainer as max_memory_gb);
  * the loop's blocking time for the async save, against the synchronous final save of the same state size.

    python bench/gpu.py [--quick] [--json FILE]

Without CUDA it says so and exits 0; bench/run.py shows a skipped row.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, TrainRun, main_for, median, row, scratch_dir, step_tokens  # noqa: E402

# name -> (model overrides, micro batch); the global batch is 4 micro-batches (gradient accumulation 4).
MODELS = {
    "GPT-2 124M": ([], 16),
    "GPT-2 350M": (["--model.n_layer", "24", "--model.n_head", "16", "--model.n_embd", "1024"], 8),
}
MAX_STEPS, SAVE_STEP, LOG_STEPS = 40, 30, 5
TARGET_MFU = {"GPT-2 124M": "≥ 0.45", "GPT-2 350M": "≥ 0.50"}
SKIP = "no CUDA device (torch.cuda.is_available() is False): the GPU benchmark needs one GPU"


def overrides(model: list[str], micro: int) -> list[str]:
    return [*model, "--data.dir", "data/demo", "--data.demo", "true", "--data.allow_bucket_exhaustion", "true",
            "--training.device", "cuda", "--training.dtype", "bf16", "--training.compile", "true",
            "--optimizer.fused", "auto", "--optimizer.warmup_steps", "2",
            "--training.micro_batch_size", str(micro), "--training.global_batch_size", str(4 * micro),
            "--training.max_steps", str(MAX_STEPS), "--training.log_steps", str(LOG_STEPS),
            "--training.save_steps", str(SAVE_STEP), "--training.tensorboard", "false"]


def one(name: str, root: Path) -> list[dict]:
    import torch
    model, micro = MODELS[name]
    run = TrainRun(root / name.replace(" ", "-"), overrides(model, micro), config=ROOT / "configs" / "gpt2.toml",
                   name=name).start()
    code = run.wait_exit(timeout=1800)
    if code != 0:
        raise RuntimeError(f"{name}: train.py exited {code}\n{run.log_tail()}")
    records = run.metrics()[1:]  # the first window includes compilation
    saves = {e["type"]: e for e in run.events() if e.get("event") == "save"}
    _, flops_per_token = step_tokens(overrides(model, micro), ROOT / "configs" / "gpt2.toml")
    tps, mfu = median([r["tokens_per_s"] for r in records]), median([r["mfu"] for r in records])
    memory = max(r.get("max_memory_gb", 0.0) for r in records)
    periodic, final = saves.get("periodic"), saves.get("final")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return [
        row(f"{name}: tokens/s on 1 GPU", tps, None, None, "report", unit="tok/s",
            note=f"{gpu}; micro batch {micro} x 4 accumulation, seq 1024, bf16, compile, fused AdamW"),
        row(f"{name}: MFU", tps * flops_per_token / 1e12, tps * flops_per_token / mfu / 1e12, mfu,
            TARGET_MFU[name], unit="TFLOP/s", note="baseline: the bf16 dense peak of the GPU (metrics.GPU_PEAK_FLOPS)"),
        row(f"{name}: memory high-water", memory, None, None, "report", unit="GiB",
            note="torch.cuda.max_memory_allocated, as the trainer logs it (max_memory_gb)"),
        row(f"{name}: async save blocking", periodic and periodic["blocking_s"], final and final["total_s"],
            periodic and final and periodic["blocking_s"] / final["total_s"], "≤ 10%", unit="s",
            note="baseline: the synchronous final save of the same run"),
    ]


def run(quick: bool = False) -> list[dict]:
    import torch
    if not torch.cuda.is_available():
        return [row("GPU: GPT-2 124M / 350M, bf16, compile", None, None, None, "skipped", note=SKIP)]
    root = scratch_dir("gpu")
    return [r for name in MODELS for r in one(name, root)]


def main(argv: list[str]) -> int:
    import torch
    if not torch.cuda.is_available() and "-h" not in argv and "--help" not in argv:
        print(f"bench/gpu.py: skipped: {SKIP}. Run `python bench/gpu.py` on a machine with a CUDA GPU.")
        return 0
    return main_for(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
