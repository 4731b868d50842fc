"""torch.compile's caches live in the run's folder (training.compile_cache_dir = 'auto': OUTPUT_DIR/compile_cache),
so every launch of a chain, on whatever node, finds what the first one compiled; a launch that hits the cache
trains bit-identically to one that compiled from nothing. (How much faster: bench/startup.py, docs/performance.md.)
"""
import pytest

from helpers.train import child_env, metrics, run_train

pytestmark = pytest.mark.slow

COMPILED = ("--training.compile", "true", "--model.n_layer", "1", "--training.max_steps", "3",
            "--optimizer.warmup_steps", "1", "--training.tensorboard", "false")  # one block: one graph to compile
KEYS = ("step", "loss", "grad_norm", "lr")


def cache_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_launch_finds_the_compiled_kernels_of_the_one_before_and_trains_bit_identically(tmp_path, demo_data):
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    # the caller's own cache setting must not decide where this one goes
    env = {k: v for k, v in child_env().items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    run_train(cold, demo_data, *COMPILED, env=env)
    cache = cold / "compile_cache"
    compiled = cache_files(cache)
    assert any(name.endswith(".so") for name in compiled), compiled  # the kernels, in the run's folder

    run_train(warm, demo_data, *COMPILED, "--training.compile_cache_dir", str(cache), env=env)
    assert cache_files(cache) == compiled  # every graph and kernel was found: nothing compiled again
    assert not (warm / "compile_cache").exists()
    assert [{k: r[k] for k in KEYS} for r in metrics(warm)] == [{k: r[k] for k in KEYS} for r in metrics(cold)]
