"""Key queues on disk: one Parquet file per queue, memory-mapped for training.

A key queue holds one frozen key vector per training sample, in data-set order
(row i is the positive of sample i). The Parquet file is the artifact; it is
self-describing and readable by pyarrow, pandas and duckdb:

    index      int64                          0 .. N-1, data-set order
    sample_id  string                         the data set's sample id
    key        fixed_size_list<float16|float32>[d]

File-level key/value metadata (all values are strings): `eimctl.format`,
`eimctl.encoder`, `eimctl.field`, `eimctl.normalised` ("true"/"false"),
`eimctl.dtype`, `eimctl.dim`, `eimctl.rows`, `eimctl.data_fingerprint`, and
`eimctl.extra.<name>` (JSON text) for each extra entry.

Training reads keys through a raw sidecar `<queue>.parquet.keys.npy` (plus
`<queue>.parquet.keys.json` recording which Parquet it was derived from) that
`open_queue` rebuilds row group by row group whenever it is missing or stale:

    write_queue(path, keys, sample_ids, encoder=..., field=..., normalised=True,
                dtype="float16", data_fingerprint=...)
    keys, info = open_queue(path, expect_rows=len(train), expect_dim=768)
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eimctl.runtime.atomic import atomic_path, write_json
from eimctl.runtime.errors import EimError

try:  # serialises sidecar rebuilds between ranks that open the same queue at once
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

FORMAT_VERSION = "1"
PREFIX = "eimctl."
EXTRA_PREFIX = "eimctl.extra."
REQUIRED_KEYS = ("format", "encoder", "field", "normalised", "dtype", "dim", "rows", "data_fingerprint")
ARROW_TYPES = {"float16": pa.float16(), "float32": pa.float32()}
# A row group is the unit of reading when the sidecar is built, so it bounds memory.
ROW_GROUP_BYTES = 32 * 1024 * 1024
MAX_ROW_GROUP_ROWS = 16_384
REBUILD_HINT = "rebuild it with `eimctl build-queues --force`"


@dataclass(frozen=True)
class QueueInfo:
    """What a queue file says about itself (its Parquet metadata)."""

    path: Path
    rows: int
    dim: int
    dtype: str
    encoder: str
    field: str
    normalised: bool
    data_fingerprint: str
    extra: dict = dataclass_field(default_factory=dict)


def queue_schema(dim: int, dtype: str, metadata: dict[str, str] | None = None) -> pa.Schema:
    return pa.schema([pa.field("index", pa.int64(), nullable=False),
                      pa.field("sample_id", pa.string(), nullable=False),
                      pa.field("key", pa.list_(ARROW_TYPES[dtype], dim), nullable=False)],
                     metadata=metadata)


def sidecar_paths(path: Path) -> tuple[Path, Path]:
    """The raw key cache and the record of which Parquet it was built from."""
    path = Path(path)
    return path.with_name(path.name + ".keys.npy"), path.with_name(path.name + ".keys.json")


# ---------------------------------------------------------------- writing

def write_queue(path: Path, keys: np.ndarray | Iterable[np.ndarray], sample_ids: list[str], *,
                encoder: str, field: str, normalised: bool, dtype: str, data_fingerprint: str,
                extra_metadata: dict | None = None, row_group_rows: int | None = None) -> None:
    """Write a key queue atomically; `keys` is an [N, d] array or an iterable of [n, d] chunks.

    Rows are written in data-set order (row i is sample_ids[i]); chunks are
    regrouped into row groups of `row_group_rows` (default: about 32 MiB, at
    most 16,384 rows), so memory stays bounded when the keys arrive as chunks.
    """
    path = Path(path)
    if dtype not in ARROW_TYPES:
        raise EimError(f"unknown queue dtype {dtype!r}", str(path), "use float16 or float32")
    rows = len(sample_ids)
    if rows == 0:
        raise EimError("a key queue needs at least one sample", str(path), "check the training split")
    # One [N, d] array (numpy or CPU tensor) or an iterable of [n, d] chunks.
    chunks = iter([keys]) if getattr(keys, "ndim", None) == 2 else iter(keys)
    first = _check_chunk(next(chunks, None), None, normalised, path)
    dim = first.shape[1]
    metadata = {"format": FORMAT_VERSION, "encoder": encoder, "field": field,
                "normalised": "true" if normalised else "false", "dtype": dtype, "dim": str(dim),
                "rows": str(rows), "data_fingerprint": data_fingerprint}
    metadata = {PREFIX + k: v for k, v in metadata.items()}
    for name, value in (extra_metadata or {}).items():
        metadata[EXTRA_PREFIX + name] = json.dumps(value, sort_keys=True)
    schema = queue_schema(dim, dtype, metadata)
    # Sized as if float32, so a row group stays under ROW_GROUP_BYTES for either dtype.
    group_rows = row_group_rows or max(1, min(MAX_ROW_GROUP_ROWS, ROW_GROUP_BYTES // (dim * 4)))

    with atomic_path(path) as tmp:
        # Statistics and dictionaries are useless for float vectors and unique ids.
        # Page checksums let the sidecar build notice bit rot inside the float pages.
        with pq.ParquetWriter(tmp, schema, use_dictionary=False, write_statistics=["index"],
                              write_page_checksum=True) as writer:
            groups = _RowGroups(writer, schema, sample_ids, dim, np.dtype(dtype))
            chunk = first
            while chunk is not None:
                if groups.written + groups.pending_rows + len(chunk) > rows:
                    raise EimError(f"more key rows than sample ids ({rows})", str(path),
                                   "pass one key row per training sample")
                groups.add(chunk, group_rows)
                chunk = _check_chunk(next(chunks, None), dim, normalised, path)
            groups.flush()
            if groups.written != rows:
                raise EimError(f"{groups.written} key rows for {rows} sample ids", str(path),
                               "pass one key row per training sample")


class _RowGroups:
    """Regroups incoming key chunks into Parquet row groups, copying only the rows of each group."""

    def __init__(self, writer, schema, sample_ids: list[str], dim: int, numpy_dtype):
        self.writer, self.schema, self.sample_ids, self.dim, self.dtype = writer, schema, sample_ids, dim, numpy_dtype
        self.written, self.pending, self.pending_rows = 0, [], 0  # pending: rows received, not yet written

    def add(self, chunk: np.ndarray, group_rows: int) -> None:
        self.pending.append(chunk)
        self.pending_rows += len(chunk)
        while self.pending_rows >= group_rows:
            self.write(group_rows)

    def flush(self) -> None:
        if self.pending_rows:
            self.write(self.pending_rows)

    def write(self, take: int) -> None:
        pieces, needed = [], take
        while needed:  # copy only the rows of this group, never the whole input
            head = self.pending[0]
            pieces.append(head[:needed])
            if len(head) <= needed:
                self.pending.pop(0)
            else:
                self.pending[0] = head[needed:]
            needed -= len(pieces[-1])
        block = np.ascontiguousarray(np.concatenate(pieces) if len(pieces) > 1 else pieces[0], dtype=self.dtype)
        key_array = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), self.dim)
        start = self.written
        batch = pa.record_batch([pa.array(np.arange(start, start + take, dtype=np.int64)),
                                 pa.array(self.sample_ids[start:start + take], pa.string()), key_array],
                                schema=self.schema)
        self.writer.write_batch(batch, row_group_size=take)
        self.written += take
        self.pending_rows -= take


def _check_chunk(chunk, dim: int | None, normalised: bool, path: Path) -> np.ndarray | None:
    if chunk is None:
        if dim is None:
            raise EimError("no key rows were given", str(path), "pass an [N, d] array or non-empty chunks")
        return None
    chunk = np.asarray(chunk)
    if chunk.ndim != 2 or (dim is not None and chunk.shape[1] != dim):
        raise EimError(f"key chunk has shape {chunk.shape}, expected [rows, {dim or 'd'}]", str(path),
                       "every chunk must be a 2-D array with the same width")
    as_float = chunk.astype(np.float32, copy=False)
    if not np.isfinite(as_float).all():
        raise EimError("key rows contain NaN or infinity", str(path), "check the encoder that embeds the queue")
    if normalised and len(chunk):
        norms = np.linalg.norm(as_float, axis=1)
        if np.abs(norms - 1).max() > 1e-2:
            raise EimError(f"keys are declared normalised but have norms in [{norms.min():.4g}, {norms.max():.4g}]",
                           str(path), "L2-normalise the keys or pass normalised=False")
    return chunk


# ---------------------------------------------------------------- reading metadata

def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise EimError("key queue not found", str(path), "build it with `eimctl build-queues`")
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as error:
        raise EimError(f"not a readable Parquet file, probably truncated or corrupt ({_one_line(error)})",
                       str(path), REBUILD_HINT) from None


def read_queue_info(path: Path) -> QueueInfo:
    """Read and check a queue's metadata without touching its keys."""
    path = Path(path)
    parquet = _open_parquet(path)
    raw = {k.decode(): v.decode() for k, v in (parquet.schema_arrow.metadata or {}).items()}
    missing = [PREFIX + k for k in REQUIRED_KEYS if PREFIX + k not in raw]
    if missing:
        raise EimError(f"Parquet file is not an eimctl key queue (metadata lacks {', '.join(missing)})",
                       str(path), REBUILD_HINT)
    if raw[PREFIX + "format"] != FORMAT_VERSION:
        raise EimError(f"queue format {raw[PREFIX + 'format']} is not the supported format {FORMAT_VERSION}",
                       str(path), REBUILD_HINT)
    try:
        info = QueueInfo(path=path, rows=int(raw[PREFIX + "rows"]), dim=int(raw[PREFIX + "dim"]),
                         dtype=raw[PREFIX + "dtype"], encoder=raw[PREFIX + "encoder"],
                         field=raw[PREFIX + "field"], normalised=raw[PREFIX + "normalised"] == "true",
                         data_fingerprint=raw[PREFIX + "data_fingerprint"],
                         extra={k[len(EXTRA_PREFIX):]: json.loads(v) for k, v in raw.items()
                                if k.startswith(EXTRA_PREFIX)})
    except ValueError as error:
        raise EimError(f"queue metadata is malformed ({error})", str(path), REBUILD_HINT) from None
    if info.dtype not in ARROW_TYPES:
        raise EimError(f"queue dtype {info.dtype!r} is not float16 or float32", str(path), REBUILD_HINT)
    expected = queue_schema(info.dim, info.dtype)
    if not parquet.schema_arrow.remove_metadata().equals(expected) or parquet.metadata.num_rows != info.rows:
        raise EimError(f"queue columns/rows ({parquet.schema_arrow.remove_metadata()}, "
                       f"{parquet.metadata.num_rows} rows) disagree with its metadata "
                       f"({info.rows} rows of {info.dim}-d {info.dtype} keys)", str(path), REBUILD_HINT)
    return info


# ---------------------------------------------------------------- opening for training

def open_queue(path: Path, *, expect_rows: int | None = None, expect_dim: int | None = None,
               expect_encoder: str | None = None,
               expect_data_fingerprint: str | None = None) -> tuple[np.memmap, QueueInfo]:
    """Check a queue against what the caller needs and return its keys as a read-only [N, d] memmap."""
    path = Path(path)
    info = read_queue_info(path)
    found = {"rows": info.rows, "dim": info.dim, "encoder": info.encoder,
             "data fingerprint": info.data_fingerprint}
    wanted = {"rows": expect_rows, "dim": expect_dim, "encoder": expect_encoder,
              "data fingerprint": expect_data_fingerprint}
    # Report every mismatch at once, so one rebuild fixes them all.
    problems = [f"{name} is {found[name]!r}, expected {wanted[name]!r}"
                for name in found if wanted[name] is not None and wanted[name] != found[name]]
    if problems:
        raise EimError("key queue does not match this run: " + "; ".join(problems), str(path),
                       "rebuild the queues for this data and model with `eimctl build-queues --force`")
    keys_path, record_path = sidecar_paths(path)
    with _exclusive_lock(path):
        source = _source_record(path)
        if not _sidecar_is_current(keys_path, record_path, source, info):
            try:
                _build_sidecar(path, info, keys_path, record_path, source)
            except OSError as error:
                raise EimError(f"cannot write the raw key cache {keys_path.name} ({_one_line(error)})", str(path),
                               "make the queue folder writable (and give it room for N×d keys), "
                               "or copy the queue somewhere writable") from None
        keys = np.load(keys_path, mmap_mode="r")
    return keys, info


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Lock the Parquet file itself, so ranks opening one queue at once build its cache only once."""
    if fcntl is None:
        yield
        return
    with open(path, "rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _source_record(path: Path) -> dict:
    """Identify the Parquet file: size, mtime, inode and a hash of its footer (schema, metadata, row groups)."""
    stat = path.stat()
    with open(path, "rb") as handle:
        handle.seek(max(0, stat.st_size - 8))
        tail = handle.read(8)
        footer_length = int.from_bytes(tail[:4], "little") if len(tail) == 8 else 0
        handle.seek(max(0, stat.st_size - 8 - footer_length))
        footer = handle.read(footer_length + 8)
    # The footer alone can repeat (same shape, same sizes) and mtime ticks are coarse; every
    # write_queue makes a new inode via os.replace, so the inode tells rewrites apart.
    return {"parquet": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino,
            "footer_sha256": hashlib.sha256(footer).hexdigest()}


def _sidecar_is_current(keys_path: Path, record_path: Path, source: dict, info: QueueInfo) -> bool:
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("source") != source:
            return False
        keys = np.load(keys_path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return keys.shape == (info.rows, info.dim) and keys.dtype == np.dtype(info.dtype)


def _build_sidecar(path: Path, info: QueueInfo, keys_path: Path, record_path: Path, source: dict) -> None:
    """Copy the keys into a raw .npy, one row group at a time, checking the index column on the way."""
    # Remove the record first: a crash mid-rebuild must never leave a record vouching for a new .npy.
    record_path.unlink(missing_ok=True)
    parquet = _open_parquet(path)
    with atomic_path(keys_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(info.dtype), shape=(info.rows, info.dim))
        start = 0
        for group in range(parquet.metadata.num_row_groups):
            try:
                table = parquet.read_row_group(group, columns=["index", "key"])
            except (pa.ArrowException, OSError) as error:
                raise EimError(f"row group {group} cannot be read, the file is corrupt ({_one_line(error)})",
                               str(path), REBUILD_HINT) from None
            count = table.num_rows
            index = table.column("index").to_numpy()
            if not np.array_equal(index, np.arange(start, start + count)):
                raise EimError(f"index column is not 0..{info.rows - 1} in order (row group {group} starts "
                               f"at {index[0] if count else 'nothing'}, expected {start})", str(path), REBUILD_HINT)
            key_column = table.column("key").combine_chunks()
            if key_column.null_count or key_column.flatten().null_count:
                raise EimError(f"row group {group} has missing key values", str(path), REBUILD_HINT)
            out[start:start + count] = key_column.flatten().to_numpy().reshape(count, info.dim)
            start += count
        if start != info.rows:
            raise EimError(f"queue has {start} rows, its metadata says {info.rows}", str(path), REBUILD_HINT)
        out.flush()
        del out
    write_json(record_path, {"source": source, "rows": info.rows, "dim": info.dim, "dtype": info.dtype})

