"""One process, COMM_SELF: header send + receive costs of each option, min of 7 repeats."""
import timeit
import numpy as np
from mpi4py import MPI
HDR, HL = 0x5346, 15
comm = MPI.COMM_SELF.Dup()
wire = np.arange(HL, dtype=np.int64)
st = MPI.Status()
hbuf = np.zeros(HL, np.int64)
pre = comm.Recv_init([hbuf, MPI.INT64_T], MPI.ANY_SOURCE, HDR)
sbuf = np.zeros(HL, np.int64)
ps = comm.Send_init([sbuf, MPI.INT64_T], 0, HDR)
def cur():   # Isend + Improbe + Mrecv into fresh zeros + Test
    r = comm.Isend([wire, MPI.INT64_T], 0, HDR)
    m = comm.Improbe(MPI.ANY_SOURCE, HDR, st); w = np.zeros(HL, np.int64); m.Recv([w, MPI.INT64_T], st)
    st.Get_count(MPI.INT64_T); w.tolist(); r.Test()
def a():     # Isend + pre-posted Test + copy out + restart
    pre.Start()
    r = comm.Isend([wire, MPI.INT64_T], 0, HDR)
    pre.Test(st); st.Get_source(); st.Get_count(MPI.INT64_T); hbuf.tolist(); r.Test()
def b():     # persistent send + Improbe/Mrecv
    sbuf[:] = wire; ps.Start()
    m = comm.Improbe(MPI.ANY_SOURCE, HDR, st); w = np.zeros(HL, np.int64); m.Recv([w, MPI.INT64_T], st)
    st.Get_count(MPI.INT64_T); w.tolist(); ps.Test()
def ab():
    pre.Start()
    sbuf[:] = wire; ps.Start()
    pre.Test(st); st.Get_source(); st.Get_count(MPI.INT64_T); hbuf.tolist(); ps.Test()
for name, f in [("current: Isend / Improbe+Mrecv", cur), ("(a) Isend / pre-posted Recv_init", a),
                ("(b) Send_init / Improbe+Mrecv", b), ("(a)+(b)", ab)] * 2:
    n = 20000
    print(f"{name:36s} {min(timeit.repeat(f, number=n, repeat=7)) / n * 1e6:.2f} us")
