"""torch.distributed transport: headers on MPI, payload bytes on gloo or NCCL.

Where MPI cannot carry GPU tensors well (a library that is not CUDA-aware),
NCCL moves them device to device; gloo is the CPU twin that every test runs.
Headers, and so all matching by source and arrival order, stay on MPI exactly
as in :class:`~sfprompt_mpi.comm.mpi.MPITransport`; only the payload bytes
take the other road. Both roads keep a pair's messages in order, so the n-th
payload from a rank belongs to the n-th header from it.

The process group is built from MPI's rank and size: rank 0 starts the
rendezvous store on a port the OS picks and broadcasts its address over MPI,
so no free-port guess can race with another job. On one node that address
is 127.0.0.1; across nodes it is rank 0's host name, or
``SFPROMPT_MASTER_ADDR`` where the host name does not reach the right
interface. Launch the conformance test by hand with::

    mpiexec -n 3 python tests/mpi/transport_conformance.py gloo
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from mpi4py import MPI

from ..errors import UserError
from ..node import NodeLayout
from ..node import poll_until, true_or_none
from .mpi import MPITransport, as_bytes, PendingSend
from .protocol import Header

STORE_TIMEOUT = datetime.timedelta(seconds=120)


class _Delivery:
    """Completion of one gloo send, as seen by the waiter thread."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: str | None = None

    def done(self) -> bool:
        if not self.event.is_set():
            return False
        if self.error is not None:
            raise RuntimeError(f"payload send failed: {self.error}")
        return True


def _wait_sends(works: queue.Queue) -> None:
    # A gloo Work reports completion only from wait(), and wait() blocks, so
    # one thread waits on the sends in order (releasing the GIL) and marks them.
    while (item := works.get()) is not None:
        work, delivery = item
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001 - reported to the owner through done()
            delivery.error = str(exc)
        delivery.event.set()


class TorchDistTransport(MPITransport):
    """:class:`~sfprompt_mpi.comm.protocol.Transport` with payloads on torch.distributed.

    ``backend`` is ``"gloo"`` (payloads staged through CPU memory) or
    ``"nccl"`` (payloads on this rank's GPU; one GPU per rank on every node,
    else :class:`~sfprompt_mpi.errors.UserError`). Received payloads land on
    ``device`` (for NCCL, by default the wire GPU: ``device`` when it names a
    CUDA index, else ``cuda:<rank on this node>``). Collective
    over ``comm``; it owns torch.distributed's default process group and
    destroys it in :meth:`close`.
    """

    def __init__(self, comm: MPI.Comm, backend: str = "gloo", device: torch.device | str | None = None,
                 layout: NodeLayout | None = None) -> None:
        if backend not in ("gloo", "nccl"):
            raise UserError(f"unknown torch.distributed backend {backend!r}: use gloo or nccl")
        super().__init__(comm, device=device, layout=layout)
        self.backend = backend
        local_rank, local_size = self.layout.local_rank, self.layout.local_size
        one_node = local_size == self.size
        problem = None
        if backend == "nccl":
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if gpus < local_size:
                problem = (f"--transport nccl needs one GPU per rank; this node has {gpus} GPUs for "
                           f"{local_size} ranks: use --transport mpi or gloo")
        # Every rank raises together, so none is left waiting in the setup below.
        problems = [p for p in self.comm.allgather(problem) if p]
        if problems:
            self._release_comm()
            self._closed = True
            raise UserError(problems[0])
        if backend == "nccl":
            named = self.device.type == "cuda" and self.device.index is not None
            self._wire_device = self.device if named else torch.device("cuda", local_rank)
            torch.cuda.set_device(self._wire_device)
            if device is None:
                self.device = self._wire_device
        else:
            self._wire_device = torch.device("cpu")
        self._init_process_group(one_node)
        self._works: queue.Queue = queue.Queue()
        self._waiter: threading.Thread | None = None

    def _init_process_group(self, one_node: bool) -> None:
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised; TorchDistTransport needs "
                               "to own the default process group")
        store, info = None, None
        if self.rank == 0:
            addr = "127.0.0.1" if one_node else os.environ.get("SFPROMPT_MASTER_ADDR") or socket.gethostname()
            try:
                # Port 0: the OS picks a free port as the store binds it.
                store = dist.TCPStore(addr, 0, self.size, is_master=True, wait_for_workers=False,
                                      timeout=STORE_TIMEOUT)
                info = (addr, store.port)
            except Exception as exc:  # noqa: BLE001 - every rank must learn of it, not only rank 0
                info = f"rank 0 could not start the torch.distributed store on {addr}: {exc}"
        info = self.comm.bcast(info, root=0)
        if isinstance(info, str):
            raise RuntimeError(info)
        if store is None:
            store = dist.TCPStore(info[0], info[1], self.size, is_master=False, timeout=STORE_TIMEOUT)
        # NCCL: bind the device so communicators are built now, collectively,
        # rather than lazily inside a first send that would block the sender
        # until its receiver joins.
        eager = {"device_id": self._wire_device} if self.backend == "nccl" else {}
        dist.init_process_group(self.backend, store=store, rank=self.rank, world_size=self.size, **eager)
        # One group per direction. NCCL runs a group's operations on one stream
        # in posting order, so with a single group two ranks that send to each
        # other before receiving would each queue their receive behind a send
        # that waits for the other's receive: a deadlock. Payloads to a higher
        # rank use ``_up`` and to a lower rank ``_down``, so a rank's sends and
        # its receives from the same peer never share a stream. gloo does not
        # need it, but runs the same code so that the CPU twin tests it.
        self._up = dist.group.WORLD
        self._down = dist.new_group(list(range(self.size)))

    def _group(self, sender: int, receiver: int) -> Any:
        return self._up if sender < receiver else self._down

    # ------------------------------------------------------------- payloads

    # torch.distributed has no messages to oneself; those payloads stay on MPI.

    def _stage_payload(self, dest: int, payload: torch.Tensor) -> Any:
        if dest == self.rank:
            return super()._stage_payload(dest, payload)
        # gloo sends CPU memory; NCCL's own stream waits for the current one, so no host sync.
        t = payload.detach().to(self._wire_device).contiguous()
        return as_bytes(t), t, None

    def _post_payload(self, dest: int, header: Header, staged: Any, payload: torch.Tensor) -> None:
        if dest == self.rank:
            return super()._post_payload(dest, header, staged, payload)
        buf, keep, _ = staged
        work = dist.isend(buf, dest, group=self._group(self.rank, dest))
        if self.backend == "nccl":
            done = work.is_completed
        else:
            if self._waiter is None:
                self._waiter = threading.Thread(target=_wait_sends, args=(self._works,), daemon=True,
                                                name=f"gloo-sends-r{self.rank}")
                self._waiter.start()
            delivery = _Delivery()
            self._works.put((work, delivery))
            done = delivery.done
        aliased = keep.data_ptr() == payload.data_ptr()
        self._pending.append(PendingSend(done, (work, buf, keep), "payload", header, dest,
                                         payload if aliased else None, payload._version))

    def _recv_payload(self, src: int, header: Header, timeout: float, waiting_for: str) -> torch.Tensor:
        if src == self.rank:
            return super()._recv_payload(src, header, timeout, waiting_for)
        out = torch.empty(header.shape, dtype=header.dtype, device=self._wire_device)
        work = dist.irecv(as_bytes(out), src, group=self._group(src, self.rank))
        if self.backend == "gloo":
            try:
                work.wait(timeout=datetime.timedelta(seconds=timeout))  # blocks on a condition, no spinning
            except RuntimeError as exc:
                self._stuck.append((work, out))  # gloo may still write into out: keep it alive
                if "timed out" in str(exc).lower():
                    raise self._payload_timeout(src, header, timeout, waiting_for) from None
                raise RuntimeError(f"rank {self.rank}: receiving the payload of {header.describe()} "
                                   f"from rank {src} failed: {exc}") from None
        else:
            if poll_until(lambda: true_or_none(work.is_completed()), time.monotonic() + timeout) is None:
                self._stuck.append((work, out))
                raise self._payload_timeout(src, header, timeout, waiting_for)
            work.wait()  # orders the current stream after the receive
        return out if out.device == self.device else out.to(self.device)

    def _close_payload_channel(self) -> None:
        if self._waiter is not None:
            self._works.put(None)
            self._waiter.join(timeout=5.0)
        if not self._stuck:
            dist.destroy_process_group()
