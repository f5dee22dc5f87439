"""Long-lived decoder sessions: the decoding engine of the nvdec loader mode (pipelines/nvdec.py).

DALI's mixed decoder pays, for every sample, a container open, a parser, eight frame buffers
and (without an exact size match) a new NVDEC decoder, then keeps one frame in flight
(research/nvdec.md); for a 30-frame segment that set-up is most of the cost. Here a small
pool of sessions, about one per NVDEC engine (an H100 or H200 has 7), each on a thread of its
own and owning one decoder for its whole life, decodes the segments of every clip of every
epoch. A clip goes to one session whole (its one or two segments back to back), into a
preallocated buffer; the pool hands back a batch in order, and a clip that fails is named
with its reason instead of failing the batch.

Two sessions implement the interface: NvdecSession (spdl-io's NVDEC decoder, which spdl keeps
per thread and reconfigures rather than recreates for a new frame size) and PyAVSession (the
same on the CPU with FFmpeg's decoder through PyAV), which is what CI runs the pool with.
"""
from __future__ import annotations

import io
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ClipJob:
    """One clip: the segments it touches (bytes, first frame, frames) and where its frames go."""
    index: int
    pieces: list[tuple[bytes, int, int]]
    out: object  # T,H,W,3 uint8 (a numpy array, or a CUDA tensor for NVDEC), filled by a session
    after: object = None  # on the GPU: an event the session's stream waits on before writing `out`


@dataclass
class ClipResult:
    index: int
    error: str | None = None
    marker: object = None  # what the consumer waits on before reading `out` (a CUDA event on the GPU)
    slot: int = -1


class PyAVSession:
    """A CPU decoder that lives across segments: one FFmpeg codec context, drained and flushed
    after each segment (every segment starts with a key frame), fed demuxed packets."""

    def __init__(self, codec: str, slot: int):
        import av

        self.av, self.codec, self.slot = av, codec, slot
        self.decoder = av.CodecContext.create(codec, "r")
        self.decoder.thread_count = 1  # the pool parallelises across sessions
        self.decoders_created = 1

    def _packets(self, container):
        stream = container.streams.video[0]
        if self.codec != "h264":
            yield from container.demux(stream)
            return
        # MP4 stores H.264 with length prefixes and its parameter sets in the container; a bare
        # decoder wants them in-band (Annex B), as NVDEC does.
        annexb = self.av.BitStreamFilterContext("h264_mp4toannexb", stream)
        for packet in container.demux(stream):
            yield from annexb.filter(packet if packet.size else None)

    def decode(self, segment: bytes, first: int, count: int, out: np.ndarray):
        got = 0
        with self.av.open(io.BytesIO(segment)) as container:
            for packet in self._packets(container):
                if packet.size == 0 or got >= first + count:
                    continue
                for frame in self.decoder.decode(packet):
                    if first <= got < first + count:
                        out[got - first] = frame.to_ndarray(format="rgb24")
                    got += 1
        for frame in self.decoder.decode(None):  # drain what the decoder still holds
            if first <= got < first + count:
                out[got - first] = frame.to_ndarray(format="rgb24")
            got += 1
        self.decoder.flush_buffers()  # a drained context takes packets again only after a flush
        if got < first + count:
            raise ValueError(f"{got} frames, {first + count} wanted")

    def begin(self, after):
        pass

    def done(self):
        return None


class NvdecSession:
    """An NVDEC session through spdl-io: spdl keeps one decoder per thread and, for a segment of
    the same codec, reconfigures it instead of creating a new one (creating costs 50-300 ms,
    reconfiguring 5-6; research/nvdec.md). Each session has its own CUDA stream; frames land in
    the clip's buffer on it, and done() records an event the consumer's stream waits on, so no
    host thread waits for the GPU per clip. Written against spdl-io 0.8's documented API; the
    gpu tests and `stica-bench --gpu-check --parts nvdec` are what prove it on a GPU."""

    # The packer leaves the colour matrix untagged, and FFmpeg converts untagged SD video with
    # BT.601; NVDEC frames are converted the same way so the modes' pixels agree.
    BT601 = 6

    def __init__(self, codec: str, slot: int, device_index: int = 0):
        import spdl.io

        self.io, self.codec, self.slot = spdl.io, codec, slot
        self.device = torch.device("cuda", device_index)
        self.stream = torch.cuda.Stream(self.device)
        # spdl allocates through torch's caching allocator on this session's stream, so decoded
        # surfaces are pooled memory rather than a cudaMalloc per segment.
        self.cuda = spdl.io.cuda_config(device_index, stream=self.stream.cuda_stream,
                                        allocator=(torch.cuda.caching_allocator_alloc,
                                                   torch.cuda.caching_allocator_delete))
        self.decoders, self.decoders_created = set(), 0

    def decode(self, segment: bytes, first: int, count: int, out: torch.Tensor):
        packets = self.io.demux_video(segment)
        if self.codec == "h264":
            packets = self.io.apply_bsf(packets, "h264_mp4toannexb")
        decoder = self.io.nvdec_decoder(self.cuda, packets.codec)  # this thread's decoder, reconfigured
        if id(decoder) not in self.decoders:
            self.decoders.add(id(decoder))
            self.decoders_created += 1
        rgb = self.io.to_torch(self.io.nv12_to_rgb(decoder.decode_packets(packets), device_config=self.cuda,
                                                   coeff=self.BT601))  # N,3,H,W
        if rgb.shape[0] < first + count:
            raise ValueError(f"{rgb.shape[0]} frames, {first + count} wanted")
        with torch.cuda.stream(self.stream):
            out[:count].copy_(rgb[first:first + count].permute(0, 2, 3, 1))

    def begin(self, after):
        if after is not None:  # the buffer's previous clip has been copied out by then
            self.stream.wait_event(after)

    def done(self):
        event = torch.cuda.Event()
        event.record(self.stream)
        return event


@dataclass
class _Batch:
    results: list
    remaining: int
    finished: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionPool:
    """`count` sessions, each created once on a thread of its own and kept until close(). Jobs
    go to whichever session is free (one queue: a slow clip holds one session, not a batch).
    submit() returns at once; results() waits for that batch and gives it in job order."""

    def __init__(self, make_session, count: int, timeout: float = 300.0):
        if count < 1:
            raise ValueError(f"data.sessions must be at least 1, not {count}")
        self.timeout = timeout
        self.jobs: queue.Queue = queue.Queue()
        self.sessions: list = [None] * count
        self.clips = [0] * count
        ready = threading.Barrier(count + 1)
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._serve, args=(slot, make_session, ready), daemon=True,
                                         name=f"stica-decoder-{slot}") for slot in range(count)]
        for t in self.threads:
            t.start()
        ready.wait()
        if self.errors:
            self.close()
            raise RuntimeError(f"a decoder session could not start: {self.errors[0]}") from self.errors[0]

    def _serve(self, slot, make_session, ready):
        try:
            self.sessions[slot] = make_session(slot)
        except BaseException as e:  # reported by the constructor, which is waiting
            self.errors.append(e)
        ready.wait()
        session = self.sessions[slot]
        while (item := self.jobs.get()) is not None:
            batch, job = item
            result = ClipResult(job.index, slot=slot)
            if session is not None:
                try:
                    session.begin(job.after)
                    done = 0
                    for k, (segment, first, count) in enumerate(job.pieces):
                        try:
                            session.decode(segment, first, count, job.out[done:])
                        except Exception as e:
                            raise ValueError(f"segment {k + 1} of the clip's {len(job.pieces)}: "
                                             f"{type(e).__name__}: {e}") from e
                        done += count
                    if done < len(job.out):  # past the video's end: repeat its last frame
                        job.out[done:] = job.out[done - 1:done]
                    result.marker = session.done()
                except Exception as e:
                    result.error = str(e)[:300]
            self.clips[slot] += 1
            batch.results[job.index] = result
            with batch.lock:
                batch.remaining -= 1
                if batch.remaining == 0:
                    batch.finished.set()

    def submit(self, jobs: list[ClipJob]) -> _Batch:
        batch = _Batch([None] * len(jobs), len(jobs))
        if not jobs:
            batch.finished.set()
        for job in jobs:
            self.jobs.put((batch, job))
        return batch

    def results(self, batch: _Batch) -> list[ClipResult]:
        # A decoder that hangs (a driver fault, a stuck engine) must stop the run with a reason,
        # not stall it silently: the clips still out are named by their place in the batch.
        if not batch.finished.wait(self.timeout):
            late = [i for i, r in enumerate(batch.results) if r is None]
            raise RuntimeError(f"decoder sessions gave no result for clip(s) {late} of a batch in {self.timeout:.0f} s")
        return batch.results

    @property
    def decoders_created(self) -> list[int]:
        """Per session slot: the decoders it created (1 each, however many clips it decoded)."""
        return [s.decoders_created if s is not None else 0 for s in self.sessions]

    def close(self):
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()


class FrameRing:
    """Preallocated clip buffers: `depth` batches of `batch_size` clips, each a flat uint8 arena
    viewed as T,H,W,3 for the clip it holds. An arena grows only when a clip is larger than any
    before it in that place, so over an epoch of one frame size the ring allocates depth x
    batch_size buffers once. The loader cycles through the depth and must not write a batch's
    buffers before the pipeline has copied them (it keeps depth above DALI's prefetch)."""

    def __init__(self, depth: int, batch_size: int, device: torch.device):
        self.depth, self.device = depth, device
        self.arenas = [[torch.empty(0, dtype=torch.uint8, device=device) for _ in range(batch_size)]
                       for _ in range(depth)]
        self.allocations = 0

    def clip(self, batch: int, index: int, shape: tuple[int, ...]):
        arenas = self.arenas[batch % self.depth]
        size = int(np.prod(shape))
        if arenas[index].numel() < size:
            arenas[index] = torch.empty(size, dtype=torch.uint8, device=self.device)
            self.allocations += 1
        view = arenas[index][:size].view(shape)
        return view.numpy() if self.device.type == "cpu" else view
