"""Transports: the wire header's checks, and one conformance script run for
every Transport (loopback in-process, MPI and gloo under real ``mpiexec``).

The conformance checks live in ``tests/mpi/transport_conformance.py`` and are
written once against the Transport protocol; see its docstring for the list.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sfprompt_mpi.comm import build_transport
from sfprompt_mpi.comm.protocol import (HEADER_LEN, MAX_DIMS, Header, Kind, ProtocolError, header_for,
                                        pack_header, unpack_header)
from sfprompt_mpi.errors import UserError

from run_helpers import run_bounded  # tests/mpi, on sys.path via tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "mpi" / "transport_conformance.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
LAUNCH_TIMEOUT_S = 120


# ------------------------------------------------------------------ header


def test_header_roundtrip_keeps_every_field():
    x = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    h = header_for(Kind.ACTS, x, round=5, client=17, step=3, aux=-1)

    assert unpack_header(pack_header(h)) == h
    assert unpack_header(pack_header(Header(Kind.STOP))) == Header(Kind.STOP)


@pytest.mark.parametrize("spoil, words", [
    (lambda w: w.__setitem__(0, 0x1234), "magic"),
    (lambda w: w.__setitem__(1, 99), "unknown message kind"),
    (lambda w: w.__setitem__(5, 42), "unknown dtype"),
    (lambda w: w.__setitem__(6, MAX_DIMS + 1), "dimensions"),
    (lambda w: w.__setitem__(8, -5), "negative shape"),
    (lambda w: w.__setitem__(slice(8, 11), [1 << 20, 1 << 20, 1 << 10]), "exceeds the limit"),
])
def test_unpack_header_refuses_malformed(spoil, words):
    wire = pack_header(header_for(Kind.ACTS, torch.zeros(2, 3, 4)))
    spoil(wire)

    with pytest.raises(ProtocolError, match=words):
        unpack_header(wire)


def test_unpack_header_refuses_wrong_length():
    with pytest.raises(ProtocolError, match="length"):
        unpack_header(np.zeros(HEADER_LEN - 1, dtype=np.int64))


def test_build_transport_refuses_unknown_kind():
    with pytest.raises(UserError, match="unknown transport 'tcp'"):
        build_transport("tcp", None, None)


# ------------------------------------------------------------- conformance


def test_node_layout_says_when_ranks_outnumber_cpus():
    from sfprompt_mpi.node import NodeLayout, my_cpus, single_process_layout

    assert NodeLayout(0, 51, 2).oversubscribed and NodeLayout(0, 51, 2).threads_per_rank == 1
    assert not NodeLayout(3, 4, 16).oversubscribed and NodeLayout(3, 4, 16).threads_per_rank == 4
    assert NodeLayout(0, 3, 8).threads_per_rank == 2  # leftover CPUs are not oversubscribed
    assert single_process_layout() == NodeLayout(0, 1, len(my_cpus()))


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
