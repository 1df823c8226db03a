"""MPI transport: headers and raw tensor bytes through mpi4py's buffer interface.

Each message is two MPI messages from the same sender: the packed int64 header
with tag ``HEADER_TAG`` and, when the payload has any bytes, the tensor's raw
bytes as ``MPI.BYTE`` with tag ``PAYLOAD_TAG``. MPI keeps messages between a
pair in order per tag, so the n-th payload from a rank belongs to the n-th
header from it; the receiver takes a header (from one rank or any) and then
that rank's next payload. Nothing is pickled.

Headers are received through one receive from any rank that is always
posted (:class:`_HeaderInbox`); a header from a rank nobody is waiting for
yet is kept until a receive asks for that rank.

Sends are ``Isend`` and never wait for the receiver: the server hands round
parameters to ranks that are still busy. The request and its buffer stay in a
pending list until MPI is done with them; ``close`` waits for the rest.

Launch the conformance test by hand with::

    mpiexec -n 3 python tests/mpi/transport_conformance.py mpi
"""

from __future__ import annotations

import ctypes
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from mpi4py import MPI

from ..node import NodeLayout, node_layout, poll_until, true_or_none
from .protocol import (ANY_SOURCE, HEADER_LEN, Header, Kind, Message, PayloadTimeout, ProtocolError, check_arrived,
                       header_bytes, outgoing, unpack_words)

HEADER_TAG = 0x5346  # distinct tags keep the posted header receive from ever matching a payload
PAYLOAD_TAG = 0x5347
#: How long ``close`` waits for sends still in flight before it gives up.
CLOSE_TIMEOUT_S = 60.0

# Waiting without a blocking call: MPI has no timed receive, and a blocking
# MPI_Recv in MPICH spins a core at 100%. How long a wait spins before it
# naps depends on the node:
# - Oversubscribed (more ranks than CPUs: up to 50 ranks on 2 cores) a rank
#   that waits long must leave the CPU to the ranks that compute. It spins on
#   the probe for a moment (a ping-pong reply usually arrives within it),
#   yielding the core to any other runnable rank, then sleeps in doubling steps
#   capped at 1 ms: at most ~1 ms of added latency once a wait has gone on that
#   long, small next to a ViT forward, for ~1% of a core.
# - With a CPU per rank nobody needs the core, and naps cost more than they
#   save: when both ends of an exchange nap, each reply waits for the other's
#   nap, and a ping-pong can lock into ~1.3 ms round trips instead of 0.2 ms
#   (measured, 1 MB on 2 cores). So the wait spins for DEDICATED_SPIN_S first.
# (SPIN_S, DEDICATED_SPIN_S and poll_until live in node.py, where the start-up log and the
# agreed setup stages use them too.)
# A payload whose header has arrived is already on its way and needs our calls
# into MPI to progress, so its wait spins longer before it naps.
_PAYLOAD_SPIN_S = 5e-2
# After sending a large payload the reply may follow as soon as the peer has
# received it, which for large messages takes longer than SPIN_S: a nap then
# adds up to 1 ms per message (16 MB ping-pong on 2 cores: 3.8 ms round trip
# instead of 2.9 ms). So the next receive spins for about the time such a
# payload takes to move at _SPIN_RATE bytes/s, within [SPIN_S, _PAYLOAD_SPIN_S].
# Small payloads, the many-ranks-per-core case, keep the 1 ms spin.
_SPIN_RATE = 1e9


_cuda_aware: bool | None = None


def cuda_aware_mpi() -> bool:
    """Whether the MPI library can read and write CUDA device memory.

    ``SFPROMPT_CUDA_AWARE=1`` (or ``0``) decides; otherwise the loaded libmpi is
    asked through ``MPIX_Query_cuda_support`` (MPICH and Open MPI export it),
    and a library without that query is taken as not CUDA-aware.
    """
    global _cuda_aware
    if _cuda_aware is None:
        env = os.environ.get("SFPROMPT_CUDA_AWARE", "").strip()
        _cuda_aware = env == "1" if env else _query_libmpi_cuda()
    return _cuda_aware


def _query_libmpi_cuda() -> bool:
    # mpi4py does not wrap the MPIX query, so find the libmpi it loaded and ask it.
    paths: set[str] = set()
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libmpi" in line and "/" in line}
    except OSError:
        pass
    for path in sorted(paths) or [None]:
        try:
            query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support")
        except (OSError, AttributeError):
            continue
        return bool(query())
    return False


class _PinnedPool:
    """Page-locked host buffers reused between CUDA staging copies."""

    def __init__(self, keep: int = 8) -> None:
        self._free: list[torch.Tensor] = []
        self._keep = keep

    def take(self, nbytes: int) -> torch.Tensor:
        fits = [b for b in self._free if b.numel() >= nbytes]
        if fits:
            buf = min(fits, key=torch.Tensor.numel)
            self._free.remove(buf)
            return buf
        return torch.empty(max(1 << (nbytes - 1).bit_length(), 4096), dtype=torch.uint8, pin_memory=True)

    def give(self, buf: torch.Tensor) -> None:
        self._free.append(buf)
        if len(self._free) > self._keep:
            self._free.remove(min(self._free, key=torch.Tensor.numel))


def _storage_handle(t: torch.Tensor) -> int:
    """``t``'s storage as the handle ``_use_count`` takes (valid while ``t`` lives): how many
    tensors, views included, share the storage, without building a storage object per query."""
    return t.untyped_storage()._cdata


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # None: this torch cannot count, so no pooling


class _RecvPool:
    """Host buffers for received payloads, handed out again once nobody holds them.

    A fresh large tensor costs a page fault per page when MPI first writes
    into it: 24 ms for 64 MB on a 2-core VM, twice the transfer itself. A
    buffer written before costs nothing. A pooled buffer is reused only when
    no tensor, view or NumPy array made from an earlier payload still holds its
    storage, so a payload its receiver keeps is never overwritten. Payloads
    under ``MIN_BYTES`` come from the allocator, which keeps small blocks.
    At most ``keep`` buffers and ``max_bytes`` in all are kept.
    """

    MIN_BYTES = 256 << 10

    def __init__(self, keep: int = 4, max_bytes: int = 1 << 30) -> None:
        self._bufs: list[tuple[torch.Tensor, int, int]] = []  # (uint8 buffer, storage handle, users when idle)
        self._keep = keep
        self._max_bytes = max_bytes

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> torch.Tensor:
        """An uninitialised CPU tensor of ``shape`` and ``dtype`` (``nbytes`` bytes) to receive into."""
        if nbytes < self.MIN_BYTES or _use_count is None:
            # size= rather than the shape as first argument: 1.6 instead of 2.4 us (4 KB), on every small payload
            return torch.empty(size=shape, dtype=dtype)
        for buf, handle, idle in self._bufs:
            if buf.numel() == nbytes and _use_count(handle) == idle:
                return buf.view(dtype).view(shape)
        # NumPy advises the kernel to back large arrays with huge pages (torch's
        # allocator does not unless THP_MEM_ALLOC_ENABLE=1): MPI's copy into
        # them ran twice as fast here (16 MB: 0.95 ms instead of 2.1 ms).
        buf = torch.from_numpy(np.empty(nbytes, dtype=np.uint8))
        idle_at = [i for i, (_, handle, idle) in enumerate(self._bufs) if _use_count(handle) == idle]
        while idle_at and (len(self._bufs) >= self._keep or
                           sum(b.numel() for b, _, _ in self._bufs) + nbytes > self._max_bytes):
            del self._bufs[idle_at.pop()]  # make room: drop an idle buffer of another size
        if len(self._bufs) < self._keep and sum(b.numel() for b, _, _ in self._bufs) + nbytes <= self._max_bytes:
            handle = _storage_handle(buf)
            self._bufs.append((buf, handle, _use_count(handle)))
        return buf.view(dtype).view(shape)


#: What was wrong with a header message that was not HEADER_LEN int64 values (raised as a ProtocolError).
BadHeader = str


class _HeaderInbox:
    """Every rank's headers through one persistent receive (``Recv_init`` from any
    rank into a fixed buffer), started again as soon as a header has been read.

    Why: a receive already posted when the header lands costs MPI less than
    a matched probe followed by a receive into a fresh array: 1.0 instead of
    1.8 us per header, send included (docs/benchmarks.md, issue 20).

    The receive takes whichever rank's header comes first, so one can come
    from a rank the caller is not asking for. It is kept, in arrival order,
    and handed to the first ``take`` that asks for its rank or for any rank.
    MPI keeps a pair's messages in order, so that rank's next payload (not
    yet received: payloads have their own tag) still belongs to it. Kept
    headers are queued per rank, so a server that takes one rank's messages
    while fifty others wait finds them without walking past the others'.
    """

    def __init__(self, comm: MPI.Comm) -> None:
        self._wire = np.zeros(HEADER_LEN, dtype=np.int64)
        self._status = MPI.Status()
        self._req = comm.Recv_init([self._wire, MPI.INT64_T], MPI.ANY_SOURCE, HEADER_TAG)
        self._req.Start()
        self._early: dict[int, deque[list[int] | BadHeader]] = {}  # per rank: arrived, not yet asked for
        self._order: deque[int] = deque()  # the ranks of those headers, in arrival order

    def take(self, source: int) -> tuple[int, list[int] | BadHeader] | None:
        """The next header from ``source`` (``MPI.ANY_SOURCE``: any rank), as its rank and its int64
        values, or what was wrong with it; None while none has arrived."""
        if self._order:
            kept = self._kept(source)
            if kept is not None:
                return kept
        while True:
            got = self._arrived()
            if got is None or source == MPI.ANY_SOURCE or got[0] == source:
                return got
            self._keep(*got)

    def has(self, source: int) -> bool:
        """Whether a header from ``source`` (``MPI.ANY_SOURCE``: any rank) has arrived; takes none."""
        while (got := self._arrived()) is not None:
            self._keep(*got)
        return bool(self._order) if source == MPI.ANY_SOURCE else bool(self._early.get(source))

    def _keep(self, src: int, words: list[int] | BadHeader) -> None:
        self._early.setdefault(src, deque()).append(words)
        self._order.append(src)

    def _kept(self, source: int) -> tuple[int, list[int] | BadHeader] | None:
        """The oldest kept header from ``source`` (or from any rank), taken out; None if none is kept."""
        if source == MPI.ANY_SOURCE:
            source = self._order.popleft()
        elif self._early.get(source):
            self._order.remove(source)  # its first occurrence: this rank's oldest
        else:
            return None
        return source, self._early[source].popleft()

    def _arrived(self) -> tuple[int, list[int] | BadHeader] | None:
        """The header in the buffer, if one has landed, after which the receive is posted again."""
        status = self._status
        try:
            if not self._req.Test(status):
                return None
            got: list[int] | BadHeader = (self._wire.tolist() if status.Get_count(MPI.INT64_T) == HEADER_LEN
                                          else f"{status.Get_count(MPI.BYTE)} bytes")
        except MPI.Exception as exc:  # MPI_ERR_TRUNCATE: longer than a header; the message is consumed
            got = str(exc)
        src = status.Get_source()
        self._req.Start()
        return src, got

    def close(self) -> None:
        """Withdraw the posted receive (a header that landed in it unasked is dropped)."""
        self._req.Cancel()
        self._req.Wait()
        self._req.Free()


@dataclass
class PendingSend:
    """One send in flight: what keeps its buffers alive until ``done`` says so."""

    done: Callable[[], bool]
    keep: Any
    part: str  # "header" or "payload"
    header: Header
    dest: int
    watch: torch.Tensor | None = None  # the caller's tensor when the wire buffer aliases it
    version: int = 0
    release: Callable[[], None] | None = None

    @property
    def what(self) -> str:  # formatted only for errors: describe() is slow on the hot path
        return f"{self.part} of {self.header.describe()} to rank {self.dest}"


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Contiguous ``t`` as a flat uint8 view (0-d included), sharing memory."""
    return t.reshape(-1).view(torch.uint8)


_from_address = MPI.buffer.fromaddress if hasattr(MPI, "buffer") else MPI.memory.fromaddress  # mpi4py 4 / 3


def host_buffer(t: torch.Tensor) -> Any:
    """The bytes of contiguous CPU tensor ``t`` as an MPI buffer, sharing memory.

    A tenth of the cost of ``as_bytes(t).numpy()`` (0.3 us instead of 3 us),
    which counts twice on every message. The caller keeps ``t`` alive for as
    long as MPI may use the buffer."""
    return _from_address(t.data_ptr(), t.nbytes)


class MPITransport:
    """:class:`~sfprompt_mpi.comm.protocol.Transport` over an MPI communicator.

    Construction is collective over ``comm`` (it is duplicated so that no other
    traffic on it can match ours). Received payloads are placed on ``device``
    (CPU when None). CUDA payloads go straight through MPI when the library is
    CUDA-aware (:func:`cuda_aware_mpi`), else through pinned host buffers.

    A payload handed to :meth:`send` is not copied when it is a contiguous CPU
    tensor: do not modify it in place until the send has completed (at the
    latest, at :meth:`close`). Such a modification is detected and raised as an
    error if the send is still in flight when the transport next looks.

    A wait spins, then naps (see ``SPIN_S``): briefly when the node has more
    ranks than CPUs (``layout``, computed collectively when not given), else
    for up to ``DEDICATED_SPIN_S``.

    One thread per transport: it keeps its pending sends in a plain list.
    """

    def __init__(self, comm: MPI.Comm, *, device: torch.device | str | None = None,
                 layout: NodeLayout | None = None) -> None:
        self.layout = node_layout(comm) if layout is None else layout
        self.comm = comm.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.on_header: Callable[[], None] | None = None  # see Transport.on_header
        self._pending: list[PendingSend] = []
        self._stuck: list[Any] = []  # receive buffers a timed-out receive may still write into
        self._pinned = _PinnedPool()
        self._received = _RecvPool()
        self._min_spin_s = self.layout.spin_s
        self._spin_s = self._min_spin_s  # how long the next receive spins before it naps
        self._inbox = _HeaderInbox(self.comm)
        self._payload_status = MPI.Status()  # one thread per transport: one payload receive at a time
        self._closed = False

    # ----------------------------------------------------------------- send

    def send(self, dest: int, kind: Kind, tensor: torch.Tensor | None = None, *, round: int = 0, attempt: int = 0,
             client: int = -1, step: int = 0, aux: int = 0) -> Header:
        """Queue a ``kind`` message (with ``tensor`` as payload) for ``dest``; returns its header without
        waiting for the receiver."""
        self._check_open()
        self._reap()
        header = outgoing(kind, tensor, round, attempt, client, step, aux)
        payload = tensor
        wire = header_bytes(header)  # MPI reads it as HEADER_LEN int64, as the receive expects
        # The payload is staged before the header leaves, so a failure here
        # cannot leave the receiver with a header whose payload never comes.
        staged = self._stage_payload(dest, payload) if payload is not None and payload.numel() > 0 else None
        req = self.comm.Isend([wire, MPI.INT64_T], dest, HEADER_TAG)
        self._pending.append(PendingSend(req.Test, (req, wire), "header", header, dest))
        self._spin_s = max(self._min_spin_s, min(_PAYLOAD_SPIN_S, header.nbytes / _SPIN_RATE))
        if staged is not None:
            self._post_payload(dest, header, staged, payload)
        return header

    def _stage_payload(self, dest: int, payload: torch.Tensor) -> Any:
        """The buffer the payload travels from, plus what must be released after."""
        if not payload.is_cuda:  # the common case first: a CPU tensor travels from its own memory
            t = payload.contiguous()
            return host_buffer(t), t, None
        t = payload.detach()
        if cuda_aware_mpi():
            t = t.contiguous()
            torch.cuda.current_stream(t.device).synchronize()  # kernels writing t must finish first
            return as_bytes(t), t, None
        host = self._pinned.take(t.nbytes)
        host[:t.nbytes].copy_(as_bytes(t.contiguous()))  # synchronous device-to-host copy
        return host[:t.nbytes].numpy(), host, lambda: self._pinned.give(host)

    def _post_payload(self, dest: int, header: Header, staged: Any, payload: torch.Tensor) -> None:
        buf, keep, release = staged
        req = self.comm.Isend([buf, MPI.BYTE], dest, PAYLOAD_TAG)
        aliased = isinstance(keep, torch.Tensor) and keep.data_ptr() == payload.data_ptr()
        self._pending.append(PendingSend(req.Test, (req, buf, keep), "payload", header, dest,
                                         payload if aliased else None, payload._version, release))

    def _reap(self) -> None:
        """Forget sends that completed; catch in-place writes to ones still in flight."""
        still, spoiled = [], None
        for p in self._pending:
            if p.done():
                if p.release is not None:
                    p.release()
                continue
            if p.watch is not None and p.watch._version != p.version:
                p.watch, spoiled = None, spoiled or p
            still.append(p)
        self._pending = still
        if spoiled is not None:
            raise RuntimeError(f"rank {self.rank}: the {spoiled.what} was modified in place before its send "
                               "completed; send a copy (tensor.clone()) instead")

    # ----------------------------------------------------------------- recv

    def recv(self, source: int = ANY_SOURCE, *, timeout: float, waiting_for: str = "a message",
             payload_timeout: float | None = None) -> Message:
        """The next message from ``source`` (or any rank); ``TimeoutError`` after ``timeout`` s.

        The payload gets its own ``payload_timeout`` (default ``timeout``) from
        the moment its header arrived, then :class:`PayloadTimeout`.
        """
        self._check_open()
        self._reap()
        mpi_source = MPI.ANY_SOURCE if source == ANY_SOURCE else source
        take = self._inbox.take
        got = take(mpi_source)  # already here: no waiting loop to set up
        if got is None:
            got = poll_until(lambda: take(mpi_source), time.monotonic() + timeout, self._spin_s)
        if got is None:
            who = "any rank" if source == ANY_SOURCE else f"rank {source}"
            raise TimeoutError(f"rank {self.rank}: no message from {who} within {timeout:g} s "
                               f"while waiting for {waiting_for}")
        src, words = got
        if isinstance(words, BadHeader):
            raise ProtocolError(f"rank {self.rank}: bad header from rank {src}: {words}")
        header = unpack_words(words)
        if self.on_header is not None:
            self.on_header()
        payload = None
        if header.has_payload:
            if 0 in header.shape:
                payload = torch.empty(header.shape, dtype=header.dtype, device=self.device)
            else:
                payload = self._recv_payload(src, header, timeout if payload_timeout is None else payload_timeout,
                                             waiting_for)
        return Message(src, header, payload)

    def _payload_timeout(self, src: int, header: Header, timeout: float, waiting_for: str) -> PayloadTimeout:
        return PayloadTimeout(f"rank {self.rank}: the header of {header.describe()} from rank {src} arrived but "
                              f"its payload did not within {timeout:g} s while waiting for {waiting_for}")

    def _recv_payload(self, src: int, header: Header, timeout: float, waiting_for: str) -> torch.Tensor:
        # The payload is ``src``'s next message on PAYLOAD_TAG (MPI keeps a pair's
        # messages in order), so the receive is posted at once, without a probe.
        deadline = time.monotonic() + timeout
        nbytes = header.nbytes
        host = None
        if self.device.type == "cuda" and cuda_aware_mpi():
            out = torch.empty(header.shape, dtype=header.dtype, device=self.device)
            # Fresh memory from the caching allocator may still be read by queued kernels.
            torch.cuda.current_stream(out.device).synchronize()
            buf: Any = as_bytes(out)
        elif self.device.type == "cuda":
            host = self._pinned.take(nbytes)
            buf = host_buffer(host[:nbytes])
        else:
            out = self._received.take(header.shape, header.dtype, nbytes)
            buf = host_buffer(out)
        status = self._payload_status
        req = self.comm.Irecv([buf, MPI.BYTE], src, PAYLOAD_TAG)
        try:
            done = True if req.Test(status) else poll_until(lambda: true_or_none(req.Test(status)), deadline,
                                                            _PAYLOAD_SPIN_S)
        except MPI.Exception:  # MPI_ERR_TRUNCATE: more bytes came than the header announced
            raise ProtocolError(f"rank {self.rank}: {header.describe()} from rank {src} announced "
                                f"{nbytes} bytes but more came") from None
        if done is None:
            self._stuck.append((req, buf, out if host is None else host))  # MPI may still write: keep it alive
            raise self._payload_timeout(src, header, timeout, waiting_for)
        check_arrived(header, status.Get_count(MPI.BYTE), rank=self.rank, src=src)
        if host is not None:
            out = host[:nbytes].view(header.dtype).reshape(header.shape).to(self.device)
            self._pinned.give(host)
        return out

    def poll(self, source: int = ANY_SOURCE) -> bool:
        """Whether a message from ``source`` (or any rank) is waiting."""
        self._check_open()
        self._reap()
        return self._inbox.has(MPI.ANY_SOURCE if source == ANY_SOURCE else source)

    # ---------------------------------------------------------------- close

    def close(self, *, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Wait (at most ``timeout`` s) until every send has been delivered, then release the communicator."""
        if self._closed:
            return
        self._closed = True

        def all_sent() -> bool | None:
            self._reap()
            return true_or_none(not self._pending)

        if poll_until(all_sent, time.monotonic() + timeout) is None:
            what = "; ".join(p.what for p in self._pending[:5])
            raise TimeoutError(f"rank {self.rank}: {len(self._pending)} send(s) not delivered within {timeout:g} s "
                               f"at close ({what}): the receiving rank stopped receiving or exited")
        self._close_payload_channel()
        self._release_comm()

    def _release_comm(self) -> None:
        """Withdraw the posted header receive and free the communicator (kept while a timed-out
        payload receive may still write into its buffer)."""
        self._inbox.close()
        if not self._stuck:
            self.comm.Free()

    def _close_payload_channel(self) -> None:
        """Hook for transports that carry payloads elsewhere."""

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"rank {self.rank}: transport used after close()")

    def __enter__(self) -> "MPITransport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
