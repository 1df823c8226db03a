"""Min-of-repeats cost of each piece of the per-message path, one process (robust to a loaded machine)."""
import timeit, time
import numpy as np, torch
from mpi4py import MPI
from sfprompt_mpi.comm.mpi import MPITransport, PendingSend, host_buffer, HEADER_TAG
from sfprompt_mpi.comm.protocol import Kind, outgoing, pack_header, unpack_header, HEADER_LEN, expect, ByteCounter
torch.set_num_threads(1)
comm = MPI.COMM_SELF.Dup()
x = torch.arange(1024, dtype=torch.float32)
h = outgoing(Kind.ACTS, x, 1, 0, 0, 3, 0)
wire = pack_header(h)
st = MPI.Status()
bc = ByteCounter()
t = MPITransport(MPI.COMM_SELF)
buf = np.empty(4096 + 120, np.uint8)
def isend_test():
    r = comm.Isend([wire, MPI.INT64_T], 0, HEADER_TAG); m = comm.Improbe(0, HEADER_TAG, st); w = np.zeros(HEADER_LEN, np.int64); m.Recv([w, MPI.INT64_T], st); r.Test()
def isend_only_pair():
    r = comm.Isend([wire, MPI.INT64_T], 0, HEADER_TAG); comm.Recv([buf, MPI.BYTE], 0, HEADER_TAG); r.Wait()
pre = comm.Recv_init([buf, MPI.BYTE], MPI.ANY_SOURCE, HEADER_TAG)
psend = comm.Send_init([wire, MPI.INT64_T], 0, HEADER_TAG)
def persistent_pair():
    pre.Start(); psend.Start(); pre.Test(st); psend.Test()
cases = {
    "outgoing": lambda: outgoing(Kind.ACTS, x, 1, 0, 0, 3, 0),
    "pack_header": lambda: pack_header(h),
    "unpack_header": lambda: unpack_header(wire),
    "np.zeros(15,int64)": lambda: np.zeros(HEADER_LEN, np.int64),
    "MPI.Status()": lambda: MPI.Status(),
    "torch.empty(1024 f32)": lambda: torch.empty((1024,), dtype=torch.float32),
    "pool.take 4KB": lambda: t._received.take((1024,), torch.float32, 4096),
    "host_buffer": lambda: host_buffer(x),
    "PendingSend()": lambda: PendingSend(None, (None, wire), "header", h, 1),
    "x.contiguous()": lambda: x.contiguous(),
    "x.data_ptr()": lambda: x.data_ptr(),
    "count_sent": lambda: bc.count_sent(1, h),
    "expect": lambda: expect(h, Kind.ACTS, step=3, shape=(1024,)),
    "h.nbytes": lambda: h.nbytes,
    "Isend+Improbe+Mrecv+Test (self, 120B)": isend_test,
    "Isend+Recv+Wait (self, 120B)": isend_only_pair,
    "persistent Start x2 + Test x2 (self)": persistent_pair,
    "time.monotonic": time.monotonic,
    "lambda call": (lambda: None),
}
for name, f in cases.items():
    n = 20000
    best = min(timeit.repeat(f, number=n, repeat=7)) / n
    print(f"{name:42s} {best * 1e6:6.2f} us")
