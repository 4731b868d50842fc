"""Weights & Biases as one more metric sink of the journal (rank 0, optional: `pip install 'gpt-simple[wandb]'`, `[wandb]`).

One W&B run per training run. Its id is drawn once and kept in output_dir/wandb.json, so every job of a chain
resumes the same W&B run (`resume="allow"`: "must" would refuse an online resume of a run whose first job was
offline and never synced), and a copied run folder goes on logging to it. A checkpoint alone does not carry the
id: a new output_dir seeded from another run's checkpoint is another run.

Replayed steps. After a SIGKILL the next job resumes from an older checkpoint and trains the steps after it
again, bit for bit. W&B cannot take those points back here (rewinding with `resume_from` needs the server and
refuses offline runs; an offline resume does not know the last step the run holds), so the sink never sends a
point at a step <= the highest step it already sent for that kind of point (train, eval, each checkpoint
timing). That high-water mark is written to wandb.json before the point is sent: a kill between the two loses
that point rather than doubling it. The other way round, W&B's buffer dies with a job killed hard, and with it
points the mark counts as sent: offline, the next job reads what the killed job's transaction log holds,
lowers the mark to it and sends the rest again (up to the checkpoint from metrics.jsonl and the save events,
after it as it trains those steps again). Online, the last second's points can be missing; never twice.
Delete wandb.json to start a new W&B run (e.g. after deliberately resuming from an older checkpoint with
another config, when the replayed steps are no longer the same).

The wandb package is imported only when the sink opens; with `wandb.enabled = false` nothing here runs. The
sink never stops training: a W&B failure is one warning, and training goes on with the other sinks.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import string
import struct
from pathlib import Path

from gpt_simple.config import Config, ConfigError
from gpt_simple.journal.events import Save
from gpt_simple.run_dir import RunDir, read_jsonl, write_json_atomic
from gpt_simple.runtime import log

# Run states W&B shows for a finished process: exit code 0 reads "finished", anything else "failed".
FAILED_STATUSES = ("ERROR", "CRASHED")
FLUSH_INTERVAL_S = 1.0


def require_wandb(cfg: Config) -> None:
    """Every rank checks before set-up, so that a missing package is one line on every rank, not a hang of the
    others while rank 0 fails."""
    if not cfg.wandb.enabled:
        return
    try:
        found = importlib.util.find_spec("wandb") is not None
    except ValueError:  # a module set to None in sys.modules: `import wandb` would fail
        found = False
    if not found:
        raise ConfigError("wandb.enabled = true but the wandb package is not installed: "
                          "pip install 'gpt-simple[wandb]', or pass --wandb.enabled false")


def new_run_id() -> str:
    """Eight lowercase letters and digits, as W&B draws its own ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def read_record(run_dir: RunDir) -> dict:
    """output_dir/wandb.json: {"id": ..., "logged": {kind: highest step sent}}, or {} (none yet, or unreadable:
    then a new W&B run starts, which is better than refusing to train)."""
    try:
        record = json.loads(run_dir.wandb.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and isinstance(record.get("id"), str) else {}


class WandbSink:
    def __init__(self, cfg: Config, run_dir: RunDir):
        self.cfg, self.run_dir = cfg, run_dir
        self.run = None
        self.run_id: str | None = None
        self.logged: dict[str, int] = {}  # the highest step sent, per kind
        self.finished: dict[str, int] = {}  # `logged` when a job last finished its W&B run: all of it written

    def open(self, resume_step: int) -> None:
        w = self.cfg.wandb
        record = read_record(self.run_dir)
        self.run_id = record.get("id") or new_run_id()
        self.logged = {k: int(v) for k, v in (record.get("logged") or {}).items()}
        self.finished = {k: int(v) for k, v in (record.get("finished") or {}).items()}
        self._save()  # the id is the run's before W&B hears of it: a job killed in wandb.init resumes it too
        try:
            import wandb
            self.run = wandb.init(
                id=self.run_id, resume="allow", project=w.project, entity=w.entity or None,
                name=w.name or self.run_dir.path.resolve().name, group=w.group or None, tags=w.tags or None,
                notes=w.notes or None, mode=None if w.mode == "auto" else w.mode,
                dir=w.dir or (None if os.environ.get("WANDB_DIR") else str(self.run_dir.path)),
                settings=settings(wandb))
            # Several kinds of rows share one training step (train, eval, checkpoint timings): the x-axis is the
            # training step, not W&B's row counter, and each row is committed when logged.
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
            # a resumed job may change fields (max_steps, eval cadence): the newest values are the run's
            self.run.config.update(self.cfg.to_dict(), allow_val_change=True)
            self.run.summary["status"] = "RUNNING"
        except Exception as e:  # noqa: BLE001 - W&B is an observer: it must never stop a run
            self._disable("could not start the W&B run", e)
            return
        if self._lower_to_durable():
            self._resend(resume_step)
        log.info(f"W&B: run {self.run_id} ({self.run.url or 'offline: ' + str(self.run.dir)})")

    def log(self, kind: str, step: int, values: dict) -> None:
        """Send one row at `step`, unless a row of this kind was sent at this step or later (a replayed step)."""
        if self.run is None or step <= self.logged.get(kind, -1):
            return
        self.logged[kind] = step
        try:
            self._save()
            self.run.log({"step": step, **values})
        except Exception as e:  # noqa: BLE001
            self._disable("logging failed", e)

    # the journal's sink interface (gpt_simple/journal/sinks.py)
    def train(self, record: dict) -> None:
        self.log("train", record["step"], scalars("train", record))

    def eval(self, record: dict) -> None:
        self.log("eval", record["step"], eval_scalars(record))

    def scalar(self, name: str, value: float, step: int) -> None:
        self.log(name, step, {name: value})

    def close(self) -> None:
        """The run's status (run_state.json, written by now) as the W&B run's summary and final state."""
        if self.run is None:
            return
        from gpt_simple.run_state import read_state
        try:
            try:
                state = read_state(self.run_dir.path)
            except (OSError, ValueError):
                state = {}
            status = state.get("status", "UNKNOWN")
            self.run.summary.update({"status": status, "status_reason": state.get("reason"),
                                     "step": state.get("step"), "tokens": state.get("tokens")})
            self.run.finish(exit_code=1 if status in FAILED_STATUSES else 0)
            self.finished = dict(self.logged)
            self._save()
        except Exception as e:  # noqa: BLE001
            log.warning(f"W&B: could not finish the run ({type(e).__name__}: {e})")
        self.run = None

    def _lower_to_durable(self) -> bool:
        """Offline, a job killed hard lost the points still in W&B's buffer, though the high-water mark counts
        them as sent. What W&B holds is what the last finished job sent plus what the transaction logs of the
        jobs since (beside this job's) hold; lower the mark to that. Online, the sent mark stands (the last
        seconds before a kill may be missing there, never doubled). True when lowered."""
        if self.logged == self.finished:
            return False
        try:
            own = Path(self.run.dir).parent
            held = durable_steps([p for p in own.parent.glob(f"offline-run-*-{self.run_id}") if p != own],
                                 self.run_id)
        except Exception as e:  # noqa: BLE001 - the high-water mark stands: no duplicates, maybe a gap
            log.warning(f"W&B: could not read this run's earlier offline logs ({type(e).__name__}: {e})")
            return False
        if held is None:
            return False
        lowered = {k: min(v, max(held.get(k, -1), self.finished.get(k, -1))) for k, v in self.logged.items()}
        if lowered == self.logged:
            return False
        lost = ", ".join(f"{k} {lowered[k] + 1}..{v}" for k, v in self.logged.items() if lowered[k] != v)
        log.info(f"W&B: the last job was killed before W&B wrote its points ({lost}): sending them again")
        self.logged = lowered
        self._save()
        return True

    def _resend(self, resume_step: int) -> None:
        """The lost points up to the checkpoint come from the run's own records (metrics.jsonl, the save events);
        this job trains the steps after it again and sends those as it goes."""
        for record in read_jsonl(self.run_dir.metrics):
            if record.get("step", 0) <= resume_step:
                if record.get("type") == "eval":
                    self.log("eval", record["step"], eval_scalars(record))
                else:
                    self.log("train", record["step"], scalars("train", record))
        for event in read_jsonl(self.run_dir.events):
            if event.get("event") == Save.kind and event.get("step", 0) <= resume_step:
                for name in ("blocking_s", "total_s"):
                    if name in event:
                        self.log(f"checkpoint/{name}", event["step"], {f"checkpoint/{name}": event[name]})

    def _save(self) -> None:
        write_json_atomic(self.run_dir.wandb, {"id": self.run_id, "logged": self.logged, "finished": self.finished})

    def _disable(self, what: str, e: Exception) -> None:
        first = (str(e).strip().splitlines() or [""])[0]
        log.warning(f"W&B: {what} ({type(e).__name__}: {first}); training goes on without W&B "
                    f"(metrics.jsonl and TensorBoard have every record)")
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass


# -- W&B's offline transaction log (what `wandb sync` uploads): LevelDB's log format, W&B's protobuf records ---
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def transaction_log(path: Path):
    """The records (wandb.proto.wandb_internal_pb2.Record) of a .wandb file, up to a tail torn by a kill."""
    from wandb.proto import wandb_internal_pb2
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, parts = 7, b""  # the file header: ":W&B", a 2-byte magic, a version byte
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # the zero-filled rest of a block
            pos += left
            continue
        if pos + 7 + length > len(data):
            return
        body, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = body if kind in (FULL, FIRST) else parts + body
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(parts)
            except Exception:  # noqa: BLE001 - a torn last record
                return
            yield record


def history_rows(path: Path) -> list[dict]:
    rows = []
    for record in transaction_log(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def row_kinds(row: dict) -> set[str]:
    """The high-water-mark kinds of a row this sink sent: 'train', 'eval', or a checkpoint timing's name."""
    kinds = set()
    for key in row:
        prefix = key.split("/", 1)[0]
        if prefix in ("train", "eval"):
            kinds.add(prefix)
        elif "/" in key:
            kinds.add(key)
    return kinds


def durable_steps(folders: list[Path], run_id: str) -> dict[str, int] | None:
    """The highest training step of each kind in these offline runs' transaction logs; None without any."""
    logs = [f / f"run-{run_id}.wandb" for f in folders if (f / f"run-{run_id}.wandb").exists()]
    if not logs:
        return None
    held: dict[str, int] = {}
    for path in logs:
        for row in history_rows(path):
            if "step" in row:
                for kind in row_kinds(row):
                    held[kind] = max(held.get(kind, -1), int(row["step"]))
    return held


def settings(wandb):
    options = {"console": "off"}  # the trainer's output goes to its log files; W&B would keep a second copy
    if "x_transaction_log_flush_interval" in getattr(wandb.Settings, "model_fields", {}):
        # W&B buffers its local transaction log (offline: the only copy) for 15 s by default, and a SIGKILL loses
        # the buffer: points the high-water mark counts as sent. 1 s bounds that loss to the last second.
        options["x_transaction_log_flush_interval"] = FLUSH_INTERVAL_S
    return wandb.Settings(**options)


def eval_scalars(record: dict) -> dict:
    """An evaluation record under TensorBoard's names (eval/loss, eval/ppl, eval/loss_BUCKET)."""
    return {"eval/loss": record["loss"], "eval/ppl": record["ppl"], "eval/tokens": record["tokens"],
            **{f"eval/loss_{b}": v for b, v in record["loss_by_bucket"].items()}}


def scalars(prefix: str, record: dict) -> dict:
    """The numbers of a record under the names TensorBoard gives them (train/loss, train/mfu ...)."""
    return {f"{prefix}/{key}": value for key, value in record.items() if key != "step" and _number(value)}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
