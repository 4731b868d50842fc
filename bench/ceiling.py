"""The MFU ceiling: the fastest fp32 matmul rate this CPU reaches, measured in the benchmark's own process, with
its threads, between the model's steps.

One large square product is not the CPU's ceiling. On the 2-core EPYC VM a 2048^3 product with 2 threads runs
at about the rate of one core (86-115 GFLOP/s) while 384^3-512^3 products reach 150-170: a model whose
matmuls are mid-sized then "exceeds the peak" (one run read 127 GFLOP/s against 94.5). So a sample is the
best over a few square sizes and the model's own largest product (its MLP: micro-batch tokens x n_embd ->
4 n_embd), each the fastest of `repeats`; the benchmark takes the highest sample of the run.
"""
from __future__ import annotations

from gpt_simple.flops import matmul_rate

SQUARES = (512, 1024, 2048)


def shapes(cfg, squares=SQUARES) -> list[tuple[int, int, int]]:
    """The products one ceiling sample times: the squares and the model's MLP product."""
    tokens = cfg.training.micro_batch_size * cfg.data.seq_len
    return [(s, s, s) for s in squares] + [(tokens, cfg.model.n_embd, 4 * cfg.model.n_embd)]


def sample(cfg, squares=SQUARES, repeats: int = 3) -> tuple[float, str]:
    """(the best FLOP/s over the shapes, the shape that reached it as 'MxKxN')."""
    rates = {f"{m}x{k}x{n}": matmul_rate(m, k, n, repeats) for m, k, n in shapes(cfg, squares)}
    best = max(rates, key=rates.get)
    return rates[best], best
