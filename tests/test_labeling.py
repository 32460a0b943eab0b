"""The reader -> prior -> writer pipeline with a deterministic fake prior: no network, no model."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from fakes import LinearPrior, Member, ThreadGroup

from coopt_hub.errors import PriorError, ShardFileError
from coopt_hub.participant.collective import SingleProcess
from coopt_hub.participant.labeling import Chunk, ChunkStore, collect_chunks, label_chunks, rank_chunks

SIZE = LinearPrior.SIZE


def image_cell(sample_id: int) -> dict[str, Any]:
    rng = np.random.default_rng(sample_id)
    pixels = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    pixels[0, 0, 0] = sample_id  # where LinearPrior reads the id; ids stay below 256 here
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def make_chunks(sizes: Sequence[int], broken: Sequence[int] = (), loads: list[str] | None = None) -> list[Chunk]:
    chunks, start = [], 0
    for index, size in enumerate(sizes):
        ids = np.arange(start, start + size, dtype=np.int64)
        name = f"unit-{index:05d}"

        def load(ids=ids, name=name):
            if loads is not None:
                loads.append(name)
            return [{"bytes": b"not an image", "path": None} if int(i) in broken else image_cell(int(i)) for i in ids]

        chunks.append(Chunk(name, ids, load))
        start += size
    return chunks


def expected_features(prior: LinearPrior, ids: np.ndarray) -> np.ndarray:
    from coopt_hub.core.align import normalize
    from coopt_hub.priors import decode_image

    pixels = torch.stack([prior.preprocess(decode_image(image_cell(int(i)))) for i in ids])
    return normalize((pixels.reshape(len(ids), -1) @ prior.weights).numpy())


def test_chunks_are_encoded_in_fixed_batches_and_stored(tmp_path):
    prior, store = LinearPrior(), ChunkStore(tmp_path)
    chunks = make_chunks([10, 3, 7])
    stats = label_chunks(prior, chunks, store, batch_size=4, workers=3)
    assert stats.computed == [c.name for c in chunks]
    assert stats.reused == []
    assert stats.images == 20
    # Batches never straddle chunks: their composition depends on the chunk alone.
    assert prior.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12], [13, 14, 15, 16], [17, 18, 19]]
    for chunk in chunks:
        output = store.read(chunk.name)
        np.testing.assert_array_equal(output.ids, chunk.ids, err_msg=chunk.name)
        np.testing.assert_allclose(output.features, expected_features(prior, chunk.ids), rtol=1e-5, atol=1e-6,
                                   err_msg=chunk.name)
        assert output.bad_ids.size == 0, chunk.name
        assert store.marker(chunk.name)["rows"] == len(chunk.ids), chunk.name


def test_rerun_skips_finished_chunks_and_ignores_partial_writes(tmp_path):
    store = ChunkStore(tmp_path)
    chunks = make_chunks([5, 5, 5])
    label_chunks(LinearPrior(), chunks[:1], store, batch_size=2, workers=2)
    # A write killed half-way leaves data without a marker: it does not count as finished.
    store.data_path(chunks[1].name).parent.mkdir(parents=True, exist_ok=True)
    store.data_path(chunks[1].name).write_bytes(b"partial")
    first = store.data_path(chunks[0].name).stat().st_mtime_ns
    loads: list[str] = []
    prior = LinearPrior()
    stats = label_chunks(prior, make_chunks([5, 5, 5], loads=loads), store, batch_size=2, workers=2)
    assert stats.reused == ["unit-00000"]
    assert stats.computed == ["unit-00001", "unit-00002"]
    assert loads == ["unit-00001", "unit-00002"], "a finished chunk's images were read again"
    assert store.data_path(chunks[0].name).stat().st_mtime_ns == first
    np.testing.assert_array_equal(store.read("unit-00001").ids, np.arange(5, 10))
    assert label_chunks(prior, chunks, store, batch_size=2, workers=2).computed == []


def test_damaged_chunk_is_discarded_so_a_rerun_recomputes_it(tmp_path):
    store = ChunkStore(tmp_path)
    chunks = make_chunks([4])
    label_chunks(LinearPrior(), chunks, store, batch_size=4, workers=1)
    path = store.data_path("unit-00000")
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ShardFileError, match="damaged"):
        store.read("unit-00000")
    assert label_chunks(LinearPrior(), chunks, store, batch_size=4, workers=1).computed == ["unit-00000"]


def test_undecodable_images_are_recorded_and_left_out(tmp_path):
    store = ChunkStore(tmp_path)
    stats = label_chunks(LinearPrior(), make_chunks([6, 6], broken=[2, 7]), store, batch_size=4, workers=2)
    assert stats.bad_ids == [2, 7]
    first = store.read("unit-00000")
    np.testing.assert_array_equal(first.ids, [0, 1, 3, 4, 5])
    np.testing.assert_array_equal(first.bad_ids, [2])
    assert store.marker("unit-00001")["bad_ids"] == [7]


def test_stop_on_bad_image_keeps_the_chunk_and_starts_no_other(tmp_path):
    store = ChunkStore(tmp_path)
    stats = label_chunks(LinearPrior(), make_chunks([4, 4, 4], broken=[5]), store, batch_size=2, workers=1,
                         stop_on_bad_image=True)
    assert stats.computed == ["unit-00000", "unit-00001"]
    assert stats.bad_ids == [5]
    assert not store.is_complete("unit-00002"), "a chunk after the bad image was started"
    # A rerun that still refuses bad images stops at the stored chunk without encoding anything.
    again = label_chunks(LinearPrior(), make_chunks([4, 4, 4], broken=[5]), store, batch_size=2, workers=1,
                         stop_on_bad_image=True)
    assert again.computed == [], "the rerun encoded again"
    assert again.bad_ids == [5], "the rerun does not name the bad image"


def test_non_finite_outputs_raise_prior_error_naming_the_ids(tmp_path):
    store = ChunkStore(tmp_path)
    with pytest.raises(PriorError, match=r"2 sample\(s\): ids 5, 6"):
        label_chunks(LinearPrior(nan_ids=[5, 6]), make_chunks([4, 4, 4]), store, batch_size=4, workers=2)
    assert store.is_complete("unit-00000"), "the chunk before the NaN was not kept"
    assert not store.is_complete("unit-00001"), "the chunk with the NaN was stored"


def test_reader_errors_reach_the_caller(tmp_path):
    def broken_load():
        raise ConnectionError("range read failed")

    chunks = make_chunks([3]) + [Chunk("unit-00001", np.arange(3, 6), broken_load)]
    with pytest.raises(ConnectionError, match="range read failed"):
        label_chunks(LinearPrior(), chunks, ChunkStore(tmp_path), batch_size=2, workers=2)


@pytest.mark.parametrize("shared", [False, True], ids=["separate-workdirs", "shared-workdir"])
def test_two_ranks_give_the_same_chunks_as_one(tmp_path, shared):
    sizes = [5, 3, 4, 6, 2]
    single = ChunkStore(tmp_path / "single")
    label_chunks(LinearPrior(), make_chunks(sizes), single, batch_size=4, workers=2)
    collect_chunks(single, [c.name for c in make_chunks(sizes)], SingleProcess())

    group = ThreadGroup(2)
    stores = [ChunkStore(tmp_path / ("shared" if shared else f"rank{r}")) for r in range(2)]

    def work(member: Member):
        chunks = make_chunks(sizes)
        mine = rank_chunks(chunks, member.rank, member.world_size)
        stats = label_chunks(LinearPrior(), mine, stores[member.rank], batch_size=4, workers=2)
        collect_chunks(stores[member.rank], [c.name for c in chunks], member)
        return stats.computed

    computed = group.run(work)
    assert computed == [["unit-00000", "unit-00002", "unit-00004"], ["unit-00001", "unit-00003"]]
    # Without a shared directory, rank 0 receives exactly the chunks it lacks; with one, nothing travels.
    assert group.broadcasts == (0 if shared else 2)
    for chunk in make_chunks(sizes):
        assert stores[0].data_path(chunk.name).read_bytes() == single.data_path(chunk.name).read_bytes(), chunk.name
