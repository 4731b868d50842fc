"""Parquet (FineWeb, DCLM, ...): one document per row of a text column. The main process reads the column in
record batches of about chunk_bytes, so memory is bounded by one row group of that column, not by the file."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from gpt_simple.data.prepare.errors import PrepareError, optional
from gpt_simple.data.prepare.tasks import Problem, Task, Texts

MAX_BATCH_ROWS = 1 << 16


def _pyarrow(path: Path):
    pa = optional("pyarrow", "parquet", f"{path}: reading Parquet")
    return pa, optional("pyarrow.parquet", "parquet", f"{path}: reading Parquet")


def _is_text(pa, t) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def open_parquet(path: Path, column: str):
    """The ParquetFile, with `column` checked: a missing or non-text column is a one-line error (no row of this
    file could be read, and the fix is a flag). A file that is not readable Parquet raises pyarrow's error."""
    pa, pq = _pyarrow(path)
    # pre_buffer caches what it has read ahead for the file's lifetime: memory would grow with the file.
    f = pq.ParquetFile(path, pre_buffer=False)
    schema = f.schema_arrow
    if column not in schema.names:
        raise PrepareError(f"{path}: no column {column!r}; it has {', '.join(map(repr, schema.names))} "
                           f"(choose one with --text-column)")
    kind = schema.field(column).type
    if not _is_text(pa, kind):
        raise PrepareError(f"{path}: column {column!r} holds {kind}, not text (choose another with --text-column)")
    return f


def check_parquet(path: Path, column: str) -> None:
    pa, _ = _pyarrow(path)
    try:
        open_parquet(path, column).close()
    except (pa.ArrowException, OSError):
        pass  # reported, and skipped or fatal as --strict says, when the file's turn comes


def _batch_rows(f, column: str, chunk_bytes: int) -> int:
    """Rows per batch for about chunk_bytes of text, from the column's uncompressed size in the footer."""
    meta, total = f.metadata, 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        total += sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                     if group.column(c).path_in_schema == column)
    return max(1, min(MAX_BATCH_ROWS, chunk_bytes * meta.num_rows // max(total, 1)))


def parquet_tasks(path: Path, chunk_bytes: int, column: str) -> Iterator[Task]:
    pa, _ = _pyarrow(path)
    name, file_bytes = str(path), path.stat().st_size
    try:
        f = open_parquet(path, column)
    except (pa.ArrowException, OSError) as e:
        yield Problem(path=name, category="unreadable file", detail=f"not readable as Parquet ({e})", size=file_bytes)
        return
    with f:
        rows = f.metadata.num_rows
        if rows == 0:
            yield Problem(path=name, category="empty file", detail="empty file (no rows)", size=file_bytes)
            return
        row, read = 1, 0   # progress counts the file's bytes in proportion to the rows read
        try:
            for batch in f.iter_batches(batch_size=_batch_rows(f, column, chunk_bytes), columns=[column]):
                texts = batch.column(0).to_pylist()
                done = file_bytes * (row - 1 + len(texts)) // rows
                yield Texts(path=name, texts=texts, first_line=row, last=row - 1 + len(texts) >= rows,
                            size=done - read)
                row, read = row + len(texts), done
        except (pa.ArrowException, OSError) as e:
            yield Problem(path=name, category="corrupt parquet", line=row, size=file_bytes - read,
                          detail=f"cannot read rows from {row} on ({e}): the rest of the file")
