"""The structure of the paper's main table, reduced to run offline on a CPU.

    python -m sfprompt_mpi.table                       # every algorithm, digits, micro ViT, 5 rounds
    python -m sfprompt_mpi.table --rounds 10 --json table.json --out runs/table
    python -m sfprompt_mpi.table --algos sfprompt,fl-full -- --clients 8 --partition dirichlet

Runs each ``--algo`` once as the single-process reference run on the offline
default (scikit-learn's digits, the micro ViT with its shipped
fractal-pretrained weights; any extra ``sfprompt_mpi.run`` flags after ``--``,
e.g. ``--no-pretrained``, apply to every run) and prints one row
per algorithm: final test accuracy, bytes per client per round (measured at
the server), client FLOPs per local sample (``sfprompt_mpi.cost``'s counter),
and wall time. This is a reduced offline run, not the paper's setting: the
paper's sweep (ViT-B/16 pre-trained, CIFAR-10/100, SVHN, Flowers-102, IID and
Dirichlet) is ``configs/paper/*.toml`` x ``--algo``, e.g. with
``jobs/array_sweep.sbatch``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .config import ALGOS
from .cli import main_guard
from .errors import UserError
from .output import write_json


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sfprompt_mpi.table", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds per algorithm (default 5)")
    ap.add_argument("--algos", default=",".join(ALGOS), help="comma-separated algorithms (default: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for the run directories (default runs/table-<time>)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON to OUT ('-': stdout)")
    ap.add_argument("run_flags", nargs="*", help="flags for every run, after --")
    return ap


def run_table(algos: list[str], rounds: int, out: Path, flags: list[str], progress=print) -> list[dict[str, Any]]:
    """Run each algorithm and -> one row per algorithm."""
    from . import analyze
    from .config import parse_config
    from .cost import algorithm_costs, nominal_dataset
    from .run import main as run_main

    rows = []
    for algo in algos:
        run_dir = out / algo
        argv = [*flags, "--algo", algo, "--rounds", str(rounds), "--run-dir", str(run_dir), "--log-level", "WARNING"]
        t0 = time.perf_counter()
        code = run_main(argv)
        wall = time.perf_counter() - t0
        if code:
            raise UserError(f"--algo {algo} failed with exit code {code} (run directory {run_dir})")
        run = analyze.load_run(run_dir)
        s = analyze.summarize(run, analyze.round_rows(run))
        cfg = parse_config(argv)
        n_train, classes = nominal_dataset(cfg)
        clients = s["n_clients"] or 1
        cost = algorithm_costs(cfg, max(1, n_train // clients), classes)[algo]
        rows.append({"algo": algo, "final_acc": s.get("final_acc"),
                     "mb_per_client_round": (s["up_mb"] + s["down_mb"]) / clients / max(s["rounds_completed"], 1),
                     "exchanged_params": cost["exchanged_params"],
                     "client_gflops_per_sample": cost["client_flops_per_sample"] / 1e9,
                     "server_gflops_per_sample": cost["server_flops_per_sample"] / 1e9,
                     "wall_s": wall, "run_dir": str(run_dir)})
        progress(f"{algo}: accuracy {rows[-1]['final_acc']:.4f} in {wall:.1f} s")
    return rows


def render(rows: list[dict[str, Any]], rounds: int) -> str:
    lines = [f"Reduced offline run ({rounds} rounds, digits, vit_micro_patch8_32, fractal-pretrained "
             "unless --no-pretrained) - "
             "not the paper's setting",
             "",
             "| algorithm | test accuracy | MB per client per round | exchanged parameters "
             "| client GFLOPs per sample | server GFLOPs per sample | wall time [s] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['algo']} | {r['final_acc']:.4f} | {r['mb_per_client_round']:.3f} | "
                     f"{r['exchanged_params']:,} | {r['client_gflops_per_sample']:.4f} | "
                     f"{r['server_gflops_per_sample']:.4f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return main_guard(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    unknown = [a for a in algos if a not in ALGOS]
    if unknown or not algos:
        raise UserError(f"unknown algorithm {unknown[0] if unknown else '(none)'} in --algos "
                        f"(known: {', '.join(ALGOS)})")
    if args.rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {args.rounds}")
    out = args.out or Path(f"runs/table-{time.strftime('%Y%m%d-%H%M%S')}")
    rows = run_table(algos, args.rounds, out, list(args.run_flags),
                     progress=lambda line: print(line, file=sys.stderr))
    print(render(rows, args.rounds))
    if args.json:
        write_json(args.json, rows, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
