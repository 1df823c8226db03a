"""analyze CLI on fake run directories written with the real MetricsWriter."""

from __future__ import annotations

import csv
import subprocess
import sys
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from sfprompt_mpi import analyze
from sfprompt_mpi.metrics.h5 import MetricsWriter, link_rank_files, rank_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy_vs_round.png", "accuracy_vs_comm.png", "phase_time.png", "bytes_per_client.png")


def make_run(path, rounds=3, client_rounds=(3, 3), accs=(0.3, 0.5, 0.6), eval_every=1):
    """Rank 0 server + one client rank per entry of ``client_rounds`` (two clients each)."""
    path.mkdir(parents=True)
    (path / "config.toml").write_text("[fed]\nrounds = 3\n")
    attrs = {"config": "[fed]\nrounds = 3\n", "host": "h", "device": "cpu",
             "versions": {"torch": "x"}}
    with MetricsWriter(path, 0, role="server", attrs=attrs) as w:
        for r in range(1, rounds + 1):
            if r % eval_every == 0 or r == rounds:
                w.log({"test_acc": accs[r - 1], "test_loss": 2.0 - r / 2}, step=r)
            w.log({"round_s": 1.5,
                   "body_fwd_s": 0.2, "body_bwd_s": 0.3, "server_busy_frac": 0.4,
                   "queue_wait_s": 0.01, "bytes_sent/params": 4000, "bytes_recv/update": 4000,
                   "agg_weights": [0.25, 0.25, 0.25, 0.25], "selected": [1, 2, 3, 4],
                   "peak_mem_mb": 900.0}, step=r)
        w.event(2, "dropout", "client 4 timed out")
    for rank, n in enumerate(client_rounds, start=1):
        with MetricsWriter(path, rank, role="client", attrs=attrs) as w:
            for r in range(1, n + 1):
                m = {"bytes_sent/acts": 1e6 * rank, "bytes_sent/grad_out": 1e6,
                     "bytes_recv/body_out": 1e6, "bytes_recv/params": 2e5, "peak_mem_mb": 300.0}
                for cid in (2 * rank - 1, 2 * rank):
                    m |= {f"clients/{cid}/local_loss": 1.0 / r, f"clients/{cid}/local_acc": 0.1 * r,
                          f"clients/{cid}/split_loss": 1.1 / r, f"clients/{cid}/kept": 50,
                          f"clients/{cid}/el2n_mean": 0.7}
                    m |= {f"clients/{cid}/time/{p}": 0.1 * (i + 1)
                          for i, p in enumerate(analyze.PHASES)}
                w.log(m, step=r)
    link_rank_files(path, 1 + len(client_rounds))
    return path


def assert_real_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert imread(path).std() > 0


def test_single_run(tmp_path, capsys):
    run = make_run(tmp_path / "runA")

    code = analyze.main([str(run)])
    out = capsys.readouterr().out

    assert code == 0
    assert "final accuracy" in out and "0.6000" in out and "best accuracy" in out
    rows = list(csv.DictReader(open(run / "analysis" / "rounds.csv")))
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert float(rows[0]["bytes_up"]) == pytest.approx(1e6 + 2e6 + 2e6)  # acts 1e6, 2e6 + grad_out
    assert float(rows[0]["bytes_down"]) == pytest.approx(2 * 1.2e6)
    assert float(rows[2]["cum_mb"]) == pytest.approx(3 * 7.4)
    summary = json.loads((run / "analysis" / "summary.json").read_text())["runs"][0]
    assert summary["final_acc"] == pytest.approx(0.6) and summary["rounds_completed"] == 3
    assert (summary["n_clients"], summary["n_client_ranks"]) == (4, 2)
    assert summary["events"] == {"dropout": 1}
    assert summary["client_split_s"] == pytest.approx(0.3)
    assert summary["wall_s"] == pytest.approx(4.5)
    for name in PLOTS:
        assert_real_png(run / "analysis" / name)


def test_truncated_run_and_missing_client_file(tmp_path, capsys):
    run = make_run(tmp_path / "crashed", rounds=2, client_rounds=(3, 1))
    rank_file(run, 2).unlink()

    code = analyze.main([str(run), "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())["runs"][0]

    assert code == 0
    assert summary["rounds_completed"] == 2 and summary["final_acc"] == pytest.approx(0.5)
    assert summary["last_round"] == 2
    assert any("ranks [2]" in w for w in summary["warnings"]) and "ranks [2]" in out
    assert_real_png(tmp_path / "o" / "accuracy_vs_round.png")


def test_corrupt_rank_file_is_skipped_with_warning(tmp_path, capsys):
    run = make_run(tmp_path / "corrupt")
    rank_file(run, 2).write_bytes(b"not hdf5")

    code = analyze.main([str(run), "--no-plots"])
    out = capsys.readouterr().out

    assert code == 0
    assert "skipped unreadable rank00002.h5" in out and "0.6000" in out


@pytest.mark.parametrize("make_bad", [
    lambda p: p / "nope",
    lambda p: (p / "empty").mkdir() or p / "empty",
    lambda p: ((p / "nometrics").mkdir(), (p / "nometrics" / "config.toml").write_text(""))
    and p / "nometrics",
])
def test_bad_path_exits_2_with_one_line(tmp_path, capsys, make_bad):
    bad = make_bad(tmp_path)

    code = analyze.main([str(bad)])
    err = capsys.readouterr().err

    assert code == 2
    assert err.count("\n") == 1 and "not a run directory" in err


def test_two_runs_side_by_side(tmp_path, capsys):
    a = make_run(tmp_path / "runA")
    b = make_run(tmp_path / "runB", accs=(0.2, 0.4, 0.7))

    code = analyze.main([str(a), str(b), "--no-plots"])
    out = capsys.readouterr().out
    cmp_dir = tmp_path / "compare-runA-vs-runB"

    assert code == 0
    lines = out.splitlines()
    header, acc_line = lines[0], next(x for x in lines if x.startswith("final accuracy"))
    assert header.split() == ["runA", "runB"]
    assert acc_line.split()[-2:] == ["0.6000", "0.7000"]
    rows = list(csv.DictReader(open(cmp_dir / "rounds.csv")))
    assert [r["run"] for r in rows] == ["runA"] * 3 + ["runB"] * 3
    assert not list(cmp_dir.glob("*.png"))


def test_comparison_plots(tmp_path):
    a = make_run(tmp_path / "runA")
    b = make_run(tmp_path / "runB", accs=(0.2, 0.4, 0.7))

    code = analyze.main([str(a), str(b), "--out", str(tmp_path / "cmp")])

    assert code == 0
    for name in PLOTS:
        assert_real_png(tmp_path / "cmp" / name)


def test_nonfinite_values_are_flagged(tmp_path, capsys):
    run = make_run(tmp_path / "nan", accs=(0.3, float("nan"), 0.6))

    assert analyze.main([str(run), "--no-plots"]) == 0
    summary = json.loads((run / "analysis" / "summary.json").read_text())["runs"][0]

    assert "r0:test_acc" in summary["nonfinite"]
    assert summary["best_acc"] == pytest.approx(0.6)
    assert "non-finite" in capsys.readouterr().out
    assert np.isfinite(summary["final_acc"])


def test_sparse_evaluation_counts_every_round(tmp_path):
    run = make_run(tmp_path / "sparse", eval_every=2)

    assert analyze.main([str(run), "--no-plots"]) == 0
    summary = json.loads((run / "analysis" / "summary.json").read_text())["runs"][0]

    assert summary["rounds_completed"] == 3
    assert (summary["best_acc"], summary["best_round"]) == (pytest.approx(0.6), 3)


def test_the_sweeps_compare_command_works_again_after_its_first_comparison(tmp_path):
    # jobs/array_sweep.sbatch prints `analyze $root/[0-9]*-seed*`: the comparison it writes into the
    # sweep folder (compare-...) must not be taken for a task directory the second time.
    from sfprompt_mpi.run import main as run_main
    root = tmp_path / "sweep"
    for task, seed in ((0, 0), (1, 1)):
        assert run_main(["--clients", "2", "--rounds", "1", "--max-train-samples", "40", "--max-test-samples", "20",
                         "--threads", "1", "--no-pretrained", "--seed", str(seed),
                         "--run-dir", str(root / f"{task}-digits-iid-sfprompt-seed{seed}")]) == 0
    line = next(l for l in (Path(__file__).parents[1] / "jobs" / "array_sweep.sbatch").read_text().splitlines()
                if "compare the sweep:" in l)
    pattern = line.split("analyze ")[1].rstrip('"').replace("$root", str(root))
    command = f"{sys.executable} -m sfprompt_mpi.analyze {pattern}"
    for attempt in (1, 2):
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (attempt, done.stderr)
    assert any(p.name.startswith("compare-") for p in root.iterdir())


# --- t-SNE of the pooled features (SFPrompt's Figures 3-6) ------------------------------------------------------

TINY = ["--clients", "2", "--rounds", "1", "--max-train-samples", "80", "--max-test-samples", "40", "--threads", "1"]


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """Two tiny finished single-process runs on digits with the shipped backbone: sfprompt and fl-linear."""
    from sfprompt_mpi.run import main as run_main
    root = tmp_path_factory.mktemp("tsne")
    for algo in ("sfprompt", "fl-linear"):
        assert run_main([*TINY, "--algo", algo, "--run-dir", str(root / algo), "--log-level", "WARNING"]) == 0
    return root


def _copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("analysis"))
    return dst


def test_tsne_writes_the_plots_and_the_coordinates_of_every_sampled_test_image(finished_runs, tmp_path, capsys):
    from sfprompt_mpi import tsne
    run, out = finished_runs / "sfprompt", tmp_path / "a"

    code = analyze.main([str(run), "--tsne", "--tsne-samples", "30", "--out", str(out)])
    captured = capsys.readouterr()

    assert code == 0
    for name in ("tsne.png", "tsne_untuned.png"):
        assert_real_png(out / name)
    rows = list(csv.DictReader(open(out / "tsne.csv")))
    assert [sum(r["model"] == m for r in rows) for m in ("tuned", "untuned")] == [30, 30]
    setup = tsne.check_run(run)
    _, _, test = tsne.build_models(setup)
    labels = {int(i): int(test[int(i)][1]) for i in tsne.sample_indices(len(test), 30)}
    assert {(int(r["test_index"]), int(r["label"])) for r in rows} == set(labels.items())
    assert all(np.isfinite(float(r["x"])) and np.isfinite(float(r["y"])) for r in rows)
    s = json.loads((out / "summary.json").read_text())["runs"][0]
    assert s["tsne_samples"] == 30 and 0 <= s["knn_acc_2d_tuned"] <= 1 and -1 <= s["silhouette_2d_untuned"] <= 1
    assert "5-NN accuracy in t-SNE, tuned" in captured.out and "tsne.png" in captured.out
    assert "untuned: features of 30 test images" in captured.err


def test_the_tuned_model_is_the_runs_final_model_and_differs_from_the_untuned_one(finished_runs):
    # Prepare: the checkpoint of the last round, loaded into the model built from the run's config.toml.
    import torch
    from sfprompt_mpi import tsne
    from sfprompt_mpi.fed.training import take_batch
    run = finished_runs / "sfprompt"
    untuned, tuned, test = tsne.build_models(tsne.check_run(run))
    images, labels = take_batch(test, list(range(len(test))))
    # Execute
    with torch.no_grad():
        acc = float((tuned(images).argmax(-1) == labels).float().mean())
    f_tuned, _ = tsne.extract_features(tuned, test, np.arange(len(test)))
    f_untuned, _ = tsne.extract_features(untuned, test, np.arange(len(test)))
    # Assert: the tuned model scores what the run logged for its last round; tuning moved the features.
    s = analyze.summarize(analyze.load_run(run), analyze.round_rows(analyze.load_run(run)))
    assert acc == pytest.approx(s["final_acc"])
    assert f_tuned.shape == f_untuned.shape == (len(test), 64)
    assert not np.allclose(f_tuned, f_untuned)


def test_tsne_of_two_runs_names_the_plots_by_run(finished_runs, tmp_path):
    out = tmp_path / "cmp"

    code = analyze.main([str(finished_runs / "sfprompt"), str(finished_runs / "fl-linear"), "--tsne",
                         "--tsne-samples", "20", "--no-plots", "--out", str(out)])

    assert code == 0
    # prompts change the starting model's features: sfprompt and fl-linear start from different models
    names = {"tsne-sfprompt.png", "tsne-fl-linear.png", "tsne_untuned-sfprompt.png", "tsne_untuned-fl-linear.png"}
    assert {p.name for p in out.glob("*.png")} == names
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["tsne_png"] for r in runs] == ["tsne-sfprompt.png", "tsne-fl-linear.png"]
    assert {r["run"] for r in csv.DictReader(open(out / "tsne.csv"))} == {"sfprompt", "fl-linear"}


@pytest.mark.parametrize("breakage, needle", [
    (lambda run: __import__("shutil").rmtree(run / "checkpoint"), "has no checkpoint"),
    (lambda run: (run / "config.toml").write_text((run / "config.toml").read_text().replace(
        'dataset = "digits"', 'dataset = "cifar10"').replace('data_dir = "data"', f'data_dir = "{run}/none"')),
     "dataset cifar10 not found"),
])
def test_tsne_without_checkpoint_or_dataset_is_one_line_and_exit_2(finished_runs, tmp_path, capsys, breakage, needle):
    run = _copy_run(finished_runs / "sfprompt", tmp_path / "broken")
    breakage(run)

    code = analyze.main([str(run), "--tsne"])
    captured = capsys.readouterr()

    assert code == 2
    assert captured.err.count("\n") == 1 and needle in captured.err, captured.err
    assert not (run / "analysis").exists()
