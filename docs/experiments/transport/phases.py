"""Per-phase timing of MPITransport's per-message path: a replica of send/recv with perf_counter between phases.
mpiexec -n 2 python phases.py SIZE"""
import sys, time
import numpy as np, torch
from mpi4py import MPI
from sfprompt_mpi.comm.mpi import (MPITransport, HEADER_TAG, PAYLOAD_TAG, PendingSend, host_buffer, poll_until,
                                   true_or_none, _PAYLOAD_SPIN_S)
from sfprompt_mpi.comm.protocol import Kind, outgoing, pack_header, unpack_header, HEADER_LEN, check_arrived, expect, Message
from sfprompt_mpi.comm.wrappers import Counted

n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
comm = MPI.COMM_WORLD
me, peer = comm.Get_rank(), 1 - comm.Get_rank()
torch.set_num_threads(1)
t = MPITransport(comm)
c = Counted(t)
acc = {}
pc = time.perf_counter

def add(k, dt):
    acc[k] = acc.get(k, 0.0) + dt

def send(dest, kind, x, step):
    a = pc()
    t._check_open(); t._reap()
    b = pc(); add("s.reap", b - a)
    header = outgoing(kind, x, 1, 0, 0, step, 0)
    a = pc(); add("s.outgoing", a - b)
    wire = pack_header(header)
    b = pc(); add("s.pack", b - a)
    staged = t._stage_payload(dest, x)
    a = pc(); add("s.stage", a - b)
    req = t.comm.Isend([wire, MPI.INT64_T], dest, HEADER_TAG)
    b = pc(); add("s.isend_hdr", b - a)
    t._pending.append(PendingSend(req.Test, (req, wire), "header", header, dest))
    t._spin_s = max(t._min_spin_s, min(_PAYLOAD_SPIN_S, header.nbytes / 1e9))
    a = pc(); add("s.pending_hdr", a - b)
    buf, keep, release = staged
    req = t.comm.Isend([buf, MPI.BYTE], dest, PAYLOAD_TAG)
    b = pc(); add("s.isend_pay", b - a)
    aliased = isinstance(keep, torch.Tensor) and keep.data_ptr() == x.data_ptr()
    t._pending.append(PendingSend(req.Test, (req, buf, keep), "payload", header, dest, x if aliased else None, x._version, release))
    a = pc(); add("s.pending_pay", a - b)
    c.counter.count_sent(dest, header)
    add("s.count", pc() - a)
    return header

def recv(src):
    a = pc()
    t._check_open(); t._reap()
    status = MPI.Status()
    b = pc(); add("r.reap+status", b - a)
    matched = poll_until(lambda: t.comm.Improbe(src, HEADER_TAG, status), time.monotonic() + 60, t._spin_s)
    a = pc(); add("r.WAIT_probe", a - b)
    wire = np.zeros(HEADER_LEN, dtype=np.int64)
    matched.Recv([wire, MPI.INT64_T], status)
    status.Get_count(MPI.INT64_T)
    b = pc(); add("r.mrecv_hdr", b - a)
    header = unpack_header(wire)
    a = pc(); add("r.unpack", a - b)
    out = t._received.take(header.shape, header.dtype, header.nbytes)
    buf = host_buffer(out)
    b = pc(); add("r.alloc", b - a)
    st = MPI.Status()
    req = t.comm.Irecv([buf, MPI.BYTE], src, PAYLOAD_TAG)
    a = pc(); add("r.irecv", a - b)
    poll_until(lambda: true_or_none(req.Test(st)), time.monotonic() + 60, _PAYLOAD_SPIN_S)
    b = pc(); add("r.WAIT_payload", b - a)
    check_arrived(header, st.Get_count(MPI.BYTE), rank=0, src=src)
    m = Message(src, header, out)
    c.counter.count_recv(src, header)
    a = pc(); add("r.check+msg+count", a - b)
    return m

x = torch.arange(n // 4, dtype=torch.float32)
for phase in ("warm", "run"):
    acc.clear()
    comm.Barrier()
    t0 = pc()
    for step in range(reps if phase == "run" else 200):
        if me == 0:
            send(peer, Kind.ACTS, x, step)
            m = recv(peer)
            a = pc(); expect(m.header, Kind.BODY_OUT, step=step, shape=tuple(x.shape)); add("expect", pc() - a)
        else:
            m = recv(peer)
            a = pc(); expect(m.header, Kind.ACTS, step=step, shape=tuple(x.shape)); add("expect", pc() - a)
            send(peer, Kind.BODY_OUT, m.payload, step)
        m = None
    total = pc() - t0
if me == 0:
    print(f"size {n}: round trip {total / reps * 1e6:.1f} us")
    own = 0
    for k, v in acc.items():
        print(f"  {k:20s} {v / reps * 1e6:7.2f} us/msg")
        if "WAIT" not in k:
            own += v
    print(f"  sum outside waits: {own / reps * 1e6:.2f} us per rank per round trip (one send + one recv)")
t.close()
