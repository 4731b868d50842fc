"""`gpt-simple validate --config FILE` and `train.py --dry-run`: will the data carry the run?

Checks the config and the shards (headers, tokenizer, vocabulary against the model), then predicts, phase by
phase and bucket by bucket, how many tokens the curriculum will read from each bucket over the run (from the
newest checkpoint on, if the run has one) against what each bucket holds, without reading a token. Prints one
table per phase; exit 0 when the data covers the run, 2 with one `error: ...` line when it does not (a bucket
that would run dry while data.allow_bucket_exhaustion is false, or data that runs out altogether) or when the
config or the data is unusable.

(A preflight check: "validation" everywhere else means the held-out split, eval.py.)
"""
from __future__ import annotations

import sys
from fractions import Fraction

from gpt_simple.config import Config, ConfigError
from gpt_simple.data.curriculum import DataError, Prediction, phase_sequences, predict
from gpt_simple.data.shards import ShardError

UNLIMITED = 10**18


class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.warnings: list[str] = []
        self.errors: list[str] = []

    def __call__(self, line: str = "") -> None:
        self.lines.append(line)


def _steps(first_seq: int, end_seq: int, g: int) -> str:
    """Steps (1-based) covering global sequences [first_seq, end_seq)."""
    if end_seq <= first_seq:
        return "no steps"
    a, b = first_seq // g + 1, -(-end_seq // g)
    inside = []
    if first_seq % g:
        inside.append(f"starts inside step {a}")
    if end_seq % g:
        inside.append(f"ends inside step {b}")
    return f"steps {a}-{b}" + (f" ({', '.join(inside)})" if inside else "")


def _pct(w: Fraction) -> str:
    return f"{float(w) * 100:.1f}%"


def _resume_state(cfg: Config, stream) -> tuple[dict, str | None]:
    """The data cursor the run would resume from (the trainer's rule and the stream's own compatibility
    check), or the initial one."""
    from gpt_simple.checkpoint import CheckpointError, read_meta, resume_candidates
    from gpt_simple.run_dir import RunDir
    found = resume_candidates(cfg.training.resume, RunDir(cfg.training.output_dir).checkpoints)
    if not found:
        return stream.initial_state(), None
    path = found[-1].path
    try:
        saved = read_meta(path)["data"]
    except (CheckpointError, KeyError) as e:
        raise DataError(f"{path}: no data cursor in the checkpoint ({e})") from None
    try:
        stream.load_state_dict(saved)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return stream.state_dict(), path.name


def _init_from_line(cfg: Config, resumed: str | None) -> str:
    """model.init_from: its config.json checked against [model] as the launch will check it (the weights are read
    then), unless the run resumes, which ignores it."""
    from pathlib import Path
    from gpt_simple.hf import HFError, config_differences
    from gpt_simple.hf_io import CONFIG, read_config
    path = cfg.model.init_from
    if resumed:
        return f"model.init_from {path!r}: ignored, the run resumes from {resumed}"
    try:
        config = read_config(Path(path))
    except HFError as e:
        raise ConfigError(str(e)) from None
    problem = config_differences(cfg.model, config, str(Path(path) / CONFIG))
    if problem:
        raise ConfigError(problem)
    return f"model.init_from {path}: {config['model_type']} layout; its {CONFIG} agrees with [model]"


def _mesh_line(cfg: Config) -> str:
    """The device mesh this launch would train on: the world size torchrun / srun gave this process (WORLD_SIZE),
    else the degree alone (validate usually runs outside the job); a degree that does not divide it is an error."""
    import os
    from gpt_simple.parallel import describe_mesh, mesh_shape
    degree = cfg.parallel.replicate_degree
    if "WORLD_SIZE" not in os.environ:
        shape = {1: "plain FSDP over every rank", "auto": "one replica per node (HSDP when on several nodes)"}
        return (f"parallel.replicate_degree = {degree!r}: "
                + shape.get(degree, f"mesh {degree}x(world size / {degree}) (replicate x shard; HSDP)"))
    world = int(os.environ["WORLD_SIZE"])
    return f"parallel.replicate_degree = {degree!r}: {describe_mesh(mesh_shape(degree, world))} on world size {world}"


def check(cfg: Config) -> Report:
    from gpt_simple.data import demo_buckets, open_data
    from gpt_simple.data.stream import DataStream
    from gpt_simple.eval import validation_buckets

    rep = Report()
    d, t = cfg.data, cfg.training
    if d.demo:
        from gpt_simple.data.prepare import ensure_demo
        ensure_demo(d.dir, demo_buckets(cfg))
    buckets = open_data(cfg)
    first = next(iter(buckets.values()))
    rep(_mesh_line(cfg))
    from gpt_simple.data import epochs
    stream = DataStream(buckets, d.curriculum, d.seq_len, d.seed, d.allow_bucket_exhaustion,
                        t.global_batch_size, t.micro_batch_size, 0, 1, prefetch=0, epochs=epochs(cfg),
                        amend=d.amend)
    need, g = d.seq_len + 1, t.global_batch_size
    rep(f"data.dir {d.dir}: {len(buckets)} bucket(s), tokenizer {first.tokenizer} (vocabulary {first.vocab_size}, "
        f"model.vocab_size {cfg.model.vocab_size})")
    splits = validation_buckets(cfg, list(stream.readers))
    rep(f"  {'bucket':<16}{'documents':>12}{'tokens':>16}{'sequences':>12}{'passes':>8}{'val docs':>10}"
        f"{'val tokens':>12}   (a sequence reads {need} tokens; each document adds 1 end-of-document token; tokens "
        f"and sequences count every allowed pass)")
    for name, r in stream.readers.items():
        val = splits.get(name)
        rep(f"  {name:<16}{r.bucket.n_docs:>12,}{r.total:>16,}{r.total // need:>12,}{r.passes:>8}"
            f"{val.n_docs if val else 0:>10,}{val.n_tokens + val.n_docs if val else 0:>12,}")
    _eval_line(rep, cfg, splits)

    state, resumed = _resume_state(cfg, stream)
    if cfg.model.init_from:
        rep(_init_from_line(cfg, resumed))
    done_steps = state["step"]
    remaining_steps = max(0, t.max_steps - done_steps)
    total = remaining_steps * g
    start = state["sequences"]
    rep()
    rep(f"run: {t.max_steps:,} steps x {g} sequences x {d.seq_len} tokens = {t.max_steps * g * d.seq_len:,} tokens "
        f"({t.max_steps * g * need:,} read from the buckets)")
    if resumed:
        rep(f"  resuming from {resumed} (step {done_steps}): {remaining_steps:,} steps left")
    _plan_lines(rep, stream, state)
    capacity = stream.capacity(state)

    # What the curriculum asks of each bucket (unlimited data), and what happens with the data there is.
    demand = predict(stream.phases, d.seq_len, {b: UNLIMITED for b in capacity}, total, False,
                     state["schedule"], start)
    actual = predict(stream.phases, d.seq_len, capacity, total, d.allow_bucket_exhaustion, state["schedule"], start)

    for i, phase in enumerate(stream.phases):
        n = phase_sequences(stream.phases, i, d.seq_len)
        if n is not None and n * d.seq_len != phase.tokens:
            rep.warnings.append(f"data.curriculum[{i}].tokens = {phase.tokens:,} is not a multiple of data.seq_len "
                                f"({d.seq_len}): the phase ends after {n:,} sequences = {n * d.seq_len:,} tokens")
        if n is None and phase.tokens and len(stream.phases) > 1:
            rep.warnings.append(f"data.curriculum[{i}].tokens = {phase.tokens:,} is ignored: the last phase runs "
                                f"until training.max_steps")

    _phase_tables(rep, stream, demand, capacity, g, need, d)
    reached = {p for p, _, _ in demand.phase_spans}
    for i in range(len(stream.phases)):
        if i not in reached and i > (state["schedule"]["phase"] if resumed else 0):
            rep.warnings.append(f"curriculum phase {i} is never reached: the run ends before it")
    unused = sorted(set(buckets) - {b for p in stream.phases for b in p.mix})
    if unused:
        rep(f"buckets in data.dir that no phase uses: {', '.join(unused)}")
    if not demand.exact:
        rep(f"(demand estimated to within one sequence per bucket and phase: {total:,} sequences are too many to "
            f"simulate one by one)")

    _passes(rep, stream, state, demand, need)
    _verdict(rep, actual, demand, capacity, g, start, cfg)
    return rep


def _plan_lines(rep: Report, stream, state: dict) -> None:
    """The data plan in force and its amendments; the one this launch would make (data.amend) is marked."""
    from gpt_simple.data.amend import history
    plan = state["plan"]
    if not plan["amendments"]:
        return
    rep(f"  data plan {plan['number']} (amended; the data below is predicted under it):")
    for line in history(plan):
        rep(f"    {line}" + (" (made by this launch: data.amend = true)"
                             if stream.amendment and line.startswith(f"amendment {plan['number']} ") else ""))


def _eval_line(rep: Report, cfg: Config, splits: dict) -> None:
    """What each evaluation reads; an evaluation asked for without any split is an error here, as in the run."""
    from gpt_simple.eval import no_split_message, validation_sequences
    e = cfg.eval
    if not (e.every_steps > 0 or e.at_end):
        rep(f"eval: off (eval.every_steps = 0, eval.at_end = false); {len(splits)} bucket(s) have a validation split")
        return
    if not splits:
        rep.errors.append(no_split_message(cfg))
        return
    when = " and ".join(([f"every {e.every_steps:,} steps"] if e.every_steps > 0 else []) +
                        (["at the end"] if e.at_end else []))
    reads = ", ".join(f"{name} {len(validation_sequences(b, cfg.data.seq_len, e.tokens)) * cfg.data.seq_len:,}"
                      for name, b in splits.items())
    rep(f"eval: {when}; tokens per evaluation (eval.tokens = {e.tokens:,} per bucket, capped by the split): {reads}")


def _passes(rep: Report, stream, state: dict, demand: Prediction, need: int) -> None:
    """How many passes over each bucket the planned tokens need, against the limit."""
    used = stream.passes_used(state)
    totals: dict[str, int] = {}
    for row in demand.rows:
        totals[row.bucket] = totals.get(row.bucket, 0) + row.sequences
    parts = []
    for name, r in stream.readers.items():
        if not r.per_pass or name not in totals:
            continue
        passes = used[name] + totals[name] * need / r.per_pass
        parts.append(f"{name} {passes:.2f} of {r.passes} allowed" + (" (more than allowed)" if passes > r.passes
                                                                     else ""))
    if parts:
        rep(f"passes needed by the run (data.max_epochs / data.epochs): {', '.join(parts)}")


def _phase_tables(rep: Report, stream, demand: Prediction, capacity: dict, g: int, need: int, d) -> None:
    left = dict(capacity)
    for phase, first_seq, end_seq in demand.phase_spans:
        mix = "by bucket size" if not d.curriculum else "data.curriculum[%d]" % phase
        budget = stream.phases[phase].tokens
        rep()
        rep(f"phase {phase}: {_steps(first_seq, end_seq, g)}, {end_seq - first_seq:,} sequences "
            f"= {(end_seq - first_seq) * d.seq_len:,} tokens" +
            (f" of its {budget:,}" if budget and phase < len(stream.phases) - 1 else "") + f"; mix {mix}")
        rep(f"  {'bucket':<16}{'weight':>8}{'sequences':>12}{'tokens read':>15}{'available':>15}{'left after':>15}"
            f"  status")
        for row in (r for r in demand.rows if r.phase == phase):
            reads = row.sequences * need
            has = left[row.bucket] * need
            status = "ok" if row.sequences <= left[row.bucket] else \
                f"SHORT by {(row.sequences - left[row.bucket]) * need:,} tokens"
            rep(f"  {row.bucket:<16}{_pct(row.weight):>8}{row.sequences:>12,}{reads:>15,}{has:>15,}"
                f"{max(0, has - reads):>15,}  {status}")
            left[row.bucket] = max(0, left[row.bucket] - row.sequences)


def _verdict(rep: Report, actual: Prediction, demand: Prediction, capacity: dict, g: int, start: int,
             cfg: Config) -> None:
    d, t = cfg.data, cfg.training
    need = d.seq_len + 1
    for bucket, phase, index in actual.drops:
        rep.warnings.append(f"bucket {bucket!r} runs dry in phase {phase} at step {index // g + 1}: it will be "
                            f"dropped and the other buckets renormalised (data.allow_bucket_exhaustion = true)")
    rep()
    totals = {}
    for row in demand.rows:
        totals[row.bucket] = totals.get(row.bucket, 0) + row.sequences
    used = sum(totals.values())
    rep(f"demand: {used * need:,} tokens from {len(totals)} bucket(s) holding {sum(capacity[b] for b in totals) * need:,}"
        f" (whole sequences); " + ", ".join(f"{b} {totals[b] * need:,}/{capacity[b] * need:,}" for b in sorted(totals)))
    if actual.halt is None:
        extra = f", dropping {', '.join(b for b, _, _ in actual.drops)} on the way" if actual.drops else ""
        rep(f"ok: the data covers the run to step {t.max_steps:,}{extra}")
        return
    e, at = actual.halt, actual.halt_at
    full_steps = at // g
    if getattr(e, "final", False):
        rep.errors.append(f"the data runs out at step {full_steps + 1}: {e}; it holds {full_steps:,} full steps of "
                          f"training.max_steps = {t.max_steps:,}")
        return
    short = (totals.get(e.bucket, 0) - capacity[e.bucket]) * need
    rep.errors.append(f"bucket {e.bucket!r} runs dry in phase {e.phase} at step {full_steps + 1} "
                      f"(the run needs {short:,} more tokens from it): the run would HALT there; set "
                      f"data.allow_bucket_exhaustion = true to drop it and go on with "
                      f"{', '.join(e.remaining) or 'no other bucket'}, add data to it, or lower "
                      f"training.max_steps to {full_steps:,}")


def validate_main(cfg: Config) -> int:
    from gpt_simple.data.prepare import PrepareError
    try:
        rep = check(cfg)
    except (ConfigError, DataError, ShardError, PrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(rep.lines), flush=True)
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if rep.errors:
        print(f"error: {rep.errors[0]}", file=sys.stderr)
        return 2
    return 0
