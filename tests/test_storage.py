import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from coopt_hub.core import shardfile
from coopt_hub.core.layout import ANCHORS_FILE, TARGETS_FILE, remote_paths, shard_branch, shard_prefix
from coopt_hub.core.shardfile import (
    AnchorOutputs,
    RemoteFile,
    ShardHeader,
    ShardReader,
    ShardResult,
    all_finite,
    read_shard,
    write_shard,
)
from coopt_hub.errors import ShardFileError

ROWS, DIM, OUTPUT_DIM, ANCHORS = 12, 8, 6, 4


def make_pair(rows: int = ROWS) -> tuple[ShardResult, AnchorOutputs]:
    rng = np.random.default_rng(0)
    header = ShardHeader(
        shard=1, plan_hash="ab" * 32, source_revision="cd" * 20, prior={"model": "ViT-S-32", "seed": 0},
        preprocessing={"image_size": [32, 32]}, fingerprint="ef" * 32, output_dim=OUTPUT_DIM, dim=DIM,
        uniformity=-2.5, reference=None, residual=0.0, num_rows=rows, tool_version="0.1.0", checksums={},
    )
    raw = rng.standard_normal((rows, DIM)).astype(np.float32)
    result = ShardResult(header=header, ids=np.arange(0, 2 * rows, 2), raw=raw, aligned=raw * 2)
    features = rng.standard_normal((ANCHORS, OUTPUT_DIM))
    anchors = AnchorOutputs(ids=np.array([1, 5, 7, 30]), features=features,
                            projected=rng.standard_normal((ANCHORS, DIM)))
    return result, anchors


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    write_shard(tmp_path, *make_pair())
    return tmp_path


def rewrite(path: Path, fix_checksums: bool = False, header_changes: dict | None = None, **tensors) -> dict:
    """Rewrite one shard file with some tensors replaced (None: removed); returns its new header."""
    with safe_open(str(path), framework="numpy") as stored:
        header = json.loads(stored.metadata()["coopt"])
        arrays = {name: stored.get_tensor(name) for name in stored.keys()}
    for name, value in tensors.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    group = "targets" if path.name == TARGETS_FILE else "anchors"
    if fix_checksums:
        for name, array in arrays.items():
            header["checksums"][f"{group}/{name}"] = hashlib.sha256(
                np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()
    header.update(header_changes or {})
    save_file(arrays, str(path), metadata={"coopt": json.dumps(header)})
    return header


def tamper_consistently(directory: Path, file: str, **tensors) -> None:
    """Replace tensors as a buggy writer would: checksums match and both headers agree."""
    header = rewrite(directory / file, fix_checksums=True, **tensors)
    other = ANCHORS_FILE if file == TARGETS_FILE else TARGETS_FILE
    rewrite(directory / other, header_changes={"checksums": header["checksums"]})


def test_remote_layout():
    assert shard_branch(3) == "shard/3"
    assert shard_prefix(3) == "shards/3"
    paths = remote_paths(3)
    assert tuple(paths) == ("shards/3/targets.safetensors", "shards/3/anchors.safetensors", "shards/3/report.json")
    assert paths.targets == "shards/3/targets.safetensors"


def test_round_trip(tmp_path: Path):
    result, anchors = make_pair()
    written = write_shard(tmp_path / "out", result, anchors)
    assert [p.name for p in written] == [TARGETS_FILE, ANCHORS_FILE]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([TARGETS_FILE, ANCHORS_FILE])
    assert len(result.header.checksums) == 6
    back, back_anchors = read_shard(tmp_path / "out")
    assert back.header == result.header
    assert back.ids.dtype == np.int64
    assert back.raw.dtype == np.float16
    assert back.aligned.dtype == np.float16
    np.testing.assert_array_equal(back.ids, result.ids)
    np.testing.assert_allclose(back.raw, result.raw, atol=1e-2)
    assert back_anchors.features.dtype == np.float32
    assert back_anchors.projected.shape == (ANCHORS, DIM)
    np.testing.assert_allclose(back_anchors.features, anchors.features, rtol=1e-6)


def test_rewriting_replaces_the_files(shard_dir: Path):
    result, anchors = make_pair(rows=5)
    write_shard(shard_dir, result, anchors)
    assert read_shard(shard_dir)[0].ids.shape == (5,)
    assert sorted(p.name for p in shard_dir.iterdir()) == sorted([TARGETS_FILE, ANCHORS_FILE])


def test_missing_file(shard_dir: Path):
    (shard_dir / ANCHORS_FILE).unlink()
    with pytest.raises(ShardFileError, match=f"{ANCHORS_FILE} is missing") as info:
        read_shard(shard_dir)
    assert info.value.hint


def test_truncated_file(shard_dir: Path):
    path = shard_dir / TARGETS_FILE
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ShardFileError, match=f"{TARGETS_FILE} is not a readable safetensors file"):
        read_shard(shard_dir)


def test_damaged_bytes_fail_the_checksum(shard_dir: Path):
    path = shard_dir / TARGETS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data, not the header
    path.write_bytes(bytes(data))
    with pytest.raises(ShardFileError, match="does not match its checksum"):
        read_shard(shard_dir)
    read_shard(shard_dir, verify=False)


def test_missing_tensor(shard_dir: Path):
    tamper_consistently(shard_dir, TARGETS_FILE, aligned=None)
    with pytest.raises(ShardFileError, match=r"lacks the tensor\(s\) \['aligned'\]"):
        read_shard(shard_dir)


def test_wrong_dtype(shard_dir: Path):
    tamper_consistently(shard_dir, TARGETS_FILE, raw=np.zeros((ROWS, DIM), np.float32))
    with pytest.raises(ShardFileError, match="'raw' is float32, expected float16"):
        read_shard(shard_dir)


@pytest.mark.parametrize("file, tensors, words", [
    (TARGETS_FILE, dict(ids=np.arange(ROWS - 1, dtype=np.int64)), "'ids' has shape"),
    (TARGETS_FILE, dict(aligned=np.zeros((ROWS, DIM + 1), np.float16)), "'aligned' has shape"),
    (ANCHORS_FILE, dict(projected=np.zeros((ANCHORS, DIM - 1), np.float32)), "'projected' has shape"),
    (ANCHORS_FILE, dict(features=np.zeros((ANCHORS + 1, OUTPUT_DIM), np.float32)), "'features' has shape"),
])
def test_shape_mismatch(shard_dir: Path, file, tensors, words):
    rewrite(shard_dir / file, **tensors)
    with pytest.raises(ShardFileError, match=words):
        read_shard(shard_dir, verify=False)


def test_headers_of_the_pair_must_agree(shard_dir: Path):
    rewrite(shard_dir / ANCHORS_FILE, header_changes={"fingerprint": "00" * 32})
    with pytest.raises(ShardFileError, match="different runs"):
        read_shard(shard_dir)


@pytest.mark.parametrize("file, tensors, words", [
    (TARGETS_FILE, dict(aligned=np.full((ROWS, DIM), np.nan, np.float16)), "'aligned' holds NaN"),
    (ANCHORS_FILE, dict(features=np.full((ANCHORS, OUTPUT_DIM), np.inf, np.float32)), "'features' holds NaN or inf"),
    (TARGETS_FILE, dict(ids=np.arange(ROWS, dtype=np.int64)[::-1].copy()), "not sorted"),
    (ANCHORS_FILE, dict(ids=np.array([1, 5, 5, 30], np.int64)), "not sorted, unique"),
])
def test_bad_values_with_valid_checksums(shard_dir: Path, file, tensors, words):
    tamper_consistently(shard_dir, file, **tensors)
    with pytest.raises(ShardFileError, match=words):
        read_shard(shard_dir)


def test_bad_header(shard_dir: Path):
    rewrite(shard_dir / TARGETS_FILE, header_changes={"unexpected": 1})
    with pytest.raises(ShardFileError, match="unreadable coopt header"):
        read_shard(shard_dir)


def read_in_ranges(directory: Path, rows: int, seen: list | None = None) -> ShardResult:
    """The targets read `rows` at a time and put back together; `seen` collects each range's first row."""
    seen = [] if seen is None else seen
    with ShardReader(directory) as shard:
        parts = []
        for part in shard.chunks(rows):
            seen.append(part.start)
            parts.append(part)
        return ShardResult(shard.header, *(np.concatenate([getattr(part, name) for part in parts])
                                           for name in ("ids", "raw", "aligned")))


def test_ranges_read_what_read_shard_reads(shard_dir: Path):
    whole, anchors = read_shard(shard_dir)
    starts = []
    ranged = read_in_ranges(shard_dir, rows=5, seen=starts)
    assert starts == [0, 5, 10]
    assert ranged.header == whole.header
    for name in ("ids", "raw", "aligned"):
        assert np.array_equal(getattr(ranged, name), getattr(whole, name))
    with ShardReader(shard_dir) as shard:
        assert np.array_equal(shard.anchors.features, anchors.features)
        list(shard.chunks(ROWS))
        mapped = shard.mapped()
    assert np.array_equal(mapped.raw, whole.raw)
    assert np.array_equal(mapped.ids, whole.ids)


def test_damage_is_found_after_the_last_range(shard_dir: Path):
    path = shard_dir / TARGETS_FILE
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01  # the lowest mantissa bit of the last value: still a finite number
    path.write_bytes(bytes(data))
    starts = []
    with pytest.raises(ShardFileError, match="does not match its checksum"):
        read_in_ranges(shard_dir, rows=5, seen=starts)
    assert starts == [0, 5, 10]  # a reader keeps nothing as good until the ranges have ended


def test_damage_that_makes_bad_values_is_reported_as_damage(shard_dir: Path):
    path = shard_dir / TARGETS_FILE
    with safe_open(str(path), framework="numpy") as stored:
        raw_bytes = stored.get_tensor("raw").tobytes()
    data = bytearray(path.read_bytes())
    row = data.find(raw_bytes) + 6 * DIM * 2  # the first value of row 6 of 'raw'
    data[row:row + 2] = np.array([np.inf], np.float16).tobytes()
    path.write_bytes(bytes(data))
    starts = []
    with pytest.raises(ShardFileError, match="'raw' does not match its checksum"):
        read_in_ranges(shard_dir, rows=5, seen=starts)
    assert starts == [0]  # the range holding the infinity, and any after it, is never handed out


@pytest.mark.parametrize("tensors, words", [
    (dict(aligned=np.where(np.arange(ROWS)[:, None] == 7, np.nan, np.ones((ROWS, DIM))).astype(np.float16)),
     "'aligned' holds NaN"),
    # Rising within each range of 5 rows, not from one range to the next.
    (dict(ids=np.array([10, 11, 12, 13, 14, 0, 1, 2, 3, 4, 20, 21], np.int64)), "not sorted, unique"),
])
def test_bad_values_are_found_in_any_range(shard_dir: Path, tensors, words):
    tamper_consistently(shard_dir, TARGETS_FILE, **tensors)
    starts = []
    with pytest.raises(ShardFileError, match=words):
        read_in_ranges(shard_dir, rows=5, seen=starts)
    assert starts == [0]


@pytest.mark.parametrize("contents, words", [
    (b"\x01\x00", "cannot hold the 8-byte header length"),
    ((1 << 40).to_bytes(8, "little") + b"{}", "does not fit"),
    ((2).to_bytes(8, "little") + b"{]", "Expecting"),
    ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
])
def test_corrupt_headers(shard_dir: Path, contents: bytes, words: str):
    (shard_dir / TARGETS_FILE).write_bytes(contents)
    with pytest.raises(ShardFileError, match=f"not a readable safetensors file .*{words}"):
        read_shard(shard_dir, verify=False)


def test_a_tensor_whose_bytes_do_not_fit_its_shape(shard_dir: Path):
    path = shard_dir / TARGETS_FILE
    length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + length])
    header["ids"]["shape"] = [ROWS + 1]  # the bytes are those of ROWS ids
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + path.read_bytes()[8 + length:])
    with pytest.raises(ShardFileError, match="'ids' takes 96 bytes"):
        read_shard(shard_dir, verify=False)


def test_write_refuses_what_could_not_be_read_back(tmp_path: Path):
    result, anchors = make_pair()
    result.raw[0, 0] = 1e6  # beyond fp16
    with pytest.raises(ShardFileError, match=r"\(not written\): tensor 'raw' holds NaN or infinite"):
        write_shard(tmp_path, result, anchors)
    result, anchors = make_pair()
    result.header.num_rows = ROWS + 1
    with pytest.raises(ShardFileError, match="'ids' has shape"):
        write_shard(tmp_path, result, anchors)
    assert list(tmp_path.iterdir()) == []


def test_skipped_ids_are_recorded_and_old_headers_read_as_none_skipped(tmp_path: Path):
    result, anchors = make_pair()
    result.header.skipped_ids = [1, 3]  # odd ids: the stored ids are even
    write_shard(tmp_path, result, anchors)
    assert read_shard(tmp_path)[0].header.skipped_ids == [1, 3]
    assert read_in_ranges(tmp_path, rows=5).header.skipped_ids == [1, 3]

    for file in (TARGETS_FILE, ANCHORS_FILE):  # as written before the field existed
        with safe_open(str(tmp_path / file), framework="numpy") as stored:
            header = json.loads(stored.metadata()["coopt"])
            arrays = {name: stored.get_tensor(name) for name in stored.keys()}
        del header["skipped_ids"]
        save_file(arrays, str(tmp_path / file), metadata={"coopt": json.dumps(header)})
    assert read_shard(tmp_path)[0].header.skipped_ids == []


@pytest.mark.parametrize(("skipped", "words"), [
    ([4], "recorded as skipped have a row"),
    ([3, 1], "not sorted, unique and non-negative"),
    (["1"], "not a list of integers"),
])
def test_bad_skipped_ids_are_refused_on_write_and_read(tmp_path: Path, skipped, words):
    result, anchors = make_pair()
    result.header.skipped_ids = skipped
    with pytest.raises(ShardFileError, match=words):
        write_shard(tmp_path / "refused", result, anchors)
    write_shard(tmp_path, *make_pair())
    header = rewrite(tmp_path / TARGETS_FILE, header_changes={"skipped_ids": skipped})
    rewrite(tmp_path / ANCHORS_FILE, header_changes={"skipped_ids": header["skipped_ids"]})
    with pytest.raises(ShardFileError, match=words):
        read_shard(tmp_path)


def test_ranges_without_the_aligned_tensor_leave_it_unread_and_still_check_the_rest(shard_dir: Path):
    """A merge that re-aligns a shard reads only ids and raw: damage there is still found, damage to
    the aligned tensor it never uses is not its concern."""
    result, _ = make_pair()
    with ShardReader(shard_dir, verify=True) as shard:
        ranges = list(shard.chunks(5, aligned=False))
    assert all(r.aligned is None for r in ranges)
    assert np.array_equal(np.concatenate([r.raw for r in ranges]), result.raw.astype(np.float16))
    assert np.array_equal(np.concatenate([r.ids for r in ranges]), result.ids)

    path = shard_dir / TARGETS_FILE
    with safe_open(str(path), framework="numpy") as stored:
        aligned_bytes, raw_bytes = stored.get_tensor("aligned").tobytes(), stored.get_tensor("raw").tobytes()
    data = bytearray(path.read_bytes())
    data[data.find(aligned_bytes) + 1] ^= 0x01  # a finite value still
    path.write_bytes(bytes(data))
    with ShardReader(shard_dir, verify=True) as shard:
        assert len(list(shard.chunks(5, aligned=False))) == len(ranges)
    with pytest.raises(ShardFileError, match="'aligned' does not match its checksum"), \
            ShardReader(shard_dir, verify=True) as shard:
        list(shard.chunks(5))
    data[data.find(raw_bytes) + 1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardFileError, match="'raw' does not match its checksum"), \
            ShardReader(shard_dir, verify=True) as shard:
        list(shard.chunks(5, aligned=False))


class _RecordedFile(io.BytesIO):
    """A file's bytes that remembers every byte range read from it (as a remote file would fetch)."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.ranges: list[tuple[int, int]] = []
        self.closed_by_reader = False

    def read(self, size: int | None = -1) -> bytes:
        start = self.tell()
        data = super().read(size)
        self.ranges.append((start, start + len(data)))
        return data

    def readinto(self, buffer) -> int:
        data = self.read(memoryview(buffer).nbytes)
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.closed_by_reader = True
        super().close()


def test_a_targets_file_read_where_it_lies_fetches_only_the_ranges_asked_for(shard_dir: Path):
    """ShardReader(targets=RemoteFile) reads the targets from another file object (a merge's range
    requests): the same rows and checks as from disk, and a re-aligned shard's aligned tensor never read."""
    result, _ = make_pair()
    path = shard_dir / TARGETS_FILE
    data = path.read_bytes()
    with safe_open(str(path), framework="numpy") as stored:
        aligned_bytes = stored.get_tensor("aligned").tobytes()
    aligned_start = data.find(aligned_bytes)
    opened: list[_RecordedFile] = []

    def opener() -> _RecordedFile:
        opened.append(_RecordedFile(data))
        return opened[-1]

    remote = RemoteFile("shard/0@abc/targets.safetensors", opener)
    with ShardReader(shard_dir, verify=True, targets=remote) as shard:
        ranges = list(shard.chunks(5, aligned=False))
    assert np.array_equal(np.concatenate([r.raw for r in ranges]), result.raw.astype(np.float16))
    assert np.array_equal(np.concatenate([r.ids for r in ranges]), result.ids)
    (file,) = opened
    assert file.closed_by_reader
    read = [r for r in file.ranges if r[1] > r[0]]
    assert read and not [r for r in read if r[0] < aligned_start + len(aligned_bytes) and r[1] > aligned_start]

    damaged = bytearray(data)
    damaged[data.find(result.raw.astype(np.float16).tobytes()) + 1] ^= 0x01
    remote = RemoteFile("shard/0@abc/targets.safetensors", lambda: _RecordedFile(bytes(damaged)))
    with pytest.raises(ShardFileError, match=r"shard/0@abc/targets.safetensors.*'raw' does not match its checksum"), \
            ShardReader(shard_dir, verify=True, targets=remote) as shard:
        list(shard.chunks(5, aligned=False))


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4", ">f4", "<f8", ">f8"])
def test_all_finite_reads_the_bits_as_isfinite_does(dtype: str):
    """all_finite (the shard and merge checks) against numpy's isfinite: random bit patterns of every
    float width and byte order (NaN payloads, infinities, subnormals, both zeros), one bad value at a
    time in an otherwise finite array, and arrays that are not floats or are empty."""
    rng = np.random.default_rng(0)
    width = np.dtype(dtype).itemsize
    patterns = rng.integers(0, 256, size=(4096, width), dtype=np.uint8).view(dtype).reshape(-1)
    assert not np.isfinite(patterns).all()
    finite = patterns[np.isfinite(patterns)]
    assert all_finite(finite)
    for bad in (np.inf, -np.inf, np.nan, patterns[~np.isfinite(patterns)][0]):
        for where in (0, finite.size // 2, finite.size - 1):
            spoiled = finite.copy()
            spoiled[where] = bad
            assert not all_finite(spoiled)
    largest = np.array([np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).smallest_subnormal, -0.0], dtype)
    assert all_finite(largest) and all_finite(largest[::2])  # a strided view too
    assert all_finite(np.arange(5)) and all_finite(np.zeros(0, dtype))
    # Read a block at a time: a bad value in any block, the first and last value of one included.
    block = shardfile._FINITE_BLOCK_BYTES // width
    many = np.resize(finite, (3 * block + 7) // 16 * 16).reshape(-1, 16)  # 2-D, as targets are
    assert all_finite(many)
    for where in (block - 1, block, 2 * block + 1, many.size - 1):
        spoiled = many.copy()
        spoiled.reshape(-1)[where] = np.nan
        assert not all_finite(spoiled) and not all_finite(spoiled.T)
