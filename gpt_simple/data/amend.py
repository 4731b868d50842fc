"""The data plan a checkpoint was taken under, and amending it at a resume (data.amend).

The plan is what the data stream's cursor means: the curriculum's phases as resolved (budgets and mixes), every
bucket's shards (name, documents, tokens) in file-name order, each bucket's shard generations (layout.py), its
number (0, then one more per accepted amendment) and the amendments so far. It is saved with the cursor, so a
resume compares it with the config and data.dir of the new launch:

- the same plan: the stream continues;
- a change that rewrites history (a completed phase, a phase in progress cut below what it has read, a phase in
  progress or completed removed, a bucket or shard removed, a shard rewritten or sorted in before an existing
  one) is refused with one line naming the phase or the shard, amend or not;
- any other change (mixes and budgets of the current and later phases, phases added, buckets added, shards
  appended to a bucket) is refused with one line showing the difference unless data.amend is true, and then
  takes effect at the checkpoint's step boundary: the plan gets the next number and the amendment is recorded
  in it (and, by the trainer, as a plan_amended event), so later resumes know the history and do not ask again.

From the amendment on the new plan holds as if it had started there: when the current phase's active weights
change, its schedule restarts its lag accounting (as after a dropped bucket), so the realised mix is within one
sequence of the new weights at every later step. A bucket that was dropped as exhausted and got new documents
joins the mix again. Appended shards are read after the documents of the pass in progress (layout.py).
"""
from __future__ import annotations

import copy

from gpt_simple.data.curriculum import DataError, Phase, Schedule, exact_weights, phase_sequences
from gpt_simple.data.layout import initial_generations, pass_at, runs



def current_plan(stream) -> dict:
    """The plan of the stream's config and data, as a fresh run starts it (number 0, no amendments)."""
    return {"number": 0, "phases": [{"tokens": p.tokens, "mix": dict(p.mix)} for p in stream.phases],
            "shards": {name: [[s.idx_path.name, s.header.n_docs, s.header.n_tokens] for s in r.bucket.shards]
                       for name, r in sorted(stream.readers.items())},
            "generations": {name: initial_generations(len(r.bucket.shards))
                            for name, r in sorted(stream.readers.items())},
            "amendments": []}


def adopt(stream, state: dict) -> dict:
    """A checkpoint from before plans were saved: its data must be the same (it does not say which curriculum it
    ran, so that is taken as the config's); it continues under the current plan, numbered 0."""
    saved, now = state.get("fingerprint"), stream.fingerprint()
    if saved != now:
        raise DataError(f"the data changed since this checkpoint (buckets [docs, tokens] then {saved}, now {now}); "
                        f"resuming would not continue the same data stream")
    return {**state, "plan": current_plan(stream)}


def reconcile(stream, state: dict, amend: bool) -> tuple[dict, dict | None]:
    """The saved state carried over to the stream's plan, and the amendment accepted (None: nothing changed).
    Raises DataError (one line) for a change that rewrites history, or any change without `amend`."""
    saved, now = state["plan"], current_plan(stream)
    changes = _bucket_changes(stream, saved["shards"], now["shards"]) + _phase_changes(saved["phases"], now["phases"])
    if not changes:
        return state, None
    old = Schedule(_phases(saved["phases"]), stream.seq_len)
    old.load_state_dict(state["schedule"])
    old.settle()
    _check_history(old, stream.phases, stream.seq_len)
    if not amend:
        raise DataError(f"the data plan differs from the checkpoint's (step {state['step']}): {'; '.join(changes)}; "
                        f"to amend the plan from there on, resume with --data.amend true (docs/data.md, 'Amending "
                        f"the plan'), or restore the checkpoint's plan")
    grown = [b for b in saved["shards"] if len(now["shards"][b]) > len(saved["shards"][b])]
    generations = copy.deepcopy(saved["generations"])
    cursors = copy.deepcopy(state["cursors"])
    for b in grown:
        shards, r = saved["shards"][b], stream.readers[b]
        layout = runs([s[1] for s in shards], [s[2] for s in shards], generations[b], r.passes)
        generations[b].append([len(now["shards"][b]), pass_at(layout, cursors[b][0], r.passes)])
    for b in sorted(set(now["shards"]) - set(saved["shards"])):
        generations[b], cursors[b] = now["generations"][b], [0, 0]
    schedule = _carry_schedule(old, stream.phases, stream.seq_len, grown)
    record = {"number": saved["number"] + 1, "step": state["step"], "changes": changes,
              "old": _summary(saved), "new": _summary(now)}
    plan = {**now, "number": record["number"], "generations": generations,
            "amendments": [*saved["amendments"], record]}
    return {**state, "plan": plan, "schedule": schedule, "cursors": cursors, "fingerprint": stream.fingerprint()}, \
        record


def _phases(raw: list[dict]) -> list[Phase]:
    return [Phase(int(p["tokens"]), dict(p["mix"])) for p in raw]


def _canon(phases: list[dict], i: int) -> tuple:
    """What phase i means: its budget (none for the last phase: it runs to the end) and its exact weights."""
    p = phases[i]
    return (int(p["tokens"]) if i < len(phases) - 1 else 0), exact_weights(p["mix"])


def describe(phases: list[dict], i: int) -> str:
    tokens, _ = _canon(phases, i)
    mix = ", ".join(f"{b} = {w:g}" for b, w in sorted(phases[i]["mix"].items()))
    return f"{{{mix}}} " + (f"for {tokens:,} tokens" if tokens else "to the end")


def _phase_changes(old: list[dict], new: list[dict]) -> list[str]:
    changes = []
    for i in range(max(len(old), len(new))):
        if i >= len(new):
            changes.append(f"phase {i} removed")
        elif i >= len(old):
            changes.append(f"phase {i} added: {describe(new, i)}")
        elif _canon(old, i) != _canon(new, i):
            changes.append(f"phase {i}: {describe(old, i)} -> {describe(new, i)}")
    return changes


def _check_history(old: Schedule, new: list[Phase], seq_len: int) -> None:
    """Refuse a curriculum that changes what the run has already read: completed phases, or the current phase
    removed or cut below the sequences it has supplied."""
    raw_old = [{"tokens": p.tokens, "mix": p.mix} for p in old.phases]
    raw_new = [{"tokens": p.tokens, "mix": p.mix} for p in new]
    for i in range(old.phase):
        if i >= len(new) or _canon(raw_old, i) != _canon(raw_new, i):
            raise DataError(f"data.curriculum[{i}]: phase {i} is complete ({describe(raw_old, i)}); a completed "
                            f"phase is history and cannot be amended (change the current phase {old.phase} or "
                            f"later ones)")
    if old.phase >= len(new):
        raise DataError(f"data.curriculum: phase {old.phase} is in progress, the amended curriculum has "
                        f"{len(new)} phase(s); a phase in progress cannot be removed (end it with a budget)")
    limit = phase_sequences(new, old.phase, seq_len)
    if limit is not None and limit < old.phase_sequences:
        raise DataError(f"data.curriculum[{old.phase}].tokens = {new[old.phase].tokens:,}: phase {old.phase} has "
                        f"already read {old.phase_sequences * seq_len:,} tokens; its budget cannot end before "
                        f"what it has read")


def _carry_schedule(old: Schedule, phases: list[Phase], seq_len: int, grown: list[str]) -> dict:
    """The schedule state under the new phases; its lag accounting restarts when the active weights change."""
    new = Schedule(phases, seq_len)
    new.load_state_dict(old.state_dict())
    new.dropped = [b for b in new.dropped if b not in grown]  # new documents: it can supply again
    if new.active_weights() != old.active_weights():
        new.restart()
    return new.state_dict()


def _bucket_changes(stream, saved: dict, now: dict) -> list[str]:
    changes = []
    for b in sorted(saved):
        if b not in now:
            raise DataError(f"data.dir: bucket {b!r} is gone since the checkpoint; a bucket the run has read from "
                            f"cannot be removed (restore {b}/)")
        folder = stream.readers[b].bucket.folder
        old, new = saved[b], now[b]
        for i, shard in enumerate(old):
            if i < len(new) and new[i][0] == shard[0]:
                if list(new[i]) != list(shard):
                    raise DataError(f"{folder / shard[0]}: rewritten since the checkpoint ({shard[1]} documents, "
                                    f"{shard[2]} tokens then; {new[i][1]}, {new[i][2]} now); a shard a run has "
                                    f"read cannot be rewritten (restore it, or append new shards)")
                continue
            if shard[0] not in [s[0] for s in new]:
                raise DataError(f"{folder / shard[0]}: removed since the checkpoint; a shard a run has read cannot "
                                f"be removed (restore it)")
            raise DataError(f"{folder / new[i][0]}: sorts before {shard[0]}, which the checkpoint already has; "
                            f"appended shards must come after the existing ones in file-name order (rename it)")
        if len(new) > len(old):
            added = new[len(old):]
            changes.append(f"bucket {b!r}: {len(added)} shard(s) appended ({sum(s[1] for s in added):,} documents)")
    for b in sorted(set(now) - set(saved)):
        changes.append(f"bucket {b!r} added ({sum(s[1] for s in now[b]):,} documents)")
    return changes


def _summary(plan: dict) -> dict:
    """A plan as an event shows it: the phases and each bucket's shards, documents and tokens."""
    return {"phases": plan["phases"],
            "buckets": {b: {"shards": len(s), "documents": sum(x[1] for x in s), "tokens": sum(x[2] for x in s)}
                        for b, s in plan["shards"].items()}}


def history(plan: dict | None) -> list[str]:
    """One line per amendment of a plan, oldest first."""
    return [f"amendment {a['number']} after step {a['step']}: {'; '.join(a['changes'])}"
            for a in (plan or {}).get("amendments", [])]
