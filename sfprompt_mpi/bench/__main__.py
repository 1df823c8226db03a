"""CLI of the benchmarks; see :mod:`sfprompt_mpi.bench` and ``docs/benchmarks.md``.

Suites that need ranks start them: ``transport`` re-runs itself under
``mpiexec -n 2`` when it was not started by an MPI launcher (start it with
``mpiexec -n 2`` to use another launcher); ``round`` and ``scale`` launch
``mpiexec -n 3`` runs of the job, ``limit`` ``mpiexec -n P+1`` runs (P: the
CPUs) beside its plain-PyTorch loops. The launcher is ``$SFPROMPT_MPIEXEC``, else
the venv's ``mpiexec``, else the first ``mpiexec`` on PATH.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import Where, end_process, main_guard
from ..errors import UserError

SUITES = {
    "transport": "tensor send/receive vs raw mpi4py Send/Recv, 4 KB to 64 MB (2 ranks)",
    "server": "body throughput while serving K clients with batching vs the body alone",
    "round": "one round under mpiexec (1 server + 2 clients) vs the single-process round",
    "scale": "time per round and memory per rank with 50, 500, 5000 virtual clients",
    "wire": "bytes and accuracy with bfloat16/float16 activations on the wire",
    "limit": "the round against the same arithmetic as a plain PyTorch loop, one process and one per core",
    "peers": "the same FedAvg job under Flower (Ray) and pfl-research and here (needs the peers extra)",
}


def build_parser() -> argparse.ArgumentParser:
    from . import limit, peers, runs, server, transport
    parser = argparse.ArgumentParser(
        prog="python -m sfprompt_mpi.bench",
        description="Benchmarks: each suite compares the project against a limit measured in the same run "
                    "and prints its key ratio as the last line.",
        epilog="python -m sfprompt_mpi.bench SUITE --help lists a suite's options. Results: docs/benchmarks.md")
    subs = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    adders = {"transport": transport.add_arguments, "server": server.add_arguments,
              "round": runs.add_round_arguments, "scale": runs.add_scale_arguments,
              "wire": runs.add_wire_arguments, "limit": limit.add_arguments,
              "peers": peers.add_arguments}
    for name, add in adders.items():
        p = subs.add_parser(name, help=SUITES[name], description=SUITES[name])
        p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON to OUT ('-': stdout)")
        add(p)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()

    def error(message: str) -> None:
        raise UserError(f"bad command line: {message}")

    parser.error = error  # type: ignore[method-assign]
    for sub in parser._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        sub.error = error  # type: ignore[method-assign]
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_job"]:
        from .job import job_main
        return job_main(argv[1:])
    if argv[:1] == ["_peer"]:
        from .peer_jobs import peer_main
        return peer_main(argv[1:])
    if argv[:1] == ["_plain"]:
        from .plain import plain_main
        return plain_main(argv[1:])
    from .common import under_mpi
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) or 0)
    return main_guard(_main, argv, Where(rank=rank, mpi=under_mpi()))


def _main(argv: list[str]) -> int:
    from .common import emit, mpiexec_cmd, run_bounded, under_mpi
    try:
        args = _parse(argv)
        if args.suite == "transport":
            from . import transport
            transport.sizes(args)  # a bad size fails here, before any rank starts
            if not under_mpi():
                done = run_bounded(mpiexec_cmd(2, ["-m", "sfprompt_mpi.bench", *argv]), 3600, echo=True)
                return done.returncode
            report = transport.run(args)
        elif args.suite == "server":
            from . import server
            report = server.run(args)
        else:
            if under_mpi():
                raise UserError(f"start the {args.suite} suite without mpiexec: it launches its own runs")
            from . import limit, peers, runs
            report = {"round": runs.run_round, "scale": runs.run_scale, "wire": runs.run_wire,
                      "limit": limit.run_limit, "peers": peers.run_peers}[args.suite](args)
        if report is not None:
            emit(report, argv, args.json)
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    end_process(main())
