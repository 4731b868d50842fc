"""`gpt-simple export` and `gpt-simple generate` on checkpoints of real (tiny) training runs."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from gpt_simple.checkpoint import load_model_state
from helpers.train import PYTHON, ROOT, child_env, run_train

pytestmark = pytest.mark.slow

GPT_SIMPLE = str(Path(PYTHON).with_name("gpt-simple"))
ARCHS = {
    "gpt2-tied": (),
    "gpt2-untied-nobias": ("--model.tie_embeddings", "false", "--model.bias", "false"),
    "modern": ("--model.pos_embedding", "rope", "--model.norm", "rmsnorm", "--model.mlp", "swiglu",
               "--model.n_kv_head", "1"),
    # no Hugging Face layout holds RoPE with LayerNorm and a GELU MLP
    "rope-layernorm": ("--model.pos_embedding", "rope"),
}


def cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([GPT_SIMPLE, *map(str, args)], cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=300)


class Runs(dict):
    """Each architecture trained for 3 steps (so that the weights are not the initial ones), on first use."""

    def __init__(self, base: Path, data: Path):
        super().__init__()
        self.base, self.data = base, data

    def __missing__(self, name: str) -> Path:
        run_train(self.base / name, self.data, "--training.max_steps", "3", "--training.peak_flops", "1e12",
                  *ARCHS[name])
        self[name] = self.base / name
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data) -> Runs:
    return Runs(tmp_path_factory.mktemp("export-runs"), demo_data)


def tokens(vocab: int, n: int = 48) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))


def reference_model(ckpt: Path):
    """The checkpoint's weights in a plain GPT, read straight from the DCP files."""
    from gpt_simple.checkpoint import model_config_from_meta, read_meta
    from gpt_simple.model import GPT
    cfg = model_config_from_meta(read_meta(ckpt))
    model = GPT(cfg)
    state = load_model_state(ckpt)
    if cfg.tie_embeddings:
        state["head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state)
    return model.eval(), cfg


@pytest.mark.parametrize("arch", ["gpt2-tied", "gpt2-untied-nobias"])
def test_export_round_trip_and_hugging_face_gpt2_logits(runs, tmp_path, arch):
    ckpt = runs[arch] / "checkpoints" / "step-3-final"
    out = tmp_path / "export"
    proc = cli("export", ckpt, out)
    assert proc.returncode == 0, proc.stderr
    assert "Hugging Face layout" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "gpt_simple.json",
                                                     "gpt_simple.safetensors", "model.safetensors"]
    info = json.loads((out / "gpt_simple.json").read_text())
    assert (info["step"], info["tokenizer"]) == (3, "byte")

    import torch.distributed as dist
    from gpt_simple.export import load_exported
    model, cfg, _ = load_exported(out)
    assert not dist.is_initialized()
    ref, _ = reference_model(ckpt)
    x = tokens(cfg.vocab_size)
    with torch.no_grad():
        expected = ref(x)
        assert torch.equal(model(x), expected)
        assert not torch.equal(expected, untrained(cfg)(x))  # the exported weights are the trained ones

    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    with torch.no_grad():
        got = hf(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # A tiny model's activations stay where GELU's exact and tanh forms agree to ~1e-6: scale every weight of
    # both models by 3 so that they do not (exact GELU in the HF config is then off by > 1e-4).
    with torch.no_grad():
        for p in [*model.parameters(), *hf.parameters()]:
            p.mul_(3)
        big = model(x)
        assert big.abs().max() > 4
        torch.testing.assert_close(hf(x).logits, big, rtol=1e-5, atol=3e-5)


def untrained(cfg):
    from gpt_simple.model import GPT
    from gpt_simple.config import TrainingConfig
    torch.manual_seed(TrainingConfig().seed)  # the run's initial weights
    return GPT(cfg).eval()


def test_an_architecture_without_a_hf_layout_exports_without_it(runs, tmp_path):
    ckpt = runs["rope-layernorm"] / "checkpoints" / "step-3-final"
    out = tmp_path / "export"
    # an earlier GPT-2 export into the same folder: its HF files must not survive next to the new weights
    assert cli("export", runs["gpt2-tied"], out).returncode == 0 and (out / "config.json").exists()
    proc = cli("export", runs["rope-layernorm"], out)  # a run directory: its newest checkpoint
    assert proc.returncode == 0, proc.stderr
    assert "no Hugging Face layout: model.norm = 'layernorm' with rope" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpt_simple.json", "gpt_simple.safetensors"]
    from gpt_simple.export import load_exported
    model, cfg, info = load_exported(out)
    assert info["source"] == str(ckpt.resolve())
    x = tokens(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(x), reference_model(ckpt)[0](x))

    proc = cli("export", ckpt, tmp_path / "hf", "--hf")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: {ckpt}: cannot write a Hugging Face layout: model.norm = 'layernorm' with rope (Llama uses "
        f"RMSNorm); model.mlp = 'gelu' with rope (Llama uses a SwiGLU MLP)"]
    assert not (tmp_path / "hf").exists()


def test_the_modern_architecture_exports_as_llama(runs, tmp_path):
    """RoPE + RMSNorm + SwiGLU with one key/value head and bias terms (attention_bias, mlp_bias): a
    LlamaForCausalLM whose logits are the checkpoint's."""
    ckpt = runs["modern"] / "checkpoints" / "step-3-final"
    out = tmp_path / "export"
    proc = cli("export", runs["modern"], out, "--hf")
    assert proc.returncode == 0, proc.stderr
    assert "transformers.LlamaForCausalLM.from_pretrained" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["num_key_value_heads"], config["attention_bias"], config["mlp_bias"]) == (1, True, True)
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref, cfg = reference_model(ckpt)
    x = tokens(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ref(x), rtol=1e-5, atol=1e-5)


def test_generate_samples_text(runs, tmp_path):
    run = runs["gpt2-tied"]
    greedy = ("--prompt", "def ", "--max_new_tokens", "24", "--temperature", "0")
    a = cli("generate", "--output_dir", run, *greedy)
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("def ") and len(a.stdout) > len("def \n")
    assert "step-3-final (step 3), tokenizer byte" in a.stderr
    # the same from the checkpoint path, from another folder, with the run's data folder gone (the tokenizer is
    # recorded in the checkpoint)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    meta = json.loads((moved / "checkpoints" / "step-3-final" / "meta.json").read_text())
    assert meta["run"]["tokenizer"] == "byte"
    b = cli("generate", "--checkpoint", moved / "checkpoints" / "step-3-final", *greedy, cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    assert b.stdout == a.stdout
    sampled = cli("generate", "--output_dir", run, "--num_samples", "2", "--max_new_tokens", "16", "--seed", "3")
    assert sampled.returncode == 0 and sampled.stdout.count("-" * 40) == 1


def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys):
    from gpt_simple.cli import main
    run = runs["gpt2-tied"]
    partial = tmp_path / "checkpoints" / ".tmp-step-5"
    partial.mkdir(parents=True)
    (partial / "meta.json").write_text("{}")
    broken = tmp_path / "broken"
    shutil.copytree(run / "checkpoints" / "step-3-final", broken / "checkpoints" / "step-3-final")
    shard = broken / "checkpoints" / "step-3-final" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["export", str(tmp_path / "nowhere"), str(tmp_path / "o1")], "no committed checkpoint here"),
        (["export", str(partial), str(tmp_path / "o2")], "not a committed checkpoint (no COMMITTED marker"),
        (["export", str(broken), str(tmp_path / "o3")], "__0_0.distcp: checksum mismatch"),
        (["export", str(broken), str(tmp_path / "o3"), "--no-verify"], "cannot read the model tensors"),
        (["export", str(run), str(a_file)], "exists and is not a folder"),
        (["generate", "--output_dir", str(tmp_path / "nowhere")], "no committed checkpoint here"),
        (["generate", "--output_dir", str(run), "--device", "cuda:7"], "not available on this machine"),
        (["generate", "--output_dir", str(run), "--tokenizer", "no-such-tokenizer"], "no-such-tokenizer"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (argv, err)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # and through the console script: no traceback, exit 2
    proc = cli("export", tmp_path / "nowhere", tmp_path / "o4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
