"""The structure of the paper's main table, reduced to run offline on a CPU.

    python -m sfprompt_mpi.table                       # every algorithm, digits, micro ViT, 5 rounds
    python -m sfprompt_mpi.table --rounds 10 --json table.json --out runs/table
    python -m sfprompt_mpi.table --algos sfprompt,fl-full -- --clients 8 --partition dirichlet
    python -m sfprompt_mpi.table --clients 2,4,8,16 --rounds 5 --json fig2.json   # Figure 2: accuracy vs clients

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

``--clients 2,4,8,16`` adds the axis of the paper's Figure 2: the same
training set divided among more clients. Each algorithm runs once per client
count (run directories ``OUT/c<clients>/<algo>``); the table has one row per
algorithm and one accuracy column per client count, and
``OUT/accuracy_vs_clients.png`` plots it. Without ``--algos`` it runs the
algorithms of Figure 2 (SFPrompt, full fine-tuning and linear probing, each
with FedAvg).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .algorithms.registry import FIGURE2_ALGOS
from .config import ALGOS
from .cli import end_process, main_guard
from .errors import UserError
from .output import write_json


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sfprompt_mpi.table", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds per algorithm (default 5)")
    ap.add_argument("--algos", default=None,
                    help="comma-separated algorithms (default: all; with --clients: " + ",".join(FIGURE2_ALGOS) + ")")
    ap.add_argument("--clients", default=None, metavar="N,N,...",
                    help="client counts: run every algorithm at each (the paper's Figure 2); the table gets one "
                    "column per count and OUT/accuracy_vs_clients.png plots it")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for the run directories (default runs/table-<time>)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON to OUT ('-': stdout)")
    ap.add_argument("run_flags", nargs="*", help="flags for every run, after --")
    return ap


def run_table(algos: list[str], rounds: int, out: Path, flags: list[str], progress=print,
              clients: list[int] | None = None) -> list[dict[str, Any]]:
    """Run each algorithm (at each client count of ``clients``, if given) -> one row per run."""
    rows: list[dict[str, Any]] = []
    costs: dict[tuple, dict] = {}  # every algorithm's cost at once, counted once per setting (seconds each)
    for n in clients or [None]:
        for algo in algos:
            if n is None:
                rows.append(_run_one(algo, rounds, out / algo, flags, costs))
            else:
                rows.append({**_run_one(algo, rounds, out / f"c{n}" / algo, [*flags, "--clients", str(n)], costs),
                             "clients": n})
            where = "" if n is None else f", {n} clients"
            progress(f"{algo}{where}: accuracy {rows[-1]['final_acc']:.4f} in {rows[-1]['wall_s']:.1f} s")
    return rows


def _run_one(algo: str, rounds: int, run_dir: Path, flags: list[str], costs: dict[tuple, dict]) -> dict[str, Any]:
    """One single-process run of ``algo`` into ``run_dir`` -> its table row; ``costs`` caches
    :func:`~sfprompt_mpi.cost.algorithm_costs` by run flags and shard size."""
    from . import analyze
    from .config import parse_config
    from .cost import algorithm_costs, nominal_dataset
    from .run import main as run_main

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
    shard = max(1, n_train // clients)
    key = (tuple(flags), shard, classes)
    if key not in costs:
        costs[key] = algorithm_costs(cfg, shard, classes)
    cost = costs[key][algo]
    return {"algo": algo, "final_acc": s.get("final_acc"),
            "mb_per_client_round": (s["up_mb"] + s["down_mb"]) / clients / max(s["rounds_completed"], 1),
            "exchanged_params": cost["exchanged_params"],
            "client_gflops_per_sample": cost["client_flops_per_sample"] / 1e9,
            "server_gflops_per_sample": cost["server_flops_per_sample"] / 1e9,
            "wall_s": wall, "run_dir": str(run_dir)}


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


def render_clients(rows: list[dict[str, Any]], rounds: int) -> str:
    """Figure 2 as a table: one row per algorithm, one test-accuracy column per client count."""
    counts = sorted({r["clients"] for r in rows})
    acc = {(r["algo"], r["clients"]): r["final_acc"] for r in rows}
    lines = [f"Test accuracy against the number of clients sharing one training set (reduced offline run, "
             f"{rounds} rounds, digits, vit_micro_patch8_32) - not the paper's setting",
             "",
             "| algorithm | " + " | ".join(f"{n} clients" for n in counts) + " |",
             "|---" * (len(counts) + 1) + "|"]
    for algo in dict.fromkeys(r["algo"] for r in rows):
        lines.append(f"| {algo} | " + " | ".join(f"{acc[algo, n]:.4f}" if (algo, n) in acc else "-"
                                                   for n in counts) + " |")
    return "\n".join(lines)


def plot_clients(rows: list[dict[str, Any]], path: Path, rounds: int) -> None:
    """Test accuracy against the client count, one line per algorithm (the paper's Figure 2)."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    counts = sorted({r["clients"] for r in rows})
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    for algo in dict.fromkeys(r["algo"] for r in rows):
        mine = sorted((r["clients"], r["final_acc"]) for r in rows if r["algo"] == algo)
        ax.plot([n for n, _ in mine], [a for _, a in mine], marker="o", label=algo)
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.minorticks_off()
    ax.set(xlabel="clients", ylabel="test accuracy", title=f"accuracy vs clients ({rounds} rounds, digits)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise UserError(f"cannot write the plot {path}: {exc.strerror or exc}") from None


def main(argv: list[str] | None = None) -> int:
    return main_guard(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    clients = _client_counts(args.clients, args.run_flags)
    default = FIGURE2_ALGOS if clients else ALGOS
    algos = [a.strip() for a in (args.algos if args.algos is not None else ",".join(default)).split(",") if a.strip()]
    unknown = [a for a in algos if a not in ALGOS]
    if unknown or not algos:
        raise UserError(f"unknown algorithm {unknown[0] if unknown else '(none)'} in --algos "
                        f"(known: {', '.join(ALGOS)})")
    if args.rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {args.rounds}")
    out = args.out or Path(f"runs/table-{time.strftime('%Y%m%d-%H%M%S')}")
    rows = run_table(algos, args.rounds, out, list(args.run_flags),
                     progress=lambda line: print(line, file=sys.stderr), clients=clients)
    if clients:
        print(render_clients(rows, args.rounds))
        plot_clients(rows, out / "accuracy_vs_clients.png", args.rounds)
        print(f"wrote {out / 'accuracy_vs_clients.png'}", file=sys.stderr)
    else:
        print(render(rows, args.rounds))
    if args.json:
        write_json(args.json, rows, indent=2)
    return 0


def _client_counts(text: str | None, run_flags: list[str]) -> list[int] | None:
    """``--clients 2,4,8`` -> [2, 4, 8] (sorted, each once), or None without the flag."""
    if text is None:
        return None
    if "--clients" in run_flags:
        raise UserError("--clients is given twice: as the table's axis and after --; give it once")
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--clients takes comma-separated client counts, e.g. 2,4,8,16, not {text!r}") from None
    if not counts or counts[0] < 1:
        raise UserError(f"--clients takes client counts >= 1, e.g. 2,4,8,16, not {text!r}")
    return counts


if __name__ == "__main__":
    end_process(main())
