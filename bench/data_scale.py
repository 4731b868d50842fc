"""Data at scale (a benchmark, not a test): the on-disk bucket order (gpt_simple/data/index.py) against the
in-memory one it replaced, on synthetic buckets of 1M, 10M and 100M tiny documents.

    python bench/data_scale.py [--sizes 1e6,1e7,1e8] [--dir /tmp/gpt-simple-data-scale] [--old-max 1e7]

Per size it writes one shard directly with numpy (documents of 1-15 tokens, 8 on average), then, each in a
fresh subprocess:
  build     the one-off index build (open_order of pass 0, single process)
  start     stream start-up of a rank with the index on disk (warm page cache): open_buckets + DataStream +
            the first next_batch; the growth of peak resident memory (VmHWM) over the interpreter with its
            imports, also per document, and of private memory (RssAnon); and tokens/s of next_batch over 200
            steps (8 x 1025 tokens, prefetch 0)
  old       the same with the previous in-memory reader (perm, cumulative ends and lengths as int64 arrays),
            up to --old-max documents
Both readers run twice, alternating, and the second run of each is reported (a warm page cache for both).
Prints a Markdown table (docs/performance.md holds one) and the slopes per document.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ, G, STEPS = 1024, 8, 200


def write_bucket(folder: Path, n_docs: int, seed: int = 0) -> None:
    from gpt_simple.data.shards import ShardHeader
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "shard-00000.idx").exists():
        return
    rng = np.random.default_rng(seed)
    offsets = np.empty(n_docs + 1, dtype="<i8")
    offsets[0] = 0
    np.cumsum(rng.integers(1, 16, size=n_docs, dtype=np.int64), out=offsets[1:])
    n_tokens = int(offsets[-1])
    with open(folder / "shard-00000.bin.tmp", "wb") as f:
        block = (np.arange(1 << 24, dtype=np.uint16) % 256).astype("<u2")
        left = n_tokens
        while left:
            k = min(left, len(block))
            f.write(block[:k].tobytes())
            left -= k
    with open(folder / "shard-00000.idx.tmp", "wb") as f:
        f.write(ShardHeader("uint16", 257, "byte", 256, n_docs, n_tokens).encode())
        f.write(offsets.tobytes())
    os.replace(folder / "shard-00000.bin.tmp", folder / "shard-00000.bin")
    os.replace(folder / "shard-00000.idx.tmp", folder / "shard-00000.idx")


def vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class OldReader:
    """The reader before the on-disk index: everything in memory, ~50 bytes per document per rank."""

    def __init__(self, bucket, seed):
        from gpt_simple.data.stream import bucket_permutation
        self.bucket = bucket
        self.perm = bucket_permutation(bucket.name, bucket.n_docs, seed)
        self.lengths = bucket.lengths
        self.ends = np.cumsum(self.lengths[self.perm] + 1)
        self.total = int(self.ends[-1]) if len(self.ends) else 0
        self.passes, self.per_pass, self.n_docs = 1, self.total, bucket.n_docs

    def consumed(self, cursor):
        pos, offset = cursor
        return (int(self.ends[pos - 1]) if pos > 0 else 0) + offset

    def remaining(self, cursor):
        return self.total - self.consumed(cursor)

    def take(self, cursor, n):
        pos, offset = cursor
        spans = []
        while n > 0:
            doc = int(self.perm[pos])
            size = int(self.lengths[doc]) + 1
            end = min(size, offset + n)
            spans.append((self.bucket.name, doc, offset, end))
            n -= end - offset
            pos, offset = (pos + 1, 0) if end == size else (pos, end)
        return spans, [pos, offset]

    def tokens(self, spans):
        parts = []
        for _, doc, start, end in spans:
            length = int(self.lengths[doc])
            parts.append(np.asarray(self.bucket.document(doc, start, min(end, length)), dtype=np.int64))
            if end > length:
                parts.append(np.array([self.bucket.eos], dtype=np.int64))
        return np.concatenate(parts)


def child(mode: str, data: str) -> dict:
    __import__("torch")  # imported before the baseline, as in a trainer
    from gpt_simple.data.index import open_order
    from gpt_simple.data.shards import Bucket, open_buckets
    from gpt_simple.data.stream import DataStream
    base, anon = vm("VmHWM"), vm("RssAnon")
    if mode == "build":
        t = time.perf_counter()
        open_order(Bucket(Path(data) / "b"), 1, 0)
        return {"build_s": time.perf_counter() - t, "build_hwm": vm("VmHWM") - base}
    t = time.perf_counter()
    stream = DataStream(open_buckets(Path(data)), [], SEQ, 1, False, G, G, 0, 1, 0)
    if mode == "old":
        stream.readers = {n: OldReader(r.bucket, 1) for n, r in stream.readers.items()}
    stream.commit(stream.next_batch())
    start = time.perf_counter() - t
    hwm_start, anon_start = vm("VmHWM") - base, vm("RssAnon") - anon
    steps = min(STEPS, sum(stream.capacity().values()) // G - 1)
    t = time.perf_counter()
    for _ in range(steps):
        stream.commit(stream.next_batch())
    dt = time.perf_counter() - t
    return {"start_s": start, "hwm_start": hwm_start, "anon_start": anon_start, "hwm": vm("VmHWM") - base, "anon": vm("RssAnon") - anon,
            "tok_s": steps * G * (SEQ + 1) / dt}


def run_child(mode: str, data: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(data)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e6,1e7,1e8")
    ap.add_argument("--dir", default="/tmp/gpt-simple-data-scale")
    ap.add_argument("--old-max", type=float, default=1e7)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    rows = []
    for size in (int(float(s)) for s in args.sizes.split(",")):
        data = Path(args.dir) / f"docs-{size}"
        t = time.perf_counter()
        write_bucket(data / "b", size)
        made = time.perf_counter() - t
        for p in (data / "b" / ".index").glob("*"):  # a fresh build each time
            p.unlink()
        os.sync()
        row = {"docs": size, "write_s": made, **run_child("build", data)}
        # Each reader twice, alternating, the second run counted: both read the same documents (the same seed),
        # so the second of each finds the page cache as warm as the other's.
        for _ in range(2):
            row.update(run_child("start", data))
            if size <= args.old_max:
                row.update({f"old_{k}": v for k, v in run_child("old", data).items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("| documents | index build | start-up | peak RSS growth at start (per doc) | peak RSS growth after "
          f"{STEPS} steps | private (RssAnon) growth | next_batch tokens/s | old start-up | old peak RSS growth "
          "at start (per doc) | old tokens/s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    mib = 2**20
    for r in rows:
        old = (f"{r['old_start_s']:.2f} s | {r['old_hwm_start'] / mib:,.0f} MiB ({r['old_hwm_start'] / r['docs']:.1f} B) | "
               f"{r['old_tok_s'] / 1e6:.2f} M" if "old_hwm" in r else "- | - | -")
        print(f"| {r['docs']:,} | {r['build_s']:.2f} s | {r['start_s']:.3f} s | {r['hwm_start'] / mib:,.1f} MiB "
              f"({r['hwm_start'] / r['docs']:.3f} B) | {r['hwm'] / mib:,.1f} MiB | {r['anon'] / mib:,.1f} MiB | "
              f"{r['tok_s'] / 1e6:.2f} M | {old} |")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        dn = b["docs"] - a["docs"]
        print(f"\nslopes from {a['docs']:,} to {b['docs']:,} documents: build {(b['build_s'] - a['build_s']) / dn * 1e9:.0f}"
              f" ns/doc, start-up {(b['start_s'] - a['start_s']) / dn * 1e9:.3f} ns/doc, peak RSS growth at start "
              f"{(b['hwm_start'] - a['hwm_start']) / dn:.4f} B/doc, after {STEPS} steps {(b['hwm'] - a['hwm']) / dn:.4f} B/doc")
        olds = [r for r in rows if "old_hwm" in r]
        if len(olds) > 1:
            a, b = olds[0], olds[-1]
            dn = b["docs"] - a["docs"]
            print(f"old reader, {a['docs']:,} to {b['docs']:,}: start-up {(b['old_start_s'] - a['old_start_s']) / dn * 1e9:.0f}"
                  f" ns/doc, peak RSS growth at start {(b['old_hwm_start'] - a['old_hwm_start']) / dn:.1f} B/doc")


if __name__ == "__main__":
    main()
