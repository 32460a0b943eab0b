"""Reader -> prior -> writer: encode a participant's chunks of images, resumably.

A job is cut into chunks (participant/chunks.py: one per storage unit of the shard, plus fixed-size
slices of the anchors). Chunk i belongs to rank i % world_size, and a chunk's batches are cut from
the chunk alone, so every image meets the prior in the same batch whatever the number of processes:
the outputs do not depend on how the job was distributed.

Each finished chunk is written to the ChunkStore, data first and its completion marker after, both
by atomic rename; a rerun skips chunks that have a marker. Reading, decoding and preprocessing run
on background threads (decoding there, in worker processes or on the GPU: the decode path of
participant/decode.py) while the calling thread runs the forward pass, and a writer thread stores
finished chunks, so the prior is never left waiting on I/O. A bounded queue keeps a few batches
prepared ahead; for a GPU prior they sit in pinned buffers and travel with non-blocking copies.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from coopt_hub.core import faults
from coopt_hub.core.align import normalize
from coopt_hub.core.files import write_bytes_atomically
from coopt_hub.core.progress import Bar, Progress, Silent
from coopt_hub.errors import PriorError, ShardFileError, id_list
from coopt_hub.participant.collective import Collective
from coopt_hub.participant.decode import (
    GpuDecoder,
    decode_batch,
    decode_in_worker,
    decode_path,
    init_worker,
)
from coopt_hub.priors import Prior


@dataclass(frozen=True, eq=False)
class Chunk:
    """One unit of resumable work: `load()` returns the image cells of `ids`, in that order."""

    name: str
    ids: np.ndarray
    load: Callable[[], Sequence[Any]] = field(repr=False)


@dataclass
class ChunkOutput:
    name: str
    ids: np.ndarray  # int64, the encoded rows in chunk order (undecodable ones left out)
    features: np.ndarray  # float32 [len(ids), output_dim], L2-normalised prior outputs
    bad_ids: np.ndarray  # int64, rows whose image could not be decoded


@dataclass
class LabelingStats:
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    images: int = 0  # images encoded by this call
    seconds: float = 0.0
    bad_ids: list[int] = field(default_factory=list)  # over this rank's finished chunks, reused ones included
    first_batch_s: float | None = None  # from the start of this call to its first encoded batch


class ChunkStore:
    """Chunk outputs under one directory: `chunks/{name}.safetensors`, completed by `done/{name}.json`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.chunks = self.directory / "chunks"
        self.markers = self.directory / "done"

    def data_path(self, name: str) -> Path:
        return self.chunks / f"{name}.safetensors"

    def marker_path(self, name: str) -> Path:
        return self.markers / f"{name}.json"

    def marker(self, name: str) -> dict[str, Any] | None:
        """The completion marker, or None while the chunk is unfinished."""
        try:
            return json.loads(self.marker_path(name).read_text())
        except FileNotFoundError:
            return None

    def is_complete(self, name: str) -> bool:
        return self.marker_path(name).is_file() and self.data_path(name).is_file()

    def write(self, output: ChunkOutput) -> None:
        data = save_tensors(
            {
                "ids": np.ascontiguousarray(output.ids, dtype=np.int64),
                "features": np.ascontiguousarray(output.features, dtype=np.float32),
                "bad_ids": np.ascontiguousarray(output.bad_ids, dtype=np.int64),
            }
        )
        marker = {"sha256": hashlib.sha256(data).hexdigest(), "rows": int(len(output.ids)),
                  "bad_ids": [int(i) for i in output.bad_ids]}
        self.put(output.name, data, marker)

    def put(self, name: str, data: bytes, marker: dict[str, Any]) -> None:
        """Store a chunk's bytes, then its marker: a marker never points at missing or partial data."""
        write_bytes_atomically(self.data_path(name), data)
        faults.reach("chunk-data")
        write_bytes_atomically(self.marker_path(name), json.dumps(marker, sort_keys=True).encode())

    def export(self, name: str) -> tuple[bytes, dict[str, Any]]:
        """The chunk as it travels between machines: its bytes and its marker."""
        marker = self.marker(name)
        if marker is None:
            raise ShardFileError(f"Chunk {name} is not finished in {self.directory}.")
        return self.data_path(name).read_bytes(), marker

    def read(self, name: str) -> ChunkOutput:
        data, marker = self.export(name)
        if hashlib.sha256(data).hexdigest() != marker["sha256"]:
            # Forget the damaged chunk so the next run computes it again instead of failing here again.
            self.marker_path(name).unlink(missing_ok=True)
            raise ShardFileError(
                f"Chunk file {self.data_path(name)} is damaged (checksum mismatch); it has been discarded.",
                hint="Rerun the same command: only that chunk is computed again.",
            )
        tensors = load_tensors(data)
        return ChunkOutput(name=name, ids=tensors["ids"], features=tensors["features"], bad_ids=tensors["bad_ids"])


def rank_chunks(chunks: Sequence[Chunk], rank: int, world_size: int) -> list[Chunk]:
    """The chunks rank `rank` encodes: chunk i goes to rank i % world_size."""
    return list(chunks[rank::world_size])


@dataclass
class _Batch:
    chunk: Chunk
    last: bool
    prepared: Future  # -> (pixels | None, kept ids, bad ids, buffer holding the pixels | None)


class _PixelBuffers:
    """Batch tensors reused from batch to batch.

    A fresh ~40 MB batch tensor per batch costs more in page faults than copying the images into it
    (measured: 0.49 vs 0.06 ms per image). Taking never waits, so a batch that the encoding thread
    needs next can never be stuck behind later ones holding every buffer; the number of buffers
    stays bounded by the batches in flight.
    """

    def __init__(self, batch_size: int, pinned: bool = False):
        self.batch_size = batch_size
        self.pinned = pinned  # page-locked, for copies to a GPU that do not hold up the host
        self._free: queue.SimpleQueue = queue.SimpleQueue()

    def take(self, image: torch.Tensor) -> torch.Tensor:
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            buffer = None
        if buffer is None or buffer.shape[1:] != image.shape or buffer.dtype != image.dtype:
            buffer = torch.empty((self.batch_size, *image.shape), dtype=image.dtype, pin_memory=self.pinned)
        return buffer

    def give_back(self, buffer: torch.Tensor) -> None:
        self._free.put(buffer)


@dataclass
class _ReaderFailed:
    error: BaseException


_END = object()


def _serial_torch_ops() -> None:
    """Run this thread's torch ops without an OpenMP team of their own.

    Preparing threads apply small per-image tensor ops; by default each op starts a team as large as
    the machine, and those teams fight the forward pass for the cores (measured on 2 busy cores:
    2 ms -> 40 ms per image). torch.set_num_threads is process-wide and would slow the forward pass
    too, while OpenMP's own thread count is a per-thread setting.
    """
    torch.get_num_threads()  # torch's lazy per-thread OpenMP setup runs first and would undo ours
    try:
        ctypes.CDLL(None).omp_set_num_threads(1)
    except AttributeError:  # no OpenMP runtime loaded: torch runs on another parallel backend
        pass


def prepare_pixels(prior: Prior, cells: Sequence[Any], ids: np.ndarray) -> tuple[torch.Tensor | None, np.ndarray]:
    """One batch decoded and preprocessed on this thread: (pixels or None, the ids of its rows)."""
    tensors, kept, _ = decode_batch(prior.preprocess, cells, ids)
    return (torch.stack(tensors) if tensors else None), np.asarray(kept, dtype=np.int64)


def _prepare(
    prior: Prior, buffers: _PixelBuffers, cells: Sequence[Any], ids: np.ndarray
) -> tuple[torch.Tensor | None, np.ndarray, list[int], torch.Tensor | None]:
    """Decode and preprocess one batch; undecodable images are reported, not raised."""
    tensors, kept, bad = decode_batch(prior.preprocess, cells, ids)
    return _stacked(buffers, tensors, kept, bad)


def _stacked(
    buffers: _PixelBuffers, tensors: Sequence[torch.Tensor], kept: list[int], bad: list[int]
) -> tuple[torch.Tensor | None, np.ndarray, list[int], torch.Tensor | None]:
    kept_ids = np.asarray(kept, dtype=np.int64)
    if not len(tensors):
        return None, kept_ids, bad, None
    buffer = buffers.take(tensors[0])
    return torch.stack(list(tensors), out=buffer[: len(tensors)]), kept_ids, bad, buffer


def _prepare_in_process(
    processes: ProcessPoolExecutor, buffers: _PixelBuffers, cells: Sequence[Any], ids: np.ndarray
) -> tuple[torch.Tensor | None, np.ndarray, list[int], torch.Tensor | None]:
    """Decode in a worker process; this thread waits, then copies the pixels into a (pinned) buffer."""
    pixels, kept, bad = processes.submit(decode_in_worker, cells, ids).result()
    return _stacked(buffers, [] if pixels is None else pixels.unbind(), kept, bad)


def _prepare_on_gpu(
    decoder: GpuDecoder, cells: Sequence[Any], ids: np.ndarray
) -> tuple[torch.Tensor | None, np.ndarray, list[int], None]:
    pixels, kept, bad = decoder(cells, ids)
    return pixels, np.asarray(kept, dtype=np.int64), bad, None


def _encode(prior: Prior, pixels: torch.Tensor, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        output = prior.encode_batch(pixels)
    features = output.detach().to(device="cpu", dtype=torch.float32).numpy()
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():
        bad = [int(i) for i in ids[~finite]]
        raise PriorError(
            f"The prior produced NaN or infinite outputs for {len(bad)} sample(s): ids {id_list(bad)}.",
            hint="Check the checkpoint; with --precision fp16 try bf16 or fp32, which do not overflow.",
        )
    return normalize(features)




def label_chunks(
    prior: Prior,
    chunks: Sequence[Chunk],
    store: ChunkStore,
    *,
    batch_size: int,
    workers: int,
    stop_on_bad_image: bool = False,
    progress: Progress = Silent(),
    description: str = "Encoding",
    decode: str | None = None,
) -> LabelingStats:
    """Encode every chunk that `store` does not hold yet, and store it.

    `workers` threads (or processes) decode and preprocess batches ahead of the prior, by the decode path
    `decode` (participant/decode.py; default: the prior's). With `stop_on_bad_image`,
    the first chunk that holds an undecodable image is still stored (nothing is lost) and then no
    further chunk is started, so a broken source is reported early. The pixels handed to
    `prior.encode_batch` are reused for a later batch once it has returned. `progress` draws a bar
    named `description` over the images to encode.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size and workers must be at least 1, got {batch_size} and {workers}.")
    stats, todo = _reuse_finished(chunks, store, stop_on_bad_image)
    if not todo:
        return stats
    started = time.perf_counter()
    images = int(sum(len(chunk.ids) for chunk in todo))
    # Exits run in reverse: the reader stops before the writer drains, so a failure does not wait on reads.
    with (
        _ChunkWriter(store) as writer,
        _Prefetcher(prior, todo, batch_size, workers, decode) as batches,
        progress.bar(images, description, unit="img") as bar,
    ):
        _encode_chunks(prior, batches, writer, bar, stats, stop_on_bad_image, started)
    stats.seconds = time.perf_counter() - started
    return stats


def _reuse_finished(
    chunks: Sequence[Chunk], store: ChunkStore, stop_on_bad_image: bool
) -> tuple[LabelingStats, list[Chunk]]:
    """The stats of the chunks `store` holds already, and the chunks left to encode (none when a
    finished chunk holds an undecodable image and `stop_on_bad_image`)."""
    stats = LabelingStats()
    todo: list[Chunk] = []
    for chunk in chunks:
        marker = store.marker(chunk.name) if store.is_complete(chunk.name) else None
        if marker is None:
            todo.append(chunk)
            continue
        stats.reused.append(chunk.name)
        stats.bad_ids.extend(marker["bad_ids"])
        if stop_on_bad_image and marker["bad_ids"]:
            return stats, []
    return stats, todo


@dataclass
class _ChunkParts:
    """The encoded batches of the chunk being encoded, until its last batch."""

    ids: list[np.ndarray] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    bad_ids: list[int] = field(default_factory=list)

    def output(self, name: str, output_dim: int) -> ChunkOutput:
        return ChunkOutput(
            name=name,
            ids=np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=np.int64),
            features=np.concatenate(self.features) if self.features else np.zeros((0, output_dim), np.float32),
            bad_ids=np.asarray(self.bad_ids, dtype=np.int64),
        )


def _encode_chunks(
    prior: Prior, batches: _Prefetcher, writer: _ChunkWriter, bar: Bar, stats: LabelingStats, stop_on_bad_image: bool,
    started: float,
) -> None:
    """The forward pass, on the calling thread: prepared batches in, finished chunks handed to the writer."""
    parts = _ChunkParts()
    for batch in batches:
        pixels, kept, bad, buffer = batch.prepared.result()
        if pixels is not None:
            parts.features.append(_encode(prior, pixels, kept))
            if stats.first_batch_s is None:
                stats.first_batch_s = time.perf_counter() - started
            if buffer is not None:
                batches.release(buffer)
            faults.reach("encode")
            parts.ids.append(kept)
            stats.images += len(kept)
        parts.bad_ids.extend(bad)
        bar.update(len(kept) + len(bad))
        if not batch.last:
            continue
        writer.submit(parts.output(batch.chunk.name, prior.output_dim))
        stats.computed.append(batch.chunk.name)
        stats.bad_ids.extend(parts.bad_ids)
        if stop_on_bad_image and parts.bad_ids:
            return
        parts = _ChunkParts()
        writer.raise_failed()  # a failed write surfaces now rather than after the whole shard


class _Prefetcher:
    """Reads chunks on a thread and prepares their batches ahead of the encoder, by the prior's decode
    path (participant/decode.py): on `workers` threads, in `workers` processes, or on the GPU.

    Iterating yields the batches in order; an error while reading is raised there.
    """

    def __init__(self, prior: Prior, chunks: Sequence[Chunk], batch_size: int, workers: int,
                 path: str | None = None):
        self.prior, self.chunks, self.batch_size = prior, chunks, batch_size
        self.path = path or decode_path(prior)
        self.stop = threading.Event()
        # Room for one batch being encoded and one ready per worker: enough to keep the prior fed,
        # few enough that prefetched pixels stay a small multiple of one batch.
        self.queue: queue.Queue = queue.Queue(maxsize=workers + 1)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="coopt-prepare",
                                       initializer=_serial_torch_ops)
        device = getattr(prior, "device", None)
        self.buffers = _PixelBuffers(batch_size, pinned=device is not None and device.type == "cuda")
        self.processes = self.gpu = None
        if self.path == "processes":
            # spawn: a forked child of a process that holds CUDA or OpenMP threads can hang.
            self.processes = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), init_worker,
                                                 (prior.preprocessing.to_dict(),))
        elif self.path == "gpu":
            self.gpu = GpuDecoder(prior.preprocessing, device)
        self.reader = threading.Thread(target=self._read, name="coopt-read", daemon=True)

    def __enter__(self) -> _Prefetcher:
        self.reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.reader.join()
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.processes is not None:
            self.processes.shutdown(wait=True, cancel_futures=True)

    def __iter__(self) -> Iterator[_Batch]:
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if isinstance(item, _ReaderFailed):
                raise item.error
            yield item

    def release(self, buffer: torch.Tensor) -> None:
        """The encoder is done with a batch's pixels: a later batch may reuse them."""
        self.buffers.give_back(buffer)

    def _submit(self, cells: Sequence[Any], ids: np.ndarray) -> Future:
        if self.processes is not None:
            return self.pool.submit(_prepare_in_process, self.processes, self.buffers, cells, ids)
        if self.gpu is not None:
            return self.pool.submit(_prepare_on_gpu, self.gpu, cells, ids)
        return self.pool.submit(_prepare, self.prior, self.buffers, cells, ids)

    def _offer(self, item: object) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            for chunk in self.chunks:
                if self.stop.is_set():
                    return
                cells = chunk.load()
                if len(cells) != len(chunk.ids):
                    raise ShardFileError(f"Chunk {chunk.name} loaded {len(cells)} images for {len(chunk.ids)} ids.")
                for start in range(0, len(chunk.ids), self.batch_size):
                    stop_at = start + self.batch_size
                    future = self._submit(cells[start:stop_at], chunk.ids[start:stop_at])
                    if not self._offer(_Batch(chunk, last=stop_at >= len(chunk.ids), prepared=future)):
                        return
            self._offer(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the encoding thread, which raises it
            self._offer(_ReaderFailed(err))


class _ChunkWriter:
    """Stores finished chunks on a thread of its own; on a clean exit, waits for them and raises a failed write."""

    def __init__(self, store: ChunkStore):
        self.store = store
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coopt-write")
        self.writes: list[Future] = []

    def __enter__(self) -> _ChunkWriter:
        return self

    def __exit__(self, error_type: type[BaseException] | None, *exc: object) -> None:
        self.pool.shutdown(wait=True)
        if error_type is None:
            for write in self.writes:
                write.result()

    def submit(self, output: ChunkOutput) -> None:
        self.writes.append(self.pool.submit(self.store.write, output))

    def raise_failed(self) -> None:
        for done in [write for write in self.writes if write.done()]:
            done.result()


def collect_chunks(store: ChunkStore, names: Sequence[str], collective: Collective, root: int = 0) -> None:
    """Bring every chunk in `names` into `root`'s store, from whichever rank holds it.

    Nothing travels when the ranks share the work directory. Otherwise each missing chunk is
    broadcast by one rank that has it, one chunk at a time, so no message exceeds one chunk.
    """
    collective.barrier()  # every rank has stored its chunks: a shared directory now shows them all
    held = collective.all_gather(sorted(name for name in names if store.is_complete(name)))
    held_sets = [set(names_of_rank) for names_of_rank in held]
    for name in names:
        if name in held_sets[root]:
            continue
        owner = next((rank for rank, names_of_rank in enumerate(held_sets) if name in names_of_rank), None)
        if owner is None:
            raise ShardFileError(f"No process holds a finished chunk {name}.", hint="Rerun the same command.")
        payload = collective.broadcast(store.export(name) if collective.rank == owner else None, src=owner)
        if collective.rank == root:
            store.put(name, *payload)
