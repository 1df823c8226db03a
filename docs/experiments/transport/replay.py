"""Pure-mpi4py replay of the transport's message patterns against raw Send/Recv (issue 20 experiments).
mpiexec -n 2 python replay.py [trials]. Trials alternate patterns; best kept. Prints round trips in us."""
import sys, time
import numpy as np
from mpi4py import MPI

HDR, PAY, RAW = 0x5346, 0x5347, 77
HL = 15
INLINE_MAX = 64 << 10
comm = MPI.COMM_WORLD.Dup()
me, peer = comm.Get_rank(), 1 - comm.Get_rank()
trials = int(sys.argv[1]) if len(sys.argv) > 1 else 7
SIZES = [int(s) for s in (sys.argv[2].split(",") if len(sys.argv) > 2 else
                          ["4096", "65536", "262144", "1048576", "4194304", "16777216"])]
BUFS = {}
PROTO = np.arange(HL, dtype=np.int64)
pc = time.perf_counter

def spin(test):
    while True:
        r = test()
        if r is not None and r is not False:
            return r

class Pattern:
    def __init__(self, n):
        self.n = n
        if n not in BUFS:  # one pair of buffers per size, shared by every pattern and trial (no first-touch bias)
            BUFS[n] = (np.arange(n, dtype=np.uint8), np.zeros(n, dtype=np.uint8))
        self.send_buf, self.recv_buf = BUFS[n]
        self.pending = []
    def reap(self):
        self.pending = [p for p in self.pending if not p[0].Test()]

class Raw(Pattern):
    def send(self, buf):
        comm.Send([buf, MPI.BYTE], peer, RAW)
    def recv(self):
        comm.Recv([self.recv_buf, MPI.BYTE], peer, RAW)
        return self.recv_buf

class Current(Pattern):
    """Today's path: Isend header (fresh array) + Isend payload; Improbe-poll, Mrecv header, Irecv payload, Test-poll."""
    def send(self, buf):
        self.reap()
        wire = np.frombuffer(bytearray(PROTO.tobytes()), dtype=np.int64)
        r = comm.Isend([wire, MPI.INT64_T], peer, HDR)
        self.pending.append((r, wire))
        r = comm.Isend([buf, MPI.BYTE], peer, PAY)
        self.pending.append((r, buf))
    def recv_header(self):
        st = MPI.Status()
        m = spin(lambda: comm.Improbe(peer, HDR, st))
        wire = np.zeros(HL, dtype=np.int64)
        m.Recv([wire, MPI.INT64_T], st)
        return st.Get_source(), wire.tolist()
    def recv(self):
        src, _ = self.recv_header()
        st = MPI.Status()
        r = comm.Irecv([self.recv_buf, MPI.BYTE], src, PAY)
        spin(lambda: r.Test(st))
        st.Get_count(MPI.BYTE)
        return self.recv_buf

class PreHeader(Current):
    """(a) The header receive is persistent (Recv_init from ANY_SOURCE into a fixed buffer), restarted after each header."""
    def __init__(self, n):
        super().__init__(n)
        self.hbuf = np.zeros(HL, dtype=np.int64)
        self.hreq = comm.Recv_init([self.hbuf, MPI.INT64_T], MPI.ANY_SOURCE, HDR)
        self.hreq.Start()
        self.stash = {}
    def recv_header(self):
        st = MPI.Status()
        while True:
            spin(lambda: self.hreq.Test(st))
            src, words = st.Get_source(), self.hbuf.tolist()
            self.hreq.Start()
            if src == peer:
                return src, words
            self.stash.setdefault(src, []).append(words)
    def close(self):
        self.hreq.Cancel(); self.hreq.Wait(); self.hreq.Free()

class PersistentSend(Current):
    """(b) The header send is persistent: one Send_init per destination from a fixed buffer."""
    def __init__(self, n):
        super().__init__(n)
        self.sbuf = np.zeros(HL, dtype=np.int64)
        self.sreq = comm.Send_init([self.sbuf, MPI.INT64_T], peer, HDR)
        self.busy = False
    def send(self, buf):
        self.reap()
        if self.busy:
            self.sreq.Wait()   # in a ping-pong it has long completed
        self.sbuf[:] = PROTO   # pack into the fixed buffer
        self.sreq.Start()
        self.busy = True
        r = comm.Isend([buf, MPI.BYTE], peer, PAY)
        self.pending.append((r, buf))
    def close(self):
        if self.busy:
            self.sreq.Wait()
        self.sreq.Free()

class Both(PersistentSend, PreHeader):
    """(a) + (b)."""
    def close(self):
        PersistentSend.close(self); PreHeader.close(self)

class Inline(Current):
    """(c) Payloads up to INLINE_MAX travel in the header's message: [payload | header] in one buffer,
    received after Improbe into a buffer of the probed size; larger payloads keep two messages."""
    def send(self, buf):
        if self.n > INLINE_MAX:
            return Current.send(self, buf)
        self.reap()
        one = np.empty(self.n + 8 * HL, dtype=np.uint8)
        one[:self.n] = buf
        one[self.n:].view(np.int64)[:] = PROTO
        r = comm.Isend([one, MPI.BYTE], peer, HDR)
        self.pending.append((r, one))
    def recv(self):
        if self.n > INLINE_MAX:
            return Current.recv(self)
        st = MPI.Status()
        m = spin(lambda: comm.Improbe(peer, HDR, st))
        count = st.Get_count(MPI.BYTE)
        one = np.empty(count, dtype=np.uint8)
        m.Recv([one, MPI.BYTE], st)
        one[count - 8 * HL:].view(np.int64).tolist()
        return one[:count - 8 * HL]

class InlinePre(Current):
    """(a)+(c) A persistent ANY_SOURCE receive of INLINE_MAX + header bytes: small messages land in it
    and their payload is copied out; larger payloads follow on PAYLOAD_TAG."""
    def __init__(self, n):
        super().__init__(n)
        self.hbuf = np.zeros(INLINE_MAX + 8 * HL, dtype=np.uint8)
        self.hreq = comm.Recv_init([self.hbuf, MPI.BYTE], MPI.ANY_SOURCE, HDR)
        self.hreq.Start()
    send = Inline.send
    def recv(self):
        st = MPI.Status()
        spin(lambda: self.hreq.Test(st))
        count = st.Get_count(MPI.BYTE)
        self.hbuf[count - 8 * HL:count].view(np.int64).tolist()
        if count > 8 * HL:
            out = np.empty(count - 8 * HL, dtype=np.uint8)
            out[:] = self.hbuf[:count - 8 * HL]
            self.hreq.Start()
            return out
        self.hreq.Start()
        r = comm.Irecv([self.recv_buf, MPI.BYTE], st.Get_source(), PAY)
        spin(lambda: r.Test(st))
        return self.recv_buf
    def close(self):
        self.hreq.Cancel(); self.hreq.Wait(); self.hreq.Free()

def run(p, reps):
    comm.Barrier()
    t0 = pc()
    for _ in range(reps):
        if me == 0:
            p.send(p.send_buf)
            p.recv()
        else:
            got = p.recv()
            p.send(got if isinstance(p, Raw) else p.send_buf)
    dt = pc() - t0
    for r, _ in p.pending:
        r.Wait()
    p.pending = []
    return dt / reps

PATTERNS = [Raw, Current, PreHeader, PersistentSend, Both, Inline, InlinePre]
for n in SIZES:
    reps = max(16, min(1000, (32 << 20) // n))
    best = {}
    for _ in range(trials):
        for cls in PATTERNS:
            if cls in (Inline, InlinePre) and n > INLINE_MAX * 4:
                continue
            p = cls(n)
            run(p, 5)
            dt = run(p, reps)
            if hasattr(p, "close"):
                comm.Barrier(); p.close()
            best[cls.__name__] = min(best.get(cls.__name__, 1e9), dt)
    if me == 0:
        raw = best["Raw"]
        print(f"{n:>9} B, {reps} rt: " + "  ".join(f"{k} {v * 1e6:.1f}us({raw / v:.2f})" for k, v in best.items()),
              flush=True)
