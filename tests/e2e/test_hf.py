"""Hugging Face in and out: model.init_from (a GPT-2 or Llama folder made by transformers) and `gpt-simple export`
to GPT2LMHeadModel / LlamaForCausalLM, checked against transformers' own models."""
import json
import signal
from pathlib import Path

import pytest
import torch

from gpt_simple.journal import events as ev
from helpers.train import (child_env, events, finish, losses, metrics, run_train, start_train, status_word)

pytestmark = pytest.mark.slow

FAST = ("--training.peak_flops", "1e12")
# TINY's model with 4 query heads over 2 key/value heads, an untied head and a RoPE base other than the default
LLAMA_ARGS = ("--model.pos_embedding", "rope", "--model.norm", "rmsnorm", "--model.mlp", "swiglu",
              "--model.n_head", "4", "--model.n_kv_head", "2", "--model.bias", "false",
              "--model.tie_embeddings", "false", "--model.rope_theta", "5000")
GPT2_ARGS = ()  # TINY's own model: learned positions, LayerNorm, GELU, biases, tied


def llama_config(**over):
    from gpt_simple.config import ModelConfig
    return ModelConfig(**{**dict(vocab_size=320, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                 pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                 tie_embeddings=False, rope_theta=5000.0), **over})


def gpt2_config(**over):
    from gpt_simple.config import ModelConfig
    return ModelConfig(**{**dict(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=64), **over})


def save_hf(folder: Path, kind: str, **over) -> Path:
    """A tiny random transformers model, saved as Hugging Face saves it; its norms and biases are random too, so
    that no tensor the mapping could confuse is left at its initial ones or zeros."""
    import transformers
    torch.manual_seed(7)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **over)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=320, n_positions=64, n_embd=64, n_layer=2, n_head=2, **over)
        model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_" in name else 0.0))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf-pretrained")
    return {kind: save_hf(base / kind, kind) for kind in ("llama", "gpt2")}


def tokens(n: int = 40) -> torch.Tensor:
    return torch.randint(0, 320, (2, n), generator=torch.Generator().manual_seed(0))


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def ours_from(folder: Path, cfg):
    from gpt_simple.hf_io import load_into
    from gpt_simple.model import GPT
    model = GPT(cfg)
    load_into(model, folder, cfg)
    return model.eval()


# -- in ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_import_gives_transformers_logits(pretrained, kind):
    cfg = llama_config() if kind == "llama" else gpt2_config()
    ours, theirs = ours_from(pretrained[kind], cfg), hf_model(pretrained[kind])
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, rtol=1e-5, atol=1e-5)


def test_import_refuses_what_does_not_fit_in_one_line(pretrained, tmp_path):
    from gpt_simple.hf import HFError
    from gpt_simple.hf_io import load_into
    from gpt_simple.model import GPT
    llama = pretrained["llama"]
    cases = [
        (llama_config(n_layer=3), f"model.n_layer (3) differs from {llama}/config.json num_hidden_layers (2)"),
        (llama_config(n_kv_head=4), f"model.n_kv_head (4) differs from {llama}/config.json num_key_value_heads (2)"),
        (llama_config(rope_theta=10000.0), "model.rope_theta (10000.0) differs"),
        (llama_config(tie_embeddings=True), "model.tie_embeddings (True) differs"),
        (llama_config(norm="layernorm"), "model.norm ('layernorm') differs"),
        (gpt2_config(), f"model.pos_embedding ('learned') differs from {llama}/config.json model_type"),
    ]
    bad_shape = save_hf(tmp_path / "shape", "llama")  # a file whose tensor disagrees with its own config.json
    from safetensors.torch import load_file, save_file
    state = load_file(bad_shape / "model.safetensors")
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"][:, :128].clone()
    save_file(state, bad_shape / "model.safetensors", metadata={"format": "pt"})
    cases.append((llama_config(), f"{bad_shape}/model.safetensors: model.layers.1.mlp.down_proj.weight: shape "
                                  f"[64, 128], the config needs [64, 192]"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    cases.append((llama_config(), f"{bert}/config.json: model_type 'bert' is not supported"))
    for cfg, expected in cases:
        with pytest.raises(HFError) as e:
            load_into(GPT(cfg), bert if "bert" in expected else bad_shape if "shape" in expected else llama, cfg)
        assert expected in str(e.value) and "\n" not in str(e.value), (expected, str(e.value))
    with pytest.raises(HFError, match="not a folder"):
        load_into(GPT(llama_config()), tmp_path / "nowhere", llama_config())


@pytest.mark.parametrize("kind,over", [("gpt2", dict(bias=False, tie_embeddings=False)),
                                       ("llama", dict(bias=True, tie_embeddings=True, n_kv_head=1)),
                                       ("llama", dict(n_kv_head=0))])
def test_every_layout_variant_goes_out_and_back(tmp_path, kind, over):
    """Random weights (norms and biases included) through the export's writer and config: transformers gives our
    logits, and init_from's loader gives back the same weights. GPT-2 without biases is written with zero
    biases, which load back into a model without them; non-zero ones do not."""
    from gpt_simple import hf
    from gpt_simple.hf_io import write_safetensors
    from gpt_simple.model import GPT
    cfg = llama_config(**over) if kind == "llama" else gpt2_config(**over)
    torch.manual_seed(3)
    ours = GPT(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path / "out"
    folder.mkdir()
    layout, why_not = hf.layout_of(cfg)
    assert layout == kind and not why_not
    state = {k: v.detach() for k, v in ours.state_dict().items()}
    write_safetensors(folder / "model.safetensors", hf.export_tensors(state, cfg, layout, torch.float32),
                      torch.float32)
    (folder / "config.json").write_text(json.dumps(hf.hf_config(cfg, layout)))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(folder)(x).logits, ours(x), rtol=1e-5, atol=1e-5)
    back = ours_from(folder, cfg).state_dict()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    if kind == "gpt2":
        from gpt_simple.hf import HFError
        from gpt_simple.hf_io import load_into
        with pytest.raises(HFError, match="model.safetensors: transformer.ln_f.bias: non-zero bias, but model.bias = false"):
            load_into(GPT(cfg), save_hf(tmp_path / "biased", "gpt2", tie_word_embeddings=False), cfg)


def test_bin_weights_and_bare_gpt2_names_load(pretrained, tmp_path):
    """pytorch_model.bin (read with weights_only) and GPT-2's original names (no 'transformer.' prefix, the
    causal-mask buffers stored): the same model."""
    from safetensors.torch import load_file
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((pretrained["gpt2"] / "config.json").read_text())
    state = {k.removeprefix("transformer."): v for k, v in load_file(pretrained["gpt2"] / "model.safetensors").items()}
    state.update({f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(2)})
    torch.save(state, folder / "pytorch_model.bin")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(ours_from(folder, gpt2_config())(x), ours_from(pretrained["gpt2"], gpt2_config())(x))


# -- in, train, out, in again ------------------------------------------------------------------------------------
def train_from(out: Path, data: Path, folder: Path, args, *extra, **kwargs):
    return run_train(out, data, *FAST, "--model.init_from", str(folder), "--training.max_steps", "10", *args,
                     *extra, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data, pretrained) -> dict[str, Path]:
    """One run per layout, 10 steps from the pretrained folder, and its export."""
    base, out = tmp_path_factory.mktemp("hf-runs"), {}
    for kind, args in (("llama", LLAMA_ARGS), ("gpt2", GPT2_ARGS)):
        train_from(base / kind, demo_data, pretrained[kind], args)
        out[kind] = base / kind
    return out


def trained_model(run: Path):
    from gpt_simple.export import build_model, load_checkpoint_model
    state, cfg, _, _ = load_checkpoint_model(run)
    return build_model(state, cfg), cfg


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trained_export_matches_transformers_and_reimports(trained, pretrained, tmp_path, kind):
    from gpt_simple.cli import main
    run, out = trained[kind], tmp_path / "export"
    started = [e for e in events(run) if e["event"] == ev.InitFrom.kind]
    assert len(started) == 1 and started[0]["path"] == str(pretrained[kind].resolve())
    import hashlib
    assert started[0]["sha256"] == hashlib.sha256((pretrained[kind] / "model.safetensors").read_bytes()).hexdigest()
    assert main(["export", str(run), str(out), "--hf"]) == 0
    config = json.loads((out / "config.json").read_text())
    ours, cfg = trained_model(run)
    if kind == "llama":
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert (config["num_key_value_heads"], config["intermediate_size"], config["rope_theta"],
                config["rms_norm_eps"], config["tie_word_embeddings"], config["max_position_embeddings"]) == \
            (2, 192, 5000.0, 1e-5, False, 64)
    assert "ids from 257" in (out / "README.md").read_text()  # the byte tokenizer's ids, described
    theirs, x = hf_model(out), tokens()
    with torch.no_grad():
        expected = ours(x)
        assert not torch.equal(expected, ours_from(pretrained[kind], cfg)(x))  # trained: not the initial weights
        torch.testing.assert_close(theirs(x).logits, expected, rtol=1e-5, atol=1e-5)
    prompt = x[:1, :8]  # one row: both stop at the end-of-document id, and neither pads
    mine = ours.generate(prompt, 24, temperature=0, stop=256)
    with torch.no_grad():
        hers = theirs.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=256, pad_token_id=256)
    assert mine.tolist() == hers.tolist()
    again = ours_from(out, cfg)  # the export read back through init_from's loader: the trained weights, exactly
    trained_state = ours.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, trained_state[name]), name


def test_a_stopped_chain_from_pretrained_equals_one_launch(trained, pretrained, demo_data, tmp_path):
    """Launch 1 starts from the folder and is stopped by SIGTERM mid-run; launch 2 resumes its checkpoint (and
    says that init_from is ignored): the losses are those of the uninterrupted run, exactly."""
    out = tmp_path / "chain"
    proc = start_train(out, demo_data, *FAST, "--model.init_from", str(pretrained["llama"]),
                       "--training.max_steps", "10", *LLAMA_ARGS, env=child_env(GPT_SIMPLE_DRILL="step=0.3"))
    path = out / "metrics.jsonl"
    import time
    deadline = time.time() + 120
    while not (path.exists() and len(path.read_text().splitlines()) >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr[-2000:]
    stopped = [e for e in events(out) if e["event"] == ev.Stop.kind]
    assert len(stopped) == 1 and 3 <= stopped[0]["step"] < 10  # really mid-run
    second = train_from(out, demo_data, pretrained["llama"], LLAMA_ARGS)
    assert "model.init_from" in second.stdout + second.stderr and "ignored" in second.stdout + second.stderr
    assert status_word(out) == "COMPLETED"
    assert [e["launch"] for e in events(out) if e["event"] == ev.InitFrom.kind] == [1]
    assert [e["step"] for e in events(out) if e["event"] == ev.Resume.kind] == [stopped[0]["step"]]
    assert losses(out) == losses(trained["llama"]) and len(metrics(out)) == 10


def test_a_config_that_differs_from_the_folder_is_one_line_exit_2(pretrained, demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    proc = train_from(out, demo_data, pretrained["llama"], LLAMA_ARGS, "--model.n_layer", "3", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: model.n_layer (3) differs from {pretrained['llama']}/config.json "
                      f"num_hidden_layers (2)"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert status_word(out).startswith("ERROR") and not (out / "metrics.jsonl").exists()
    # `gpt-simple validate` checks the same before a job is queued
    from gpt_simple.config import load_config
    from gpt_simple.preflight import validate_main
    from helpers.train import TINY
    args = [*TINY[2:], "--data.dir", str(demo_data), "--data.demo", "false", "--model.init_from",
            str(pretrained["llama"]), *LLAMA_ARGS, "--training.output_dir", str(tmp_path / "fresh")]
    assert validate_main(load_config(TINY[1], args)) == 0
    assert validate_main(load_config(TINY[1], [*args, "--model.n_layer", "3"])) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == errors[0]
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    proc = train_from(tmp_path / "bert-run", demo_data, bert, LLAMA_ARGS, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {bert}/config.json: model_type 'bert' is not supported (model.init_from takes a GPT-2 or Llama "
        f"layout: model_type 'gpt2' or 'llama')"]


@pytest.mark.parametrize("nproc,replicas", [(4, 2)])
def test_sharded_ranks_start_from_the_folder(pretrained, demo_data, tmp_path, nproc, replicas):
    """HSDP 2x2 (2 replicas, each FSDP over 2 ranks): every rank fills its shard. A deadline already past when
    set-up ends stops the run at step 0 with a checkpoint of the initial weights: exactly the folder's. (Plain
    FSDP over 2 ranks passed the same test; one mesh that both shards and replicates is kept, for time.)"""
    from gpt_simple.checkpoint import load_model_state
    out = tmp_path / "run"
    proc = train_from(out, demo_data, pretrained["llama"], LLAMA_ARGS, "--parallel.replicate_degree", str(replicas),
                      "--training.micro_batch_size", "2", nproc=nproc, env=child_env(GPT_SIMPLE_MAX_RUNTIME="1"))
    assert f"world size {nproc}" in proc.stdout
    saved = load_model_state(out / "checkpoints" / "step-0-shutdown")
    expected = ours_from(pretrained["llama"], llama_config()).state_dict()
    assert saved.keys() == {k for k in expected if not k.startswith("rope_")}
    for name, tensor in saved.items():
        assert torch.equal(tensor, expected[name]), name
    assert [e["event"] for e in events(out)].count(ev.InitFrom.kind) == 1


def test_a_hugging_face_tokenizer_goes_with_the_export(pretrained, demo_data, tmp_path):
    """Data prepared with `--tokenizer hf:FOLDER/tokenizer.json`, the run started from FOLDER: the export holds
    that tokenizer.json (found by the digest the shards record), and transformers' tokenizer from the export
    gives our ids. Moved away, it is named in README.md, and --tokenizer hf:PATH brings it back."""
    import shutil
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from gpt_simple.cli import main
    from gpt_simple.data.prepare.build import prepare
    from gpt_simple.data.tokenizer import get_tokenizer
    folder = Path(shutil.copytree(pretrained["llama"], tmp_path / "model"))
    docs = tmp_path / "docs"
    docs.mkdir()
    sources = sorted(Path(json.__file__).parent.glob("*.py"))
    for src in sources:
        (docs / f"{src.stem}.txt").write_text(src.read_text())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train([str(p) for p in sources], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    prepare([str(docs)], str(tmp_path / "data"), "code", f"hf:{folder}/tokenizer.json", workers=1, quiet=True)
    run = tmp_path / "run"
    train_from(run, tmp_path / "data", folder, LLAMA_ARGS, "--training.max_steps", "3")
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
    from transformers import AutoTokenizer
    text = (docs / "decoder.txt").read_text()[:500]
    ours = get_tokenizer(f"hf:{folder}/tokenizer.json").encode(text).tolist()
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ours and len(ours) > 50

    moved = tmp_path / "elsewhere.json"
    (folder / "tokenizer.json").rename(moved)
    assert main(["export", str(run), str(out)]) == 0
    assert not (out / "tokenizer.json").exists() and "was not found here" in (out / "README.md").read_text()
    assert main(["export", str(run), str(out), "--tokenizer", f"hf:{moved}"]) == 0
    assert (out / "tokenizer.json").read_bytes() == moved.read_bytes() and not (out / "README.md").exists()
