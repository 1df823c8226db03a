"""Post-hoc analysis of runs from their per-rank HDF5 metrics.

    python -m sfprompt_mpi.analyze runs/a                 # -> runs/a/analysis/
    python -m sfprompt_mpi.analyze runs/a runs/b --out cmp --no-plots
    python -m sfprompt_mpi.analyze runs/a --tsne          # + t-SNE of the features before and after tuning

Prints a summary table (one column per run), writes ``rounds.csv`` (one row
per run per round), ``summary.json`` and PNG plots: accuracy vs round,
accuracy vs cumulative communication, client time per phase per round,
bytes per client. Works on a live or crashed run: it shows whatever rounds
were written. Every metric is optional. "Up" is what clients sent
(``bytes_sent/*`` on client ranks), "down" what they received
(``bytes_recv/*``); a run without client ranks (the single-process
reference) falls back to the server's received/sent bytes. MB = 10**6 bytes.
``--tsne``: see :mod:`sfprompt_mpi.tsne`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cli import end_process, main_guard
from .errors import UserError
from .metrics.h5 import read_attrs, read_events, read_metrics
from .choices import choice_rows, format_choices
from .simreport import add_sim_time, client_breakdown, device_names, format_breakdown, time_to_target, \
    write_breakdown_plot

PHASES = ("local", "prune", "split", "wait", "upload")
SERVER_SCALARS = ("test_acc", "test_loss", "round_s", "server_busy_frac", "queue_wait_s",
                  "body_fwd_s", "body_bwd_s", "body_batch_mean")
CLIENT_MEANS = ("local_loss", "local_acc", "split_loss", "el2n_mean")


@dataclass
class RankData:
    """One rank's file: role, ``{key: {round: value}}`` (last write wins), events."""
    rank: int
    role: str
    series: dict[str, dict[int, Any]]
    events: list[tuple[int, str, str]]


@dataclass
class Run:
    """A run directory's metrics: its readable rank files in rank order."""
    path: Path
    label: str
    ranks: list[RankData]
    warnings: list[str] = field(default_factory=list)

    @property
    def server(self) -> RankData | None:
        return next((r for r in self.ranks if r.role == "server"), None)

    @property
    def clients(self) -> list[RankData]:
        return [r for r in self.ranks if r.role != "server"]


def load_run(path: str | Path) -> Run:
    """Read every ``metrics/rank*.h5`` of a run directory; unreadable files become warnings."""
    path = Path(path)
    if not (path / "config.toml").is_file() or not (path / "metrics").is_dir():
        raise UserError(f"{path} is not a run directory (needs config.toml and metrics/)")
    run = Run(path, path.resolve().name, [])
    for f in sorted((path / "metrics").glob("rank*.h5")):
        try:
            rank = int(f.stem[4:])
            attrs, metrics, events = read_attrs(f), read_metrics(f), read_events(f)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            run.warnings.append(f"skipped unreadable {f.name}: {e}")
            continue
        role = str(attrs.get("role", "server" if rank == 0 else "client"))
        series = {k: {int(s): v for s, v in zip(steps.tolist(), values)}
                  for k, (steps, values) in metrics.items()}
        run.ranks.append(RankData(rank, role, series, events))
    if not run.ranks:
        raise UserError(f"{path}/metrics holds no readable rank*.h5 file; nothing to analyze")
    if (path / "run.h5").is_file():
        try:
            world = int(read_attrs(path / "run.h5").get("world_size", 0))
        except OSError:
            world = 0
        missing = sorted(set(range(world)) - {r.rank for r in run.ranks})
        if missing:
            run.warnings.append(f"no metrics from ranks {missing} of {world}")
    return run


def _keys(rank: RankData, prefix: str) -> list[str]:
    return [k for k in rank.series if k.startswith(prefix)]


def _scalar_sum(series: list[dict[int, Any]], rnd: int) -> float | None:
    vals = [float(s[rnd]) for s in series if rnd in s and np.ndim(s[rnd]) == 0]
    return sum(vals) if vals else None


def _client_series(run: Run, name: str) -> list[dict[int, Any]]:
    """Every ``clients/<cid>/<name>`` series over all ranks."""
    return [r.series[k] for r in run.ranks for k in r.series
            if k.startswith("clients/") and k.split("/", 2)[-1] == name]


def round_rows(run: Run) -> list[dict[str, Any]]:
    """One dict per round: server scalars, client means per phase, bytes and cumulative MB."""
    rounds = sorted({s for r in run.ranks for ser in r.series.values() for s in ser})
    srv = run.server
    byte_ranks, up_key, down_key = (run.clients, "bytes_sent/", "bytes_recv/") if run.clients \
        else ([srv] if srv else [], "bytes_recv/", "bytes_sent/")
    up_series = [r.series[k] for r in byte_ranks for k in _keys(r, up_key)]
    down_series = [r.series[k] for r in byte_ranks for k in _keys(r, down_key)]
    means = {name.replace("/", "_"): _client_series(run, name)
             for name in [f"time/{p}" for p in PHASES] + list(CLIENT_MEANS)}
    kept_series = _client_series(run, "kept")
    rows, cum_mb, cum_s = [], 0.0, 0.0
    for rnd in rounds:
        row: dict[str, Any] = {"run": run.label, "round": rnd}
        for name in SERVER_SCALARS:
            if srv and rnd in srv.series.get(name, {}):
                row[name] = float(srv.series[name][rnd])
        if srv and rnd in srv.series.get("selected", {}):
            row["n_selected"] = int(np.size(srv.series["selected"][rnd]))
        for col, series in means.items():
            vals = [float(s[rnd]) for s in series if rnd in s]
            if vals:
                row[col] = float(np.mean(vals))
        kept = _scalar_sum(kept_series, rnd)
        up, down = _scalar_sum(up_series, rnd), _scalar_sum(down_series, rnd)
        row.update({k: v for k, v in (("kept", kept), ("bytes_up", up), ("bytes_down", down))
                    if v is not None})
        cum_mb += ((up or 0.0) + (down or 0.0)) / 1e6
        row["cum_mb"] = cum_mb
        if "round_s" in row:
            cum_s += row["round_s"]
            row["cum_wall_s"] = cum_s
        rows.append(row)
    if srv:
        add_sim_time(rows, srv.series)
    return rows


def _per_client_bytes(run: Run) -> dict[str, tuple[float, float]]:
    """Total (up, down) bytes per client id if logged per client, else per client rank."""
    out: dict[str, tuple[float, float]] = {}
    ids = sorted({k.split("/")[1] for r in run.ranks for k in _keys(r, "clients/")
                  if "/bytes_sent/" in k or "/bytes_recv/" in k}, key=_natural)
    if ids:
        for cid in ids:
            tot = [sum(float(v) for r in run.ranks for k in _keys(r, f"clients/{cid}/{p}/")
                       for v in r.series[k].values()) for p in ("bytes_sent", "bytes_recv")]
            out[f"c{cid}"] = (tot[0], tot[1])
        return out
    for r in run.clients:
        tot = [sum(float(v) for k in _keys(r, p) for v in r.series[k].values())
               for p in ("bytes_sent/", "bytes_recv/")]
        out[f"r{r.rank:05d}"] = (tot[0], tot[1])
    return out


def _natural(s: str) -> tuple:
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def summarize(run: Run, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Run-level numbers: accuracy, rounds, wall time, phase times, bytes, utilisation."""
    def col(name: str) -> list[float]:
        return [r[name] for r in rows if name in r]

    def mean(name: str) -> float | None:
        v = col(name)
        return float(np.mean(v)) if v else None

    acc = [(r["round"], r["test_acc"]) for r in rows if "test_acc" in r]
    # The server logs round_s every round but test_acc only every eval_every rounds.
    done = [r["round"] for r in rows if "round_s" in r] or [r for r, _ in acc] \
        or [r["round"] for r in rows]
    s: dict[str, Any] = {"run": run.label, "path": str(run.path), "algo": _algo(run.path),
                         "rounds_completed": len(done),
                         "last_round": done[-1] if done else None}
    if acc:
        best = max(acc, key=lambda t: t[1] if math.isfinite(t[1]) else -math.inf)
        s.update(final_acc=acc[-1][1], best_acc=best[1], best_round=best[0])
    s["final_loss"] = col("test_loss")[-1] if col("test_loss") else None
    s["wall_s"] = sum(col("round_s")) if col("round_s") else None
    s["sim_s"] = col("cum_sim_s")[-1] if col("cum_sim_s") else None
    s["sim_round_s_mean"] = mean("sim_round_s")
    s["sim_idle_s_mean"] = mean("sim_idle_s")
    s["mean_round_s"] = mean("round_s")
    for p in PHASES:
        s[f"client_{p}_s"] = mean(f"time_{p}")
    n_clients = len({k.split("/")[1] for r in run.ranks for k in _keys(r, "clients/")}) \
        or len(run.clients) or None
    up, down = sum(col("bytes_up")) / 1e6, sum(col("bytes_down")) / 1e6
    s.update(up_mb=up, down_mb=down, n_clients=n_clients, n_client_ranks=len(run.clients))
    s["up_mb_per_client"] = up / n_clients if n_clients else None
    s["down_mb_per_client"] = down / n_clients if n_clients else None
    s["per_client_mb"] = {c: [u / 1e6, d / 1e6] for c, (u, d) in _per_client_bytes(run).items()}
    s["server_busy_frac"] = mean("server_busy_frac")
    s["body_fwd_s_total"] = sum(col("body_fwd_s")) if col("body_fwd_s") else None
    s["body_bwd_s_total"] = sum(col("body_bwd_s")) if col("body_bwd_s") else None
    s["queue_wait_s_mean"] = mean("queue_wait_s")
    def peak(ranks: list[RankData]) -> float | None:
        vals = [float(v) for r in ranks for v in r.series.get("peak_mem_mb", {}).values()]
        return max(vals) if vals else None
    s["peak_mem_mb_server"] = peak([run.server] if run.server else [])
    s["peak_mem_mb_client_max"] = peak(run.clients)
    s["events"] = dict(Counter(e[1] for r in run.ranks for e in r.events))
    s["nonfinite"] = sorted({f"r{r.rank}:{k}" for r in run.ranks for k, ser in r.series.items()
                             if not all(np.isfinite(np.asarray(v, dtype=float)).all()
                                        for v in ser.values())})
    s["warnings"] = list(run.warnings)
    return s


def _algo(path: Path) -> str | None:
    """The run's ``fed.algo`` from its config.toml (None if unreadable); runs from before ``--algo`` ran the default."""
    from .config import FedConfig, tomllib
    try:
        return str(tomllib.loads((path / "config.toml").read_text()).get("fed", {}).get("algo", FedConfig.algo))
    except (OSError, ValueError):
        return None


TABLE = [("algorithm", "algo", "{}"), ("final accuracy", "final_acc", "{:.4f}"), ("best accuracy", "best_acc", "{:.4f}"),
         ("best round", "best_round", "{}"), ("rounds completed", "rounds_completed", "{}"),
         ("last round", "last_round", "{}"), ("final test loss", "final_loss", "{:.4f}"),
         ("wall time [s]", "wall_s", "{:.1f}"), ("mean round [s]", "mean_round_s", "{:.2f}"),
         ("simulated time [s]", "sim_s", "{:.4g}"), ("simulated round [s]", "sim_round_s_mean", "{:.4g}"),
         ("straggler wait [s/round]", "sim_idle_s_mean", "{:.4g}"),
         ("target accuracy", "target_acc", "{:.4f}"), ("round at target", "target_round", "{}"),
         ("simulated time to target [s]", "target_sim_s", "{:.4g}"),
         ("wall time to target [s]", "target_wall_s", "{:.1f}")] + \
    [(f"client {p} [s/round]", f"client_{p}_s", "{:.3f}") for p in PHASES] + \
    [("up total [MB]", "up_mb", "{:.2f}"), ("down total [MB]", "down_mb", "{:.2f}"),
     ("clients", "n_clients", "{}"), ("client ranks", "n_client_ranks", "{}"),
     ("up per client [MB]", "up_mb_per_client", "{:.2f}"),
     ("down per client [MB]", "down_mb_per_client", "{:.2f}"),
     ("server busy fraction", "server_busy_frac", "{:.3f}"),
     ("body fwd total [s]", "body_fwd_s_total", "{:.2f}"),
     ("body bwd total [s]", "body_bwd_s_total", "{:.2f}"),
     ("queue wait mean [s]", "queue_wait_s_mean", "{:.3f}"),
     ("peak mem server [MB]", "peak_mem_mb_server", "{:.0f}"),
     ("peak mem client [MB]", "peak_mem_mb_client_max", "{:.0f}")] + \
    [("t-SNE test images", "tsne_samples", "{}")] + \
    [(f"{name}, {which}", f"{key}_{which}", "{:.3f}") for name, key in
     (("5-NN accuracy in t-SNE", "knn_acc_2d"), ("silhouette in t-SNE", "silhouette_2d"),
      ("linear probe accuracy", "linear_probe_acc")) for which in ("tuned", "untuned")]


def format_table(summaries: list[dict[str, Any]]) -> str:
    """Side-by-side text table: one row per metric, one column per run; absent -> '-'."""
    def cell(s: dict[str, Any], key: str, fmt: str) -> str:
        v = s.get(key)
        return "-" if v is None else fmt.format(v)

    lines = [["", *[s["run"] for s in summaries]]]
    lines += [[name, *[cell(s, key, fmt) for s in summaries]] for name, key, fmt in TABLE
              if any(s.get(key) is not None for s in summaries)]
    lines += [["events", *[", ".join(f"{k}={n}" for k, n in sorted(s["events"].items())) or "-"
                           for s in summaries]]]
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths))) for r in lines]
    for s in summaries:
        text += [f"warning [{s['run']}]: {w}" for w in s["warnings"]]
        if s["nonfinite"]:
            text.append(f"warning [{s['run']}]: non-finite values in {', '.join(s['nonfinite'])}")
    return "\n".join(text)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """All runs' round rows in one CSV; columns are the union, blanks where absent."""
    first = ["run", "round", "test_acc", "test_loss", "round_s", "cum_wall_s",
             "bytes_up", "bytes_down", "cum_mb"]
    present = {k for r in rows for k in r}
    cols = [c for c in first if c in present] + sorted(present - set(first))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x.item() if isinstance(x, np.generic) else x


def _accuracy_plots(runs: list[tuple[str, list[dict[str, Any]], dict[str, Any]]], save) -> None:
    """Test accuracy against round, cumulative communication and (with --devices) simulated time."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    for xkey, xlabel, name in (("round", "round", "accuracy_vs_round.png"),
                               ("cum_mb", "cumulative communication [MB]", "accuracy_vs_comm.png"),
                               ("cum_sim_s", "simulated time [s] (--devices)", "accuracy_vs_simtime.png")):
        curves = [(label, [r[xkey] for r in rows if "test_acc" in r and xkey in r],
                   [r["test_acc"] for r in rows if "test_acc" in r and xkey in r]) for label, rows, _ in runs]
        if any(ys for _, _, ys in curves):
            fig = Figure(figsize=(6, 4))
            ax = fig.add_subplot()
            for label, xs, ys in curves:
                ax.plot(xs, ys, marker="o", label=label)
            ax.set(xlabel=xlabel, ylabel="test accuracy")
            if xkey == "round":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend()
            save(fig, name)


def write_plots(runs: list[tuple[str, list[dict[str, Any]], dict[str, Any]]],
                out: Path) -> list[Path]:
    """Write the PNG plots that have data for (label, round rows, summary) runs; return paths."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state
    from matplotlib.ticker import MaxNLocator

    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        written.append(out / name)

    _accuracy_plots(runs, save)

    with_phase = [(label, rows) for label, rows, _ in runs
                  if any(f"time_{p}" in r for r in rows for p in PHASES)]
    if with_phase:
        fig = Figure(figsize=(5 * len(with_phase), 4))
        for i, (label, rows) in enumerate(with_phase):
            ax = fig.add_subplot(1, len(with_phase), i + 1)
            x, bottom = [r["round"] for r in rows], np.zeros(len(rows))
            for j, p in enumerate(PHASES):
                h = np.array([r.get(f"time_{p}", 0.0) for r in rows])
                if h.any():
                    ax.bar(x, h, bottom=bottom, label=p, color=f"C{j}")
                    bottom += h
            ax.set(title=label, xlabel="round", ylabel="mean client time [s]")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
        save(fig, "phase_time.png")

    with_bytes = [(label, s["per_client_mb"]) for label, _, s in runs if s["per_client_mb"]]
    if with_bytes:
        fig = Figure(figsize=(5 * len(with_bytes), 4))
        for i, (label, per) in enumerate(with_bytes):
            ax = fig.add_subplot(1, len(with_bytes), i + 1)
            x = np.arange(len(per))
            ax.bar(x - 0.2, [v[0] for v in per.values()], 0.4, label="up")
            ax.bar(x + 0.2, [v[1] for v in per.values()], 0.4, label="down")
            ax.set_xticks(x, list(per), rotation=45 if len(per) > 8 else 0)
            by_rank = next(iter(per)).startswith("r")
            ax.set(title=label, xlabel="client rank" if by_rank else "client", ylabel="MB")
            ax.legend()
        save(fig, "bytes_per_client.png")
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 for a user error)."""
    ap = argparse.ArgumentParser(prog="python -m sfprompt_mpi.analyze",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("--out", type=Path, help="output directory (default RUN_DIR/analysis, "
                    "or a compare-... directory beside the runs when several are given)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--target-acc", type=float, default=None, metavar="ACC",
                    help="report the round, simulated time and wall time at which each run first reaches "
                         "this test accuracy (0..1)")
    ap.add_argument("--tsne", action="store_true",
                    help="also a t-SNE of the pooled test-set features of each run's final model and of its "
                    "untuned starting model (tsne*.png, tsne.csv; needs the run's checkpoint and dataset)")
    ap.add_argument("--tsne-samples", type=int, default=1000, metavar="N",
                    help="test images in the t-SNE, drawn with a fixed seed (default 1000; 0: all)")
    ap.add_argument("--tsne-seed", type=int, default=0, help="the t-SNE's random state (default 0)")
    ap.error = _parser_error  # type: ignore[method-assign]
    return main_guard(lambda _: _analyze(ap.parse_args(argv)), argv)


def _parser_error(message: str) -> None:
    raise UserError(f"bad command line: {message}")


def _analyze(args: argparse.Namespace) -> int:
    if args.target_acc is not None and not 0 <= args.target_acc <= 1:
        raise UserError(f"--target-acc {args.target_acc:g} is not an accuracy in [0, 1]")
    runs = [load_run(p) for p in args.run_dirs]
    if len({r.label for r in runs}) < len(runs):
        for r in runs:
            r.label = str(r.path)
    data = [(r.label, round_rows(r)) for r in runs]
    data = [(label, rows, summarize(run, rows)) for run, (label, rows) in zip(runs, data)]
    if args.target_acc is not None:
        for _, rows, s in data:
            hit = time_to_target(rows, args.target_acc) or {}
            s.update(target_acc=args.target_acc, target_round=hit.get("round"), target_sim_s=hit.get("sim_s"),
                     target_wall_s=hit.get("wall_s"))
    sim = {run.label: client_breakdown(run.server.series, device_names(run.path)) for run in runs if run.server}
    sim = {label: clients for label, clients in sim.items() if clients}
    setups = []
    if args.tsne:  # every run's checkpoint and dataset are checked before any of the work
        from . import tsne
        if args.tsne_samples < 0:
            raise UserError(f"--tsne-samples must be >= 0 (0: the whole test set), got {args.tsne_samples}")
        setups = [(name, s["algo"] or "?", tsne.check_run(r.path)) for r, name, (_, _, s) in zip(runs, _file_names(runs), data)]
    choices = {run.label: choice_rows(run.label, run.ranks) for run in runs}
    out = args.out or _out_dir(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if setups:
            scores = tsne.run_tsne(setups, out, args.tsne_samples, args.tsne_seed)
            for (_, _, s), (name, _, _) in zip(data, setups):
                s.update(scores[name])
        print(format_table([s for _, _, s in data]))
        for label, clients in sim.items():
            print(format_breakdown(label, clients))
        for label, rows in choices.items():
            if rows:
                print(format_choices(label, rows))
        write_csv([row for _, rows, _ in data for row in rows], out / "rounds.csv")
        if any(choices.values()):
            write_csv([r for rows in choices.values() for r in rows], out / "choices.csv")
        if sim:
            write_csv([{"run": label, **c} for label, clients in sim.items() for c in clients], out / "sim_clients.csv")
        (out / "summary.json").write_text(json.dumps(
            _jsonable({"runs": [s for _, _, s in data], "sim_clients": sim}), indent=2) + "\n")
        plots = [] if args.no_plots else write_plots(data, out)
        if not args.no_plots:
            plots += [write_breakdown_plot(label, clients, out / (f"sim_clients_{i}.png" if len(sim) > 1
                                                                  else "sim_clients.png"))
                      for i, (label, clients) in enumerate(sim.items())]
    except OSError as e:
        raise UserError(f"cannot write the analysis to {out} ({e.strerror or e}); "
                        "choose another directory with --out") from e
    tsne_files = sorted({f for _, _, s in data for f in (s.get("tsne_png"), s.get("tsne_untuned_png")) if f})
    print(f"wrote {out / 'rounds.csv'}, {out / 'summary.json'}"
          + "".join(f", {p.name}" for p in plots) + "".join(f", {f}" for f in tsne_files)
          + (", tsne.csv" if setups else ""))
    return 0


def _file_names(runs: list[Run]) -> list[str]:
    """A name per run for file names: the directory's name, or its whole path when names repeat."""
    names = [Path(r.label).name for r in runs]
    if len(set(names)) < len(names):
        names = [re.sub(r"[^A-Za-z0-9._+-]+", "_", str(r.path)).strip("_") for r in runs]
    return names


def _out_dir(runs: list[Run]) -> Path:
    """RUN_DIR/analysis for one run; compare-<a>-vs-<b> beside the runs for several."""
    if len(runs) == 1:
        return runs[0].path / "analysis"
    names = "-vs-".join(Path(r.label).name for r in runs)
    if len(names) > 80:
        names = hashlib.sha1(names.encode()).hexdigest()[:12]
    parents = [str(r.path.resolve().parent) for r in runs]
    return Path(os.path.commonpath(parents)) / f"compare-{names}"


if __name__ == "__main__":
    end_process(main())
