"""FSDP against HSDP on 4 gloo ranks on one CPU: the trainer under `torchrun --nproc_per_node 4` with
parallel.replicate_degree 1 (a 1x4 mesh, plain FSDP) and 2 (a 2x2 mesh: 2 replicas, each sharded over 2
ranks), on configs/bench.toml, same global batch.

    python bench/hsdp.py [--quick | --smoke] [--json PATH]

Step time: both runs are started once and take turns step by step (bench/gate.py, as bench/fsdp2.py does); a
step's figure is the run's own tokens_per_s; the ratio is the median over rounds of HSDP over FSDP tokens/s.
On one machine every "link" is loopback, so this says what HSDP's extra all-reduce costs in compute and
copies, not what it saves on a network.

Bytes communicated per step are measured, not modelled from the parameter count: in each run the second step
runs with torch.distributed's all_gather_single, reduce_scatter_single and all_reduce (the collectives FSDP2
and the trainer call) wrapped to record each call's payload and group. A call's bytes sent by one rank are
those of the ring algorithm over its group of n ranks: (n-1)/n of the gathered or scattered buffer, 2(n-1)/n
of an all-reduced one. "Inter-node" counts the calls whose group spans both halves of the ranks, as if ranks
0-1 and 2-3 were two nodes of 2 (torchrun numbers ranks node by node): that is what HSDP keeps off the slow
network.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import Mode, main_for  # noqa: E402
from bench import gate  # noqa: E402
from bench.gate import GatedRun  # noqa: E402
from bench.launch import scratch_dir  # noqa: E402
from bench.stats import median, spread  # noqa: E402
from bench.table import row  # noqa: E402

RANKS = 4
PER_NODE = 2  # the pretend node size for the inter-node figure
MESHES = {"FSDP 1x4": 1, "HSDP 2x2": 2}
MB = 2**20


def overrides(mode: Mode, degree: int) -> list[str]:
    # the smoke model's micro-batch of 4 on 4 ranks would overshoot its global batch of 8
    return [*mode.overrides(), *(["--training.micro_batch_size", "2"] if mode.smoke else []),
            "--parallel.replicate_degree", str(degree)]


class Counter:
    """Wraps the collectives FSDP2 and the trainer use; adds up one rank's bytes sent per call (ring model)."""
    OPS = ("all_gather_single", "reduce_scatter_single", "all_reduce")

    def __init__(self):
        import torch.distributed as dist
        self.dist, self.on = dist, False
        self.sent = {"all": 0.0, "inter-node": 0.0}
        self.calls = 0
        for name in self.OPS:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.on:
                self._count(name, args, kwargs)
            return fn(*args, **kwargs)
        return counted

    def _count(self, name, args, kwargs) -> None:
        group = kwargs.get("group")
        ranks = self.dist.get_process_group_ranks(group) if group is not None else list(range(
            self.dist.get_world_size()))
        n = len(ranks)
        if n < 2:
            return
        if name == "all_reduce":
            tensor, factor = args[0] if args else kwargs["tensor"], 2 * (n - 1) / n
        elif name == "all_gather_single":
            tensor, factor = args[0] if args else kwargs["output"], (n - 1) / n
        else:
            tensor, factor = kwargs.get("input", args[1] if len(args) > 1 else None), (n - 1) / n
        nbytes = tensor.numel() * tensor.element_size() * factor
        self.calls += 1
        self.sent["all"] += nbytes
        if len({r // PER_NODE for r in ranks}) > 1:
            self.sent["inter-node"] += nbytes


def count_worker(argv: list[str]) -> int:
    """bench/gate.py's worker that also counts one step's collectives: step 1 is warm-up (lazy initialisation),
    step 2 is counted (run() advances every run at least two steps); rank 0 writes the counts to --count."""
    p = argparse.ArgumentParser()
    p.add_argument("--count", required=True)
    a, rest = p.parse_known_args(argv)
    counter, written = Counter(), Path(a.count)

    def at_boundary(trainer, k: int) -> None:
        counter.on = k == 1
        if k == 2 and trainer.dist.is_main:
            written.write_text(json.dumps({**counter.sent, "calls": counter.calls,
                                           "mesh": list(trainer.dist.mesh_shape)}))

    return gate.worker(rest, at_boundary)


def run(mode: Mode = Mode()) -> list[dict]:
    rounds, warmup = mode.pick(6, 3, 1), mode.pick(2, 2, 1)
    assert warmup + rounds >= 2, "count_worker counts step 2"
    root = scratch_dir("hsdp")
    runs = {name: GatedRun(root / f"run-{degree}", overrides(mode, degree), RANKS, 1, f"torchrun x4 {name}",
                           script=Path(__file__).resolve(), args=["--count", str(root / f"count-{degree}.json")])
            for name, degree in MESHES.items()}
    got: dict[str, list[float]] = {name: [] for name in MESHES}
    try:
        for g in runs.values():
            g.start()
        for _ in range(warmup):
            for g in runs.values():
                g.advance()
        for r in range(rounds):
            for name in (list(MESHES) if r % 2 == 0 else list(MESHES)[::-1]):
                got[name].append(runs[name].advance()["tokens_per_s"])
    finally:
        for g in runs.values():
            g.stop()
    counts = {name: json.loads((root / f"count-{degree}.json").read_text()) for name, degree in MESHES.items()}
    fsdp, hsdp = MESHES
    paired = [h / f for h, f in zip(got[hsdp], got[fsdp])]
    rows = [row(f"{hsdp} vs {fsdp}, 4 gloo ranks on one CPU: step throughput", median(got[hsdp]),
                median(got[fsdp]), median(paired), "report", unit="tok/s",
                note=f"taking turns step by step, {rounds} rounds after {warmup} of warm-up; per-round ratio "
                     f"{spread(paired)}; HSDP {spread(got[hsdp], 'tok/s')}, FSDP {spread(got[fsdp], 'tok/s')}")]
    for what in ("all", "inter-node"):
        h, f = counts[hsdp][what] / MB, counts[fsdp][what] / MB
        rows.append(row(f"{hsdp} vs {fsdp}: MiB sent per rank per step ({what})", h, f,
                        h / f if f else None, "report", unit="MiB",
                        note=f"measured collective payloads, ring model; {counts[hsdp]['calls']} vs "
                             f"{counts[fsdp]['calls']} collective calls per step"
                             + ("; inter-node: groups spanning ranks 0-1 and 2-3 as two nodes" if what != "all"
                                else "")))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--count"]:
        from gpt_simple.cli import exit_now
        exit_now(count_worker(sys.argv[1:]))  # as train.py ends: no interpreter teardown per rank
    sys.exit(main_for(run, __doc__.splitlines()[0]))
