"""Config: TOML loading, overrides, and every error path (one clear line, in this process; the CLI's exit 2 is in
e2e/test_config.py)."""
import re

import pytest

from gpt_simple.config import (ConfigError, diff, load_config, markdown_reference, parse_overrides, to_toml,
                               validate_world)
from helpers.paths import ROOT


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_are_gpt2_124m_and_valid():
    cfg = load_config(ROOT / "configs" / "gpt2.toml")
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (12, 12, 768, 1024, 50304)
    assert cfg.data.seq_len == 1024


def test_overrides_are_toml_values():
    cfg = load_config(ROOT / "configs" / "tiny.toml",
                      ["--training.max_steps", "500", "--data.allow_bucket_exhaustion", "true",
                       "--optimizer.lr=1e-3", "--training.output_dir", "runs/x",
                       "--data.curriculum", "[{tokens = 1000, mix = {code = 1}}, {mix = {prose = 2}}]"])
    assert cfg.training.max_steps == 500
    assert cfg.data.allow_bucket_exhaustion is True
    assert cfg.optimizer.lr == 1e-3
    assert cfg.training.output_dir == "runs/x"
    assert cfg.data.curriculum == [{"tokens": 1000, "mix": {"code": 1}}, {"mix": {"prose": 2}}]


def test_int_accepted_for_float_field():
    assert load_config(None, ["--optimizer.lr", "1"]).optimizer.lr == 1.0


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.toml", ["--data.curriculum", "[{tokens = 64, mix = {a = 1}}]"])
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("text, overrides, message", [
    ("[modle]\nn_layer = 2\n", [], "unknown section [modle] (did you mean 'model'?)"),
    ("[model]\nn_layers = 2\n", [], "unknown field model.n_layers (did you mean 'n_layer'?)"),
    ("[model]\nn_layer = 'two'\n", [], "model.n_layer: expected int, got str 'two'"),
    ("[model]\nbias = 1\n", [], "model.bias: expected bool, got int 1"),
    ("[model]\nn_layer = 0\n", [], "model.n_layer: must be > 0, got 0"),
    ("[model]\nn_embd = 100\nn_head = 12\n", [], "model.n_embd (100) must be divisible by model.n_head (12)"),
    ("[model]\nn_kv_head = 5\n", [], "model.n_kv_head (5) must divide model.n_head (12)"),
    ("[model]\nnorm = 'batchnorm'\n", [], "model.norm: 'batchnorm' is not one of 'layernorm', 'rmsnorm'"),
    ("[model]\ndropout = 1.5\n", [], "model.dropout: must be in [0, 1), got 1.5"),
    ("[data]\nseq_len = 2048\n", [], "data.seq_len (2048) must not exceed model.block_size (1024)"),
    ("[optimizer]\nwarmup_steps = 10\n[training]\nmax_steps = 10\n", [],
     "optimizer.warmup_steps (10) must be < training.max_steps (10)"),
    ("[optimizer]\nbeta2 = 1.0\n", [], "optimizer.beta2: must be in [0, 1), got 1.0"),
    ("[training]\nglobal_batch_size = 10\nmicro_batch_size = 4\n", [],
     "training.global_batch_size (10) must be divisible by training.micro_batch_size (4)"),
    ("[training]\nkeep_last_k = -1\n", [], "training.keep_last_k: must be >= 0, got -1"),
    ("[data]\ncurriculum = [{tokens = 5}]\n", [], "data.curriculum[0].mix: must be a non-empty table"),
    ("[data]\ncurriculum = [{mix = {a = 1}}, {tokens = 5, mix = {a = 1}}]\n", [],
     "data.curriculum[0].tokens: only the last phase may omit its token budget"),
    ("[data]\ncurriculum = [{tokns = 5, mix = {a = 1}}]\n", [], "data.curriculum[0]: unknown key 'tokns'"),
    ("[data]\ncurriculum = [{mix = {a = -1}}]\n", [], "data.curriculum[0].mix.a: weight must be a number >= 0"),
    ("", ["--training.max_step", "5"], "command line: unknown field training.max_step (did you mean 'max_steps'?)"),
    ("", ["training.max_steps", "5"], "command line: expected --section.field value"),
    ("", ["--training.max_steps"], "command line: --training.max_steps needs a value"),
])
def test_errors_name_the_field(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value)


def test_malformed_toml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.toml: invalid TOML: .*line 3"):
        load_config(write(tmp_path, "[model]\nn_layer = 2\nn_head = = 3\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.toml: cannot read config file"):
        load_config("nope.toml")


def test_world_size_rule():
    cfg = load_config(None, ["--training.global_batch_size", "8", "--training.micro_batch_size", "4"])
    validate_world(cfg, 2)
    with pytest.raises(ConfigError, match=r"divisible by micro_batch_size x world size \(4 x 3 = 12\)"):
        validate_world(cfg, 3)


def test_parse_overrides_equals_form():
    assert parse_overrides(["--a.b=1", "--a.c", "x y"]) == {"a": {"b": 1, "c": "x y"}}


def test_diff_names_changed_fields():
    a = load_config(None).to_dict()
    b = load_config(None, ["--optimizer.lr", "0.001"]).to_dict()
    assert diff(a, b) == {"optimizer.lr": (6e-4, 0.001)}


def test_configuration_reference_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == markdown_reference(), (
        "docs/configuration.md is stale: run `python -m gpt_simple.config --markdown > docs/configuration.md`")


def test_yaml_config_equals_the_toml_one(tmp_path):
    yaml = pytest.importorskip("yaml")
    toml_cfg = load_config(ROOT / "configs" / "tiny.toml")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(toml_cfg.to_dict()))
    assert load_config(path).to_dict() == toml_cfg.to_dict()


@pytest.mark.parametrize("text, message", [
    ("model:\n  n_layer: [\n", "invalid YAML at line"),
    ("- 1\n- 2\n", "must be a mapping of sections"),
    ("model:\n  n_layers: 2\n", "unknown field model.n_layers (did you mean 'n_layer'?)"),
])
def test_yaml_errors_are_one_line(tmp_path, text, message):
    pytest.importorskip("yaml")
    path = tmp_path / "config.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)
