"""Transports: the wire header's checks, the wrappers (Counted, Timed, Faulty),
and one conformance script run for every Transport (loopback in-process, MPI
and gloo under real ``mpiexec``, NCCL where a GPU is visible).

The conformance checks live in ``tests/mpi/transport_conformance.py`` and are
written once against the Transport protocol; see its docstring for the list.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sfprompt_mpi.comm import build_transport
from sfprompt_mpi.comm.loopback import LoopbackHub
from sfprompt_mpi.comm.protocol import (HEADER_BYTES, HEADER_LEN, MAX_DIMS, Header, Kind, ProtocolError, from_wire,
                                        outgoing, pack_header, to_wire, unpack_header, unpack_words, wire_dtype)
from sfprompt_mpi.comm.wrappers import Counted, Faulty, Timed, wrap_transport
from sfprompt_mpi.config import WIRE_DTYPES, Fault
from sfprompt_mpi.errors import UserError

from run_helpers import run_bounded  # tests/mpi, on sys.path via tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "mpi" / "transport_conformance.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
LAUNCH_TIMEOUT_S = 120


# ------------------------------------------------------------------ header


def test_header_roundtrip_keeps_every_field():
    x = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    h = outgoing(Kind.ACTS, x, round=5, attempt=2, client=17, step=3, aux=-1)

    assert unpack_header(pack_header(h)) == h
    assert (h.round, h.attempt) == (5, 2) and pack_header(h)[-1] == 2  # the attempt: the last int64
    assert HEADER_BYTES == 8 * HEADER_LEN == 120
    assert unpack_header(pack_header(Header(Kind.STOP))) == Header(Kind.STOP)


@pytest.mark.parametrize("spoil, words", [
    (lambda w: w.__setitem__(0, 0x1234), "magic"),
    (lambda w: w.__setitem__(1, 99), "unknown message kind"),
    (lambda w: w.__setitem__(5, 42), "unknown dtype"),
    (lambda w: w.__setitem__(6, MAX_DIMS + 1), "dimensions"),
    (lambda w: w.__setitem__(8, -5), "negative shape"),
    (lambda w: w.__setitem__(slice(8, 11), [1 << 20, 1 << 20, 1 << 10]), "exceeds the limit"),
    (lambda w: w.__setitem__(HEADER_LEN - 1, -1), "attempt -1"),
])
def test_unpack_header_refuses_malformed(spoil, words):
    wire = pack_header(outgoing(Kind.ACTS, torch.zeros(2, 3, 4)))
    spoil(wire)

    with pytest.raises(ProtocolError, match=words):
        unpack_header(wire)


@pytest.mark.parametrize("spoil, words", [
    (lambda w: w.__setitem__(0, 0x1234), "magic"),
    (lambda w: w.__setitem__(1, 99), "unknown message kind"),
    (lambda w: w.__setitem__(8, -5), "negative shape"),
    (lambda w: w.pop(), "length"),
    (lambda w: w.append(0), "length"),
])
def test_unpack_words_checks_what_unpack_header_checks(spoil, words):
    h = outgoing(Kind.ACTS, torch.zeros(2, 3, 4), round=2, client=1, step=5, aux=9)
    good = pack_header(h).tolist()
    assert unpack_words(good) == h == unpack_header(pack_header(h))
    spoil(good)

    with pytest.raises(ProtocolError, match=words):
        unpack_words(good)


def test_unpack_header_refuses_wrong_length():
    with pytest.raises(ProtocolError, match="length"):
        unpack_header(np.zeros(HEADER_LEN - 1, dtype=np.int64))


def test_send_builds_the_header_from_the_tensor():
    hub = LoopbackHub(2)
    a, b = hub.endpoint(0), hub.endpoint(1)
    x = torch.arange(6, dtype=torch.float16).reshape(2, 3).t()  # not contiguous

    sent = a.send(1, Kind.BODY_OUT, x, round=4, attempt=1, client=9, step=2, aux=7)
    a.send(1, Kind.KEEPALIVE, round=4)
    got, bare = b.recv(0, timeout=5), b.recv(0, timeout=5)

    assert sent == Header(Kind.BODY_OUT, 4, 9, 2, torch.float16, (3, 2), 7, 1) == got.header
    assert torch.equal(got.payload, x)
    assert bare.header == Header(Kind.KEEPALIVE, 4) and bare.payload is None
    with pytest.raises(ProtocolError, match="dtype not allowed"):
        a.send(1, Kind.ACTS, torch.zeros(2, dtype=torch.complex64))


def test_wire_dtypes_cast_in_one_place():
    x = torch.randn(2, 3, requires_grad=True)

    assert [wire_dtype(n) for n in WIRE_DTYPES] == [torch.float32, torch.bfloat16, torch.float16]
    w = to_wire(x, torch.bfloat16)
    assert w.dtype == torch.bfloat16 and not w.requires_grad
    back = from_wire(w, "cpu")
    assert back.dtype == torch.float32 and torch.equal(back, x.detach().to(torch.bfloat16).float())


def test_build_transport_refuses_unknown_kind():
    with pytest.raises(UserError, match="unknown transport 'tcp'"):
        build_transport("tcp", None, None)


# ------------------------------------------------------------------ wrappers


def test_counted_counts_headers_and_payloads_per_kind_and_peer():
    hub = LoopbackHub(3)
    t0, t1, t2 = (Counted(hub.endpoint(r)) for r in range(3))
    x = torch.zeros(10)  # 40 bytes

    t1.send(0, Kind.ACTS, x)
    t2.send(0, Kind.ACTS, x)
    t2.send(0, Kind.UPDATE, x[:5])
    for _ in range(3):
        t0.recv(timeout=5)
    t0.send(1, Kind.STOP)

    h = HEADER_BYTES
    assert t0.counter.recv == {"acts": 2 * (h + 40), "update": h + 20}
    assert t0.counter.recv_from == {1: h + 40, 2: 2 * h + 60}
    assert t0.counter.sent == {"stop": h} and t0.counter.sent_to == {1: h}
    assert t2.counter.sent == {"acts": h + 40, "update": h + 20} and t2.counter.recv == {}
    assert t0.counter.snapshot_and_reset()["recv"]["update"] == h + 20 and t0.counter.recv == {}


class _ListClock:
    def __init__(self) -> None:
        self.parts: dict[str, float] = {"send_s": 0.0, "wait_s": 0.0, "payload_s": 0.0}
        self.seen: list[Header] = []

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] += seconds

    def message(self, h: Header, now: float) -> None:
        self.seen.append(h)


def test_timed_splits_waiting_from_payload_time(monkeypatch):
    hub = LoopbackHub(2)
    clock = _ListClock()
    t0, t1 = Timed(Counted(hub.endpoint(0)), clock), hub.endpoint(1)
    hooked = t0.raw
    arrived = hooked.on_header

    def late_payload() -> None:  # the payload takes 0.2 s after its header arrived
        arrived()
        time.sleep(0.2)

    hooked.on_header = late_payload
    t1.send(0, Kind.ACTS, torch.zeros(3), round=2)
    threading.Timer(0.5, lambda: t1.send(0, Kind.START, torch.zeros(1, dtype=torch.int64), round=3)).start()
    t0.recv(timeout=5)
    t0.recv(timeout=5)
    t0.send(1, Kind.STOP)
    with pytest.raises(TimeoutError):
        t0.recv(timeout=0.1)

    assert t0.counter.recv["acts"] > 0  # read through Timed to Counted
    assert [h.kind for h in clock.seen] == [Kind.ACTS, Kind.START, Kind.STOP] and clock.seen[1].round == 3
    assert 0.4 <= clock.parts["payload_s"] < 0.6      # two payloads, 0.2 s each
    assert 0.35 <= clock.parts["wait_s"] < 0.7       # ~0.3 s for START's header, 0.1 s timed out
    assert 0 < clock.parts["send_s"] < 0.1
    with pytest.raises(RuntimeError, match="on_header hook is taken"):
        Timed(hooked, clock)


def _faulty_pair(kind: str, rank: int = 1, rnd: int = 2):
    hub = LoopbackHub(3)
    server = hub.endpoint(0)
    hosts = [wrap_transport(hub.endpoint(r), fault=Fault(kind, rank, rnd), timeout=0.1) for r in (1, 2)]
    return server, hosts


def _round(server, hosts, rnd: int, attempt: int = 0, acts: int = 2):
    """One attempt as the hosts see it: PARAMS for clients 0 and 1 on each, then ACTS and UPDATEs; -> what arrived."""
    global_F = torch.ones(4)
    for r, host in enumerate(hosts, start=1):
        server.send(r, Kind.START, torch.tensor([0, 1]), round=rnd, attempt=attempt)
        for cid in (0, 1):
            server.send(r, Kind.PARAMS, global_F, round=rnd, attempt=attempt, client=cid)
        for _ in range(3):
            host.recv(0, timeout=5)
        for cid in (0, 1):
            for step in range(acts):
                host.send(0, Kind.ACTS, torch.ones(2, 3, 4), round=rnd, attempt=attempt, client=cid, step=step)
            host.send(0, Kind.UPDATE, global_F + 1, round=rnd, attempt=attempt, client=cid, aux=1)
    out = []
    while server.poll():
        out.append(server.recv(timeout=5))
    return out


@pytest.mark.parametrize("kind", ["wrong-shape", "nan", "slow", "huge-norm"])
def test_faulty_injects_once_in_its_round_and_rank(kind):
    server, hosts = _faulty_pair(kind)

    before = _round(server, hosts, 1)
    t0 = time.monotonic()
    during = _round(server, hosts, 2)
    took = time.monotonic() - t0
    retry = _round(server, hosts, 2, attempt=1)
    after = _round(server, hosts, 3)

    def spoiled(msgs):
        return [(m.source, m.header.kind, m.header.client, m.header.step) for m in msgs
                if m.payload.shape not in ((2, 3, 4), (4,)) or not bool(torch.isfinite(m.payload).all())
                or (m.header.kind == Kind.UPDATE and not torch.equal(m.payload, torch.full((4,), 2.0)))]

    assert isinstance(hosts[0], Faulty) and not isinstance(hosts[1], Faulty)  # only the fault's rank
    assert spoiled(before) == spoiled(retry) == spoiled(after) == []
    if kind == "slow":
        assert spoiled(during) == [] and took >= 0.05  # 0.5 x the 0.1 s timeout, once
    elif kind == "huge-norm":
        assert spoiled(during) == [(1, Kind.UPDATE, 0, 0)]
        update = next(m for m in during if m.source == 1 and m.header.kind == Kind.UPDATE)
        assert torch.equal(update.payload, torch.ones(4) + torch.ones(4) * 1e6)  # global + delta * 1e6
    else:
        assert spoiled(during) == [(1, Kind.ACTS, 0, 0)]  # the first ACTS of the round, first client
        first = next(m for m in during if m.source == 1)
        assert first.header.shape == ((2, 2, 4) if kind == "wrong-shape" else (2, 3, 4))


def test_faulty_crash_raises_on_the_first_acts_of_its_round():
    server, hosts = _faulty_pair("crash", rank=2, rnd=1)

    with pytest.raises(RuntimeError, match="injected crash"):
        _round(server, hosts, 1)


# ------------------------------------------------------------- conformance


def test_node_layout_says_when_ranks_outnumber_cpus():
    from sfprompt_mpi.node import NodeLayout, my_cpus, single_process_layout

    assert NodeLayout(0, 51, 2).oversubscribed and NodeLayout(0, 51, 2).threads_per_rank == 1
    assert not NodeLayout(3, 4, 16).oversubscribed and NodeLayout(3, 4, 16).threads_per_rank == 4
    assert NodeLayout(0, 3, 8).threads_per_rank == 2  # leftover CPUs are not oversubscribed
    assert single_process_layout() == NodeLayout(0, 1, len(my_cpus()))


@pytest.mark.parametrize("arrives_s", [0.0005, 0.01, 0.3, 5.0])
def test_a_wait_spins_then_naps_at_most_a_millisecond_and_gives_up_at_its_deadline(monkeypatch, arrives_s):
    import sfprompt_mpi.node as node

    clock = {"now": 0.0}
    naps: list[tuple[float, float]] = []  # (when, how long)
    monkeypatch.setattr(node.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(node.time, "sleep", lambda s: (naps.append((clock["now"], s)), clock.update(now=clock["now"] + s)))
    monkeypatch.setattr(node.os, "sched_yield", lambda: clock.update(now=clock["now"] + 1e-5))

    got = node.poll_until(lambda: "here" if clock["now"] >= arrives_s else None, 60.0, spin_s=1e-3)

    assert got == "here"
    assert all(when >= 1e-3 for when, _ in naps)  # the first millisecond spins
    assert all(s <= 1e-3 for _, s in naps) and clock["now"] - arrives_s <= 1e-3 + 1e-9
    if arrives_s >= 0.3:  # naps double up to the millisecond
        assert max(s for _, s in naps) == pytest.approx(1e-3)
    end = clock["now"] + 0.5
    assert node.poll_until(lambda: None, end, spin_s=0.0) is None and clock["now"] == pytest.approx(end)


def test_reference_run_takes_the_threads_of_a_rank_of_the_one_rank_per_client_job():
    from sfprompt_mpi.config import build_config
    from sfprompt_mpi.node import NodeLayout
    from sfprompt_mpi.world import World, torch_threads

    default, four = build_config(), build_config({"run": {"threads": 4}})
    one_process = World(None, 0, 1, NodeLayout(0, 1, 16))
    rank_of_5 = World(object(), 2, 5, NodeLayout(2, 5, 16))

    assert torch_threads(default, one_process, clients=4) == 3 == torch_threads(default, rank_of_5, clients=4)
    assert torch_threads(default, World(None, 0, 1, NodeLayout(0, 1, 2)), clients=4) == 1  # a laptop: one each
    assert torch_threads(default, one_process, clients=100) == 1
    assert torch_threads(four, one_process, clients=4) == 4 == torch_threads(four, rank_of_5, clients=4)


def _conformance_module():
    spec = importlib.util.spec_from_file_location("transport_conformance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("size", [2, 3])
def test_loopback_conformance(size, capsys):
    _conformance_module().run_loopback(size)

    assert f"CONFORMANCE PASSED loopback size={size}" in capsys.readouterr().out


def _launch(size: int, kind: str) -> subprocess.CompletedProcess:
    """``mpiexec -n size`` of the conformance script, bounded; its whole process group dies on timeout."""
    cmd = [str(MPIEXEC), "-n", str(size), sys.executable, "-m", "mpi4py", str(SCRIPT), kind]
    result = run_bounded(cmd, LAUNCH_TIMEOUT_S)
    return subprocess.CompletedProcess(cmd, result.returncode, result.output)


@pytest.mark.mpi
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a visible GPU")
def test_nccl_conformance():
    size = min(torch.cuda.device_count(), 3)  # one GPU per rank

    result = _launch(size, "nccl")

    assert result.returncode == 0, result.stdout
    assert f"CONFORMANCE PASSED nccl size={size}" in result.stdout, result.stdout


@pytest.mark.mpi
@pytest.mark.parametrize("kind, size", [("mpi", 2), ("mpi", 3), ("gloo", 1), ("gloo", 2), ("gloo", 3)])
def test_mpi_conformance(kind, size):
    result = _launch(size, kind)

    assert result.returncode == 0, result.stdout
    assert f"CONFORMANCE PASSED {kind} size={size}" in result.stdout, result.stdout
    assert "cpu while waiting in recv" in result.stdout
    if kind == "mpi":
        assert "ok wait policy" in result.stdout and "ok check_wait_policy" in result.stdout
    if kind == "gloo":
        assert "ok nccl refused without a GPU per rank" in result.stdout or torch.cuda.device_count() >= size
