"""Model shapes, parameter counts, variants, FLOPs accounting, and the LR schedule."""
import math

import pytest
import torch

from gpt_simple.config import ModelConfig, OptimizerConfig, load_config
from gpt_simple.model import GPT, count_params, flops_per_token
from gpt_simple.optim import LRSchedule, build_optimizer


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=128, block_size=32, n_layer=2, n_head=4, n_embd=64)
    base.update(kw)
    return ModelConfig(**base)


def test_gpt2_124m_parameter_count():
    cfg = load_config(None).model  # defaults are GPT-2 small with the padded vocabulary
    model = GPT(cfg)
    # 124M with vocab 50257; the padded 50304 adds 47 x 768 rows.
    assert count_params(model, cfg) == 124_439_808 + 47 * 768


@pytest.mark.parametrize("variant", [
    {}, {"pos_embedding": "rope"}, {"norm": "rmsnorm"}, {"mlp": "swiglu"}, {"n_kv_head": 2},
    {"bias": False}, {"tie_embeddings": False}, {"dropout": 0.1},
    {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 1, "bias": False},
])
def test_forward_shapes_and_loss(variant):
    torch.manual_seed(0)
    cfg = small(**variant)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 16))
    targets = torch.randint(0, cfg.vocab_size, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, cfg.vocab_size)
    # At init the prediction is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causality():
    torch.manual_seed(0)
    cfg = small(pos_embedding="rope")
    model = GPT(cfg).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % cfg.vocab_size
    assert torch.equal(model(a)[0, :10], model(b)[0, :10])
    assert not torch.equal(model(a)[0, 10:], model(b)[0, 10:])


def test_weight_tying_counts_once():
    tied, untied = GPT(small()), GPT(small(tie_embeddings=False))
    assert tied.head.weight is tied.tok_emb.weight
    assert count_params(untied, small()) - count_params(tied, small()) == 128 * 64


def test_gqa_has_fewer_kv_parameters():
    assert count_params(GPT(small(n_kv_head=1)), small()) < count_params(GPT(small()), small())


def test_init_is_seeded():
    torch.manual_seed(3)
    a = GPT(small()).state_dict()
    torch.manual_seed(3)
    b = GPT(small()).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_flops_per_token_formula():
    cfg = load_config(None).model
    n = count_params(GPT(cfg), cfg)
    expected = 6 * (n - cfg.block_size * cfg.n_embd) + 12 * cfg.n_layer * cfg.n_embd * 1024
    assert flops_per_token(cfg, n, 1024) == expected
    assert 0.8e9 < expected < 0.9e9  # ~6 x 124M + attention, the figure MFU reports of GPT-2 use


def test_no_weight_decay_on_vectors_and_embeddings():
    model = GPT(small(tie_embeddings=False))
    opt = build_optimizer(model, OptimizerConfig(), torch.device("cpu"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith("weight") and "norm" not in n and "emb" not in n for n in names)
    assert "head.weight" in names
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_lr_schedule_warmup_cosine_floor():
    cfg = OptimizerConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    s = LRSchedule(cfg, max_steps=110)
    assert s(1) == pytest.approx(0.1)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)  # half-way down the cosine
    assert s(110) == pytest.approx(0.1)
    assert s(500) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))


def test_lr_schedule_fixed_decay_ignores_max_steps():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=2, decay_steps=20)
    assert [LRSchedule(cfg, 30)(i) for i in range(30)] == [LRSchedule(cfg, 100)(i) for i in range(30)]
