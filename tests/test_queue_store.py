"""Key queues: Parquet round trip, metadata checks, the memmap sidecar, and damaged files."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eimctl.runtime.errors import EimError
from eimctl.eim.queue_store import QueueInfo, open_queue, read_queue_info, sidecar_paths, write_queue

ROWS, DIM = 103, 8


def unit_keys(rows: int = ROWS, dim: int = DIM, seed: int = 0) -> np.ndarray:
    keys = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return keys / np.linalg.norm(keys, axis=1, keepdims=True)


def sample_ids(rows: int = ROWS) -> list[str]:
    return [f"coco-{i:06d}" for i in range(rows)]


def write(path, keys=None, *, dtype="float32", fingerprint="data-1", **kwargs):
    keys = unit_keys() if keys is None else keys
    ids = kwargs.pop("ids", None) or sample_ids(len(keys) if isinstance(keys, np.ndarray) else ROWS)
    write_queue(path, keys, ids, encoder=kwargs.pop("encoder", "clip-text"), field="caption",
                normalised=True, dtype=dtype, data_fingerprint=fingerprint, **kwargs)


def test_round_trip_from_array_float32(tmp_path):
    keys = unit_keys()
    path = tmp_path / "kt.parquet"
    write(path, keys, extra_metadata={"model": "ViT-B-32", "layer": -1}, row_group_rows=32)
    info = read_queue_info(path)
    assert info == QueueInfo(path=path, rows=ROWS, dim=DIM, dtype="float32", encoder="clip-text",
                             field="caption", normalised=True, data_fingerprint="data-1",
                             extra={"model": "ViT-B-32", "layer": -1})
    memmap, opened_info = open_queue(path, expect_rows=ROWS, expect_dim=DIM, expect_encoder="clip-text",
                                     expect_data_fingerprint="data-1")
    assert opened_info == info
    assert isinstance(memmap, np.memmap) and not memmap.flags.writeable
    assert memmap.dtype == np.float32 and memmap.shape == (ROWS, DIM)
    np.testing.assert_array_equal(memmap, keys)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4  # 32 + 32 + 32 + 7


@pytest.mark.parametrize("chunk_rows", [1, 10, 60])
def test_round_trip_from_chunks_float16(tmp_path, chunk_rows):
    keys = unit_keys()
    path = tmp_path / "ke.parquet"
    # Chunks smaller and larger than a row group, never lining up with one.
    chunks = (keys[start:start + chunk_rows] for start in range(0, ROWS, chunk_rows))
    write(path, chunks, dtype="float16", row_group_rows=25)
    memmap, info = open_queue(path)
    assert info.dtype == "float16" and memmap.dtype == np.float16
    np.testing.assert_array_equal(memmap, keys.astype(np.float16))
    assert pq.ParquetFile(path).metadata.num_row_groups == 5  # 4 × 25 + 3


def test_torch_tensor_keys_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "kt.parquet"
    write(path, torch.from_numpy(unit_keys()))
    np.testing.assert_array_equal(open_queue(path)[0], unit_keys())


def test_plain_pyarrow_reads_documented_schema(tmp_path):
    path = tmp_path / "kb.parquet"
    write(path, dtype="float16")
    table = pq.read_table(path)
    assert table.schema.remove_metadata().equals(pa.schema([
        pa.field("index", pa.int64(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("key", pa.list_(pa.float16(), DIM), nullable=False)]))
    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert metadata == {"eimctl.format": "1", "eimctl.encoder": "clip-text", "eimctl.field": "caption",
                        "eimctl.normalised": "true", "eimctl.dtype": "float16", "eimctl.dim": str(DIM),
                        "eimctl.rows": str(ROWS), "eimctl.data_fingerprint": "data-1"}
    assert table.column("index").to_pylist() == list(range(ROWS))
    assert table.column("sample_id").to_pylist() == sample_ids()
    assert table.column("key")[5].as_py() == pytest.approx(unit_keys()[5].tolist(), abs=1e-3)


@pytest.mark.parametrize("expectation, found, wanted", [
    ({"expect_rows": 99}, "103", "99"),
    ({"expect_dim": 768}, "8", "768"),
    ({"expect_encoder": "gpt2-embeddings"}, "'clip-text'", "'gpt2-embeddings'"),
    ({"expect_data_fingerprint": "data-2"}, "'data-1'", "'data-2'"),
])
def test_each_mismatch_names_both_values(tmp_path, expectation, found, wanted):
    path = tmp_path / "kt.parquet"
    write(path)
    with pytest.raises(EimError) as caught:
        open_queue(path, **expectation)
    message = str(caught.value)
    assert found in message and wanted in message and str(path) in message and "build-queues" in message


def test_all_mismatches_reported_together(tmp_path):
    path = tmp_path / "kt.parquet"
    write(path)
    with pytest.raises(EimError, match=r"rows is 103, expected 5; dim is 8, expected 4"):
        open_queue(path, expect_rows=5, expect_dim=4)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "kt.parquet"
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for reader in (read_queue_info, open_queue):
        with pytest.raises(EimError, match="truncated or corrupt.*build-queues"):
            reader(path)
    path.write_text("index,key\n0,1.0\n")
    with pytest.raises(EimError, match="not a readable Parquet file"):
        read_queue_info(path)
    pq.write_table(pa.table({"index": [0, 1]}), path)
    with pytest.raises(EimError, match="not an eimctl key queue.*eimctl.encoder"):
        read_queue_info(path)
    with pytest.raises(EimError, match="not found"):
        open_queue(tmp_path / "missing.parquet")


def test_corrupt_row_group_is_refused(tmp_path):
    path = tmp_path / "kt.parquet"
    write(path, row_group_rows=32)
    data = bytearray(path.read_bytes())
    data[8:400] = b"\xff" * 392  # inside the first row group's pages; the footer stays intact
    path.write_bytes(bytes(data))
    with pytest.raises(EimError, match="corrupt.*build-queues"):
        open_queue(path)
    assert not sidecar_paths(path)[1].exists()


def test_flipped_key_bit_is_caught_by_page_checksum(tmp_path):
    path = tmp_path / "kt.parquet"
    write(path)
    data = bytearray(path.read_bytes())
    offset = bytes(data).find(unit_keys()[3].tobytes())  # float pages are stored uncompressed enough to find
    assert offset > 0
    data[offset + 1] ^= 0x55
    path.write_bytes(bytes(data))
    with pytest.raises(EimError, match="CRC checksum verification failed.*build-queues"):
        open_queue(path)


def test_out_of_order_index_is_refused(tmp_path):
    path = tmp_path / "kt.parquet"
    write(path)
    table = pq.read_table(path)
    shuffled = table.set_column(0, table.schema.field("index"), pa.array(list(range(ROWS))[::-1], pa.int64()))
    pq.write_table(shuffled, path)
    with pytest.raises(EimError, match="index column is not 0..102 in order"):
        open_queue(path)


def test_stale_sidecar_is_rebuilt(tmp_path):
    path = tmp_path / "kt.parquet"
    write(path, unit_keys(seed=0))
    first, _ = open_queue(path)
    np.testing.assert_array_equal(first, unit_keys(seed=0))
    keys_path, record_path = sidecar_paths(path)
    built_at = keys_path.stat().st_mtime_ns
    again, _ = open_queue(path)  # fresh sidecar: reused, not rebuilt
    assert keys_path.stat().st_mtime_ns == built_at
    write(path, unit_keys(seed=1))
    rebuilt, _ = open_queue(path)
    np.testing.assert_array_equal(rebuilt, unit_keys(seed=1))
    assert json.loads(record_path.read_text())["source"]["size"] == path.stat().st_size
    # A missing .npy with a leftover record is rebuilt too.
    keys_path.unlink()
    np.testing.assert_array_equal(open_queue(path)[0], unit_keys(seed=1))


def test_failed_write_leaves_previous_file(tmp_path):
    path = tmp_path / "kt.parquet"
    write(path)
    before = path.read_bytes()
    with pytest.raises(EimError, match="102 key rows for 103 sample ids"):
        write(path, unit_keys(rows=ROWS - 1), ids=sample_ids())
    with pytest.raises(EimError, match="more key rows than sample ids"):
        write(path, unit_keys(rows=ROWS + 1), ids=sample_ids())
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["kt.parquet"]


def test_bad_keys_are_refused(tmp_path):
    path = tmp_path / "kt.parquet"
    with pytest.raises(EimError, match="declared normalised"):
        write(path, unit_keys() * 3)
    bad = unit_keys()
    bad[4, 0] = np.nan
    with pytest.raises(EimError, match="NaN"):
        write(path, bad)
    with pytest.raises(EimError, match="same width"):
        write(path, iter([unit_keys(rows=50), unit_keys(rows=53, dim=4)]))
    with pytest.raises(EimError, match="float16 or float32"):
        write(path, dtype="bfloat16")
    assert not path.exists()
