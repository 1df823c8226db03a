"""Transport conformance: one set of checks, written against the Transport
protocol, run for every implementation.

    mpiexec -n 3 python -m mpi4py tests/mpi/transport_conformance.py mpi
    mpiexec -n 3 python -m mpi4py tests/mpi/transport_conformance.py gloo
    mpiexec -n 2 python -m mpi4py tests/mpi/transport_conformance.py nccl    # one GPU per rank
    python tests/mpi/transport_conformance.py loopback 3     # ranks as threads

Every transport runs the one list ``CHECKS``, wrapped in ``Counted`` as runs
use it; a check that needs something only some transports have (MPI's node
layout, payloads that travel through MPI) says so in ``ONLY``. Every check
is collective: all ranks run it, separated by barriers. Rank 0
prints ``ok <check>`` for each and ``CONFORMANCE PASSED`` at the end; any
failure raises (``python -m mpi4py`` turns that into an abort of every rank,
so a failing rank cannot leave the others waiting).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sfprompt_mpi.comm.protocol import (ANY_SOURCE, HEADER_LEN, MAX_DIMS, Header, Kind,  # noqa: E402
                                        ProtocolError, Transport, outgoing, pack_header)
from sfprompt_mpi.comm.wrappers import Counted  # noqa: E402

TIMEOUT = 30.0  # generous bound on every receive that should succeed
KINDS = list(Kind)
# (dtype, shape): 0-d to 6-d, empty, and every dtype the wire allows.
CASES: list[tuple[torch.dtype, tuple[int, ...]] | None] = [
    (torch.float32, (5,)), (torch.float32, (3, 4)), (torch.bfloat16, (2, 3, 4)),
    (torch.float16, (2, 1, 3, 5)), (torch.int64, (7,)), (torch.int64, (2, 2, 2, 2)),
    (torch.float32, ()), (torch.bfloat16, ()), (torch.float32, (0,)), (torch.bfloat16, (2, 0, 3)),
    (torch.float64, (3, 3)), (torch.int32, (4,)), (torch.uint8, (10,)), (torch.float16, (1, 2, 1, 2, 1, 2)),
    None,  # a message without payload
]


class Group:
    """The collective side-channel the checks need: barrier and allgather (and the transport's kind)."""

    rank: int
    size: int
    kind: str = ""

    def barrier(self) -> None: ...

    def allgather(self, obj: Any) -> list: ...


class MPIGroup(Group):
    def __init__(self, comm) -> None:
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()

    def barrier(self) -> None:
        self.comm.Barrier()

    def allgather(self, obj: Any) -> list:
        return self.comm.allgather(obj)


class ThreadGroup(Group):
    """``size`` threads of one process acting as ranks."""

    def __init__(self, shared: dict, rank: int) -> None:
        self.shared, self.rank, self.size = shared, rank, len(shared["slots"])

    def barrier(self) -> None:
        self.shared["barrier"].wait(timeout=TIMEOUT)

    def allgather(self, obj: Any) -> list:
        self.shared["slots"][self.rank] = obj
        self.barrier()
        out = list(self.shared["slots"])
        self.barrier()
        return out


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(0, 200, shape, generator=g).to(dtype)


def assert_same(got: torch.Tensor | None, want: torch.Tensor | None, what: str) -> None:
    if want is None:
        assert got is None, f"{what}: expected no payload, got {got}"
        return
    assert got is not None, f"{what}: payload missing"
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{list(got.shape)}"
    assert torch.equal(got.cpu(), want), f"{what}: values differ"


# --------------------------------------------------------------------- checks


def check_roundtrip(t: Transport, g: Group) -> None:
    """A ring: every rank sends all cases to the next before receiving any from
    the previous, so sends must not wait for their receiver."""
    dest, src = (g.rank + 1) % g.size, (g.rank - 1) % g.size
    for i, case in enumerate(CASES):
        x = None if case is None else make_tensor(*case, seed=1000 * g.rank + i)
        h = t.send(dest, KINDS[i % len(KINDS)], x, round=7, attempt=i % 3, client=g.rank, step=i, aux=3 * i - 1)
        assert h == Header(KINDS[i % len(KINDS)], 7, g.rank, i, torch.float32 if x is None else x.dtype,
                           None if x is None else tuple(x.shape), 3 * i - 1, i % 3), h  # built from the tensor
    x = make_tensor(torch.float32, (4, 6), seed=g.rank).t()  # not contiguous
    t.send(dest, Kind.ACTS, x, client=g.rank, step=len(CASES))
    for i, case in enumerate(CASES):
        m = t.recv(src, timeout=TIMEOUT, waiting_for=f"roundtrip case {i}")
        h = m.header
        assert m.source == src, (m.source, src)
        assert (h.kind, h.round, h.attempt, h.client, h.step, h.aux) == (KINDS[i % len(KINDS)], 7, i % 3, src, i,
                                                                         3 * i - 1), h
        assert_same(m.payload, None if case is None else make_tensor(*case, seed=1000 * src + i), f"case {i} {case}")
    m = t.recv(src, timeout=TIMEOUT, waiting_for="the transposed tensor")
    assert_same(m.payload, make_tensor(torch.float32, (4, 6), seed=src).t().contiguous(), "transposed")


def check_any_source(t: Transport, g: Group) -> None:
    """Every other rank sends to rank 0, which takes them as they come and
    must see the right ``source`` and each sender's messages in order."""
    per_sender = 3
    if g.rank != 0:
        for j in range(per_sender):
            x = torch.full((g.rank, j + 1), 10 * g.rank + j, dtype=torch.int64)
            t.send(0, Kind.UPDATE, x, client=g.rank, step=j)
        return
    nxt = {r: 0 for r in range(1, g.size)}
    m = t.recv(g.size - 1, timeout=TIMEOUT, waiting_for="the last rank's first message")
    received = [m]
    received += [t.recv(ANY_SOURCE, timeout=TIMEOUT, waiting_for="any sender")
                 for _ in range(per_sender * (g.size - 1) - 1)]
    for m in received:
        assert m.source == m.header.client, (m.source, m.header.describe())
        assert m.header.step == nxt[m.source], f"out of order from rank {m.source}: {m.header.describe()}"
        nxt[m.source] += 1
        assert_same(m.payload, torch.full((m.source, m.header.step + 1), 10 * m.source + m.header.step,
                                          dtype=torch.int64), f"from rank {m.source}")
    assert all(n == per_sender for n in nxt.values()), nxt


def check_early_headers(t: Transport, g: Group) -> None:
    """Messages from a rank nobody asks for yet wait while a receive from another rank gets its own, and
    are handed out later in their sender's order with their own payloads (one large enough that MPI
    holds it back until it is received)."""
    if g.size < 3:
        return
    sizes = [(3,), (1 << 18,), (2, 2)]
    if g.rank == 2:
        for j, shape in enumerate(sizes):
            t.send(0, Kind.ACTS, torch.full(shape, 20.0 + j), client=2, step=j)
    g.barrier()
    if g.rank == 0:
        time.sleep(0.05)  # let rank 2's headers land
        try:  # rank 1 has sent nothing: rank 2's headers arrive meanwhile and must be kept
            t.recv(1, timeout=0.2, waiting_for="nothing from rank 1 yet")
        except TimeoutError:
            pass
        else:
            raise AssertionError("a message from rank 1 although it sent none")
        assert t.poll(2) and t.poll() and not t.poll(1)
        inbox = getattr(t.raw, "_inbox", None)  # MPI's headers: all three were taken in and kept
        assert inbox is None or list(inbox._order) == [2] * len(sizes), inbox._order
    g.barrier()
    if g.rank == 1:
        t.send(0, Kind.UPDATE, torch.full((5,), 10.0), client=1)
    if g.rank == 0:
        m = t.recv(1, timeout=TIMEOUT, waiting_for="rank 1's message after rank 2's")
        assert (m.source, m.header.kind) == (1, Kind.UPDATE), m.header.describe()
        assert_same(m.payload, torch.full((5,), 10.0), "rank 1's payload")
        got = [t.recv(ANY_SOURCE, timeout=TIMEOUT, waiting_for="rank 2's first message")]
        got += [t.recv(2, timeout=TIMEOUT, waiting_for="rank 2's later messages") for _ in sizes[1:]]
        for j, (m, shape) in enumerate(zip(got, sizes)):
            assert (m.source, m.header.kind, m.header.step) == (2, Kind.ACTS, j), m.header.describe()
            assert_same(m.payload, torch.full(shape, 20.0 + j), f"rank 2's payload {j}")
        assert not t.poll()
    g.barrier()
    # Two ranks' messages waiting at once: each rank's come out in its own order, whoever is asked for.
    def shape(j: int) -> tuple[int, ...]:
        return (1 << 16,) if j == 2 else (j + 1,)

    if g.rank in (1, 2):
        for j in range(4):
            t.send(0, Kind.GRAD_OUT, torch.full(shape(j), 100.0 * g.rank + j), client=g.rank, step=j)
    g.barrier()
    if g.rank == 0:
        deadline = time.monotonic() + TIMEOUT
        while not (t.poll(1) and t.poll(2)):
            assert time.monotonic() < deadline, "poll never saw both ranks' messages"
            time.sleep(1e-3)
        nxt = {1: 0, 2: 0}
        for source in (2, 1, ANY_SOURCE, 1, 2, ANY_SOURCE, ANY_SOURCE, ANY_SOURCE):
            m = t.recv(source, timeout=TIMEOUT, waiting_for="messages of two ranks")
            j = m.header.step
            assert source in (ANY_SOURCE, m.source) and j == nxt[m.source], (source, m.header.describe())
            assert_same(m.payload, torch.full(shape(j), 100.0 * m.source + j), f"rank {m.source}'s payload {j}")
            nxt[m.source] += 1
        assert nxt == {1: 4, 2: 4} and not t.poll(), nxt


def check_poll(t: Transport, g: Group) -> None:
    assert not t.poll(), f"rank {g.rank}: poll() true with nothing sent"
    g.barrier()
    if g.rank == 1:
        t.send(0, Kind.STOP, step=99)
    g.barrier()
    if g.rank == 0:
        deadline = time.monotonic() + TIMEOUT
        while not t.poll(1):
            assert time.monotonic() < deadline, "poll(1) never saw the message"
            time.sleep(1e-3)
        assert t.poll()
        assert g.size < 3 or not t.poll(2), "poll(2) true but rank 2 sent nothing"
        m = t.recv(1, timeout=TIMEOUT, waiting_for="the polled message")
        assert (m.source, m.header.kind, m.header.step, m.payload) == (1, Kind.STOP, 99, None)
        assert not t.poll()


def check_timeout(t: Transport, g: Group) -> None:
    t0 = time.monotonic()
    try:
        t.recv(timeout=0.25, waiting_for="the timeout probe of the conformance test")
    except TimeoutError as exc:
        text = str(exc)
        assert "the timeout probe of the conformance test" in text and f"rank {g.rank}" in text, text
    else:
        raise AssertionError("recv returned although nothing was sent")
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 3.0, elapsed
    if g.size > 1:
        try:
            t.recv((g.rank + 1) % g.size, timeout=0.05, waiting_for="a named rank")
        except TimeoutError as exc:
            assert f"rank {(g.rank + 1) % g.size}" in str(exc), str(exc)
        else:
            raise AssertionError("recv from a named rank returned although nothing was sent")


def check_waiting_cpu(t: Transport, g: Group) -> None:
    """CPU time a rank spends in a receive that waits 1 s (should be tiny)."""
    wall, cpu = time.monotonic(), time.process_time()
    try:
        t.recv(timeout=1.0, waiting_for="nothing (CPU measurement)")
    except TimeoutError:
        pass
    share = (time.process_time() - cpu) / (time.monotonic() - wall)
    shares = g.allgather(share)
    if g.rank == 0:
        print(f"cpu while waiting in recv: max {100 * max(shares):.1f}% of a core "
              f"(per rank {', '.join(f'{100 * s:.1f}%' for s in shares)})", flush=True)
    # Threads share one process clock, so only real ranks are measured.
    assert not isinstance(g, MPIGroup) or max(shares) < 0.5, shares


def check_wait_policy(t: Any, g: Group) -> None:
    """The transport knows its node, and waits by spinning only where each rank has a CPU of its own."""
    from mpi4py import MPI

    from sfprompt_mpi.comm.mpi import MPITransport
    from sfprompt_mpi.node import NodeLayout, my_cpus

    cpus = set().union(*map(set, g.allgather(sorted(my_cpus()))))
    assert (t.layout.local_size, t.layout.cpus) == (g.size, len(cpus)), (t.layout, g.size, cpus)
    assert t.layout.oversubscribed == (g.size > len(cpus))
    if g.rank == 0:
        print(f"ok wait policy: {g.size} ranks on {len(cpus)} CPUs, "
              f"{'oversubscribed' if t.layout.oversubscribed else 'a CPU per rank'}", flush=True)
    if g.size != 2 or g.rank != 0 or len(cpus) < 2:
        return
    # When each wait first naps (the spin is timed by the clock, so this holds on a busy machine too),
    # and what share of a core it used (printed only: other processes on the cores move it)
    first_nap, shares, sleep = {}, {}, time.sleep
    for name, layout in (("dedicated", NodeLayout(0, 1, 2)), ("oversubscribed", NodeLayout(0, 4, 2))):
        alone = MPITransport(MPI.COMM_SELF, layout=layout)
        wall, cpu = time.monotonic(), time.process_time()

        def nap(seconds: float, name=name, wall=wall) -> None:
            first_nap.setdefault(name, time.monotonic() - wall)
            sleep(seconds)
        time.sleep = nap
        try:
            alone.recv(timeout=0.3, waiting_for="nothing (wait policy)")
        except TimeoutError:
            pass
        finally:
            time.sleep = sleep
        shares[name] = (time.process_time() - cpu) / (time.monotonic() - wall)
        alone.close()
    print(f"waiting 0.3 s: first nap after {first_nap} s, cpu share {shares}", flush=True)
    dedicated_spin = NodeLayout(0, 1, 2).spin_s
    assert first_nap["dedicated"] >= dedicated_spin > 0.1, (first_nap, dedicated_spin)
    assert first_nap["oversubscribed"] < dedicated_spin / 4, first_nap


def check_big(t: Transport, g: Group) -> None:
    """Ranks 0 and 1 swap 16 MiB tensors, both sending first."""
    if g.rank > 1:
        return
    peer = 1 - g.rank
    x = make_tensor(torch.float32, (4, 1024, 1024), seed=77 + g.rank)
    t0 = time.perf_counter()
    t.send(peer, Kind.BODY_OUT, x, client=g.rank)
    m = t.recv(peer, timeout=TIMEOUT, waiting_for="the 16 MiB tensor")
    dt = time.perf_counter() - t0
    assert_same(m.payload, make_tensor(torch.float32, (4, 1024, 1024), seed=77 + peer), "16 MiB")
    if g.rank == 0:
        print(f"16 MiB exchange: {dt * 1e3:.1f} ms", flush=True)


def check_flood(t: Transport, g: Group) -> None:
    """Every other rank sends 300 messages (some 1 MiB) before rank 0 reads any."""
    count = 300
    if g.rank != 0:
        for j in range(count):
            x = torch.full((1 << 18,) if j % 50 == 0 else (3,), g.rank * 1000 + j, dtype=torch.float32)
            t.send(0, Kind.ACTS, x, client=g.rank, step=j)
    g.barrier()  # the senders got here, so no send waited for rank 0
    if g.rank == 0:
        nxt = {r: 0 for r in range(1, g.size)}
        for _ in range(count * (g.size - 1)):
            m = t.recv(timeout=TIMEOUT, waiting_for="the flood")
            assert m.header.step == nxt[m.source], m.header.describe()
            assert m.payload is not None and bool((m.payload == m.source * 1000 + m.header.step).all())
            nxt[m.source] += 1


def check_counters(t: Transport, g: Group) -> None:
    """Everything counted as sent somewhere is counted as received by its peer."""
    c = t.counter
    all_counts = g.allgather((dict(c.sent), dict(c.recv), dict(c.sent_to), dict(c.recv_from)))
    if g.rank != 0:
        return
    total_sent = sum(sum(s.values()) for s, _, _, _ in all_counts)
    total_recv = sum(sum(r.values()) for _, r, _, _ in all_counts)
    assert total_sent == total_recv > 0, (total_sent, total_recv)
    for i, (_, _, sent_to, _) in enumerate(all_counts):
        for j, n in sent_to.items():
            assert all_counts[j][3].get(i) == n, f"rank {i} sent {n} B to rank {j}, which counted {all_counts[j][3]}"
    for kind in {k for s, _, _, _ in all_counts for k in s}:
        assert sum(s.get(kind, 0) for s, _, _, _ in all_counts) == sum(r.get(kind, 0) for _, r, _, _ in all_counts)
    print(f"bytes: {total_sent} sent = {total_recv} received", flush=True)


def check_send_validation(t: Transport, g: Group) -> None:
    """``send`` refuses what no receiver would accept, before anything leaves."""
    dest = (g.rank + 1) % g.size
    huge = torch.empty(1 << 20, 1 << 12, device="meta")  # 16 GiB that need no memory
    for kind, x, words in [(Kind.ACTS, torch.zeros(3, dtype=torch.complex64), "dtype not allowed"),
                           (Kind.ACTS, torch.zeros(3, dtype=torch.bool), "dtype not allowed"),
                           (Kind.ACTS, torch.zeros((1,) * (MAX_DIMS + 1)), "dimensions"),
                           (Kind.ACTS, huge, "exceeds the limit"),
                           (3, torch.zeros(3), "not a Kind")]:
        try:
            t.send(dest, kind, x)
        except ProtocolError as exc:
            assert words in str(exc), (words, str(exc))
            continue
        raise AssertionError(f"send accepted {kind} with {x.dtype}{list(x.shape)}")
    g.barrier()
    assert not t.poll(), f"rank {g.rank}: a refused send left a message behind"


def _send_raw(t: Any, kind: str, dest: int, wire: np.ndarray, payload: np.ndarray | None) -> None:
    """A packed header (and payload bytes) sent as they are, past every check of ``send``."""
    if kind == "loopback":
        t.raw.push(dest, wire, None if payload is None else torch.from_numpy(payload))
        return
    from mpi4py import MPI

    from sfprompt_mpi.comm.mpi import HEADER_TAG, PAYLOAD_TAG
    t.comm.Send([wire, MPI.INT64_T], dest, HEADER_TAG)
    if payload is not None:
        t.comm.Send([payload, MPI.BYTE], dest, PAYLOAD_TAG)


def check_malformed(t: Any, g: Group) -> None:
    """Raw messages: bad headers, and payloads shorter or longer than announced, are refused."""
    kind = g.kind
    bad_magic = pack_header(Header(Kind.STOP))
    bad_magic[0] = 12345
    bad_kind = pack_header(Header(Kind.STOP))
    bad_kind[1] = 99
    bad_attempt = pack_header(Header(Kind.STOP))
    bad_attempt[-1] = -1
    huge = pack_header(Header(Kind.ACTS, dtype=torch.float32, shape=(1 << 20, 1 << 20)))
    raws = [(bad_magic, None, "magic"), (bad_kind, None, "unknown message kind"), (bad_attempt, None, "attempt -1"),
            (huge, None, "exceeds"), (np.zeros(HEADER_LEN + 3, dtype=np.int64), None, "bad header"),
            (np.zeros(HEADER_LEN - 3, dtype=np.int64), None, "bad header")]
    if kind in ("mpi", "loopback"):  # payloads that travel with the headers (on MPI, or in the mailbox)
        raws.append((pack_header(outgoing(Kind.ACTS, torch.zeros(4))), np.zeros(8, dtype=np.uint8),
                     "announced 16 bytes but 8 came"))
        raws.append((pack_header(outgoing(Kind.ACTS, torch.zeros(2))), np.zeros(64, dtype=np.uint8),
                     "announced 8 bytes but"))
    if g.rank == 1:
        for wire, payload, _ in raws:
            _send_raw(t, kind, 0, wire, payload)
    if g.rank == 0:
        for _, _, words in raws:
            try:
                t.recv(1, timeout=TIMEOUT, waiting_for="a malformed message")
            except ProtocolError as exc:
                assert words in str(exc), (words, str(exc))
            else:
                raise AssertionError(f"a malformed message ({words}) was accepted")


def check_inplace(t: Any, g: Group) -> None:
    """Writing into a payload after ``send`` never corrupts silently: the receiver gets the tensor as it
    was sent (the transport copied it), or the writer is told while the send is in flight (MPI sends from it)."""
    x = torch.zeros(4 << 20, dtype=torch.float32)  # 16 MiB: MPI cannot finish it before the receiver matches
    caught = False
    if g.rank == 0:
        t.send(1, Kind.PARAMS, x)
        x.add_(1)
        try:
            t.poll()
        except RuntimeError as exc:
            assert "modified in place" in str(exc), str(exc)
            caught = True
    caught = g.allgather(caught)[0]
    if g.rank == 1:
        m = t.recv(0, timeout=TIMEOUT, waiting_for="the modified payload")
        assert caught or not bool(m.payload.any()), "an in-place write after send reached the receiver unnoticed"


def check_closed(t: Transport, g: Group) -> None:
    """A closed transport refuses to be used (and closing twice is fine)."""
    t.close()
    t.close()
    for use in (lambda: t.send(g.rank, Kind.STOP), lambda: t.recv(timeout=0.01), lambda: t.poll()):
        try:
            use()
        except RuntimeError as exc:
            assert "used after close" in str(exc), str(exc)
        else:
            raise AssertionError("a closed transport was used")


#: The conformance list, in order; every transport runs all of it except where ``ONLY`` says otherwise.
CHECKS: list[Callable[..., None]] = [
    check_roundtrip, check_any_source, check_early_headers, check_poll, check_timeout, check_waiting_cpu, check_big, check_flood,
    check_send_validation, check_malformed, check_inplace, check_wait_policy, check_counters, check_closed,
]
#: Checks that need what only some transports have. gloo and NCCL send from a staged copy whose
#: completion a helper thread or stream reports, so an in-place write cannot be caught reliably there.
ONLY = {"check_wait_policy": {"mpi"}, "check_inplace": {"mpi", "loopback"}}
NEEDS_TWO_RANKS = {"check_any_source", "check_early_headers", "check_poll", "check_big", "check_flood",
                   "check_malformed", "check_inplace"}


def run_checks(raw: Transport, g: Group, kind: str) -> None:
    """Every check of ``CHECKS`` that applies to ``kind``, on ``raw`` wrapped as runs use it; closes it."""
    t = Counted(raw)
    g.kind = kind
    for check in CHECKS:
        name = check.__name__
        if kind not in ONLY.get(name, {kind}) or (g.size == 1 and name in NEEDS_TWO_RANKS):
            continue
        g.barrier()
        check(t, g)
        g.barrier()
        if g.rank == 0:
            print(f"ok {name}", flush=True)


def run_loopback(size: int) -> None:
    from sfprompt_mpi.comm.loopback import LoopbackHub

    hub = LoopbackHub(size)
    shared = {"slots": [None] * size, "barrier": threading.Barrier(size)}
    failures: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            run_checks(hub.endpoint(rank), ThreadGroup(shared, rank), "loopback")
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
            failures.append(exc)
            hub.abort(f"rank {rank}: {exc!r}")
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    if failures:
        raise failures[0]
    print(f"CONFORMANCE PASSED loopback size={size}", flush=True)


def run_mpi(kind: str) -> None:
    from mpi4py import MPI

    from sfprompt_mpi.comm import build_transport
    from sfprompt_mpi.errors import UserError
    from sfprompt_mpi.node import node_layout

    comm = MPI.COMM_WORLD
    g = MPIGroup(comm)
    if kind == "gloo":
        node_size = node_layout(comm).local_size
        if torch.cuda.device_count() < node_size:
            try:
                build_transport("nccl", comm, None)
            except UserError as exc:
                assert f"needs one GPU per rank; this node has {torch.cuda.device_count()} GPUs for {node_size} ranks" \
                    in str(exc), str(exc)
            else:
                raise AssertionError("nccl without a GPU per rank was accepted")
            if g.rank == 0:
                print("ok nccl refused without a GPU per rank", flush=True)
    t0 = time.perf_counter()
    t = build_transport(kind, comm, None if kind == "nccl" else torch.device("cpu"))
    setup = time.perf_counter() - t0
    run_checks(t, g, kind)  # its last check closes t
    g.barrier()
    if g.rank == 0:
        print(f"setup {setup * 1e3:.0f} ms", flush=True)
        print(f"CONFORMANCE PASSED {kind} size={g.size}", flush=True)


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "mpi"
    if which == "loopback":
        run_loopback(int(sys.argv[2]) if len(sys.argv) > 2 else 3)
    elif which in ("mpi", "gloo", "nccl"):
        run_mpi(which)
    else:
        sys.exit(f"usage: {sys.argv[0]} loopback [SIZE] | mpi | gloo | nccl")
