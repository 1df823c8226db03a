"""The sbatch scripts under jobs/, run through a real Slurm.

A private two-node Slurm cluster (both nodes on this host, see
tests/slurm_cluster.py) runs the scripts exactly as a user submits them,
with only what a user would change from the command line: account and
partition (sbatch -A/-p), the shape (fewer ranks), and the environment
variables the scripts document (CONFIG=configs/offline.toml, EXTRA_ARGS with
--server-device cpu). Needs root (the harness apt-installs Slurm, munge and
shellcheck when they are missing and runs slurmd as root); it never skips.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, ensure_installed

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
SCRIPTS = sorted(JOBS.glob("*.sbatch"))
OFFLINE = REPO / "configs" / "offline.toml"
SITE = ["-A", "test", "-p", "debug"]  # what a user edits: account and partition
DRY = "--dry-run --server-device cpu"
JOB_TIMEOUT = 240  # seconds; a dry run takes ~20 s on two cores, most of it importing torch


@pytest.fixture(scope="module")
def cluster():
    """A running two-node Slurm cluster for this module; gone afterwards."""
    c = SlurmCluster(nodes=2, cpus=16, gpus=1)
    c.start()
    print(f"\nSlurm test cluster up in {c.start_seconds:.1f} s")
    try:
        yield c
    finally:
        c.stop()


def job_env(**extra: str) -> dict[str, str]:
    """This interpreter first on PATH, the repository importable, CONFIG offline."""
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "PYTHON": sys.executable,
        "CONFIG": str(OFFLINE),
    }
    env.update(extra)
    return env


def run_job(cluster: SlurmCluster, script: str, cwd: Path, args: list[str], env: dict[str, str]) -> list[str]:
    """Submit, wait, require COMPLETED for every record (het components, array tasks).

    Returns the batch outputs: one per array task; one for a het job (its
    script runs in component 0, the other components write no file).
    """
    job_id = cluster.submit(JOBS / script, env=env, args=args, cwd=cwd)
    infos = cluster.wait(job_id, timeout=JOB_TIMEOUT)
    outputs = [cluster.job_output(i) for i in infos if i.stdout_path and i.stdout_path.is_file()]
    for info in infos:
        assert info.state == "COMPLETED" and info.exit_code == "0:0", (
            f"{script} job {info.job_id}: {info.state} exit {info.exit_code}\n" + "".join(outputs))
    assert outputs, f"{script} job {job_id} left no output file"
    return outputs


# --- static checks -----------------------------------------------------------

def test_shellcheck_passes():
    ensure_installed(packages=("shellcheck",), binaries=("shellcheck",))
    assert {p.name for p in SCRIPTS} >= {"single_node.sbatch", "multi_node.sbatch", "hetjob.sbatch",
                                         "array_sweep.sbatch"}
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_site_lines_are_marked(script):
    text = (JOBS / script).read_text()
    assert "EDIT FOR YOUR CLUSTER" in text
    assert re.search(r"^#SBATCH --account=", text, re.M) and re.search(r"^#SBATCH --partition=", text, re.M)


def test_array_sweep_lists_its_tasks_outside_slurm():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(JOBS / "array_sweep.sbatch")], capture_output=True, text=True,
                          env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "192 tasks: sbatch --array=0-191" in proc.stdout
    array_line = re.search(r"^#SBATCH --array=0-(\d+)", (JOBS / "array_sweep.sbatch").read_text(), re.M)
    assert array_line and int(array_line.group(1)) == 191, "the #SBATCH --array range must match the sweep"


# --- the scripts as written are accepted by Slurm ----------------------------

@pytest.mark.slurm
@pytest.mark.parametrize("script", [p.name for p in SCRIPTS])
def test_default_shape_is_accepted(cluster, tmp_path, script):
    # Prepare: a 2 x 16-CPU cluster, each node with one GPU. Execute: sbatch --test-only.
    answer = cluster.test_only(JOBS / script, env=job_env(), args=SITE, cwd=tmp_path)
    # Assert: Slurm would start it (no conflicting options, a shape that fits).
    assert "to start at" in answer


@pytest.mark.slurm
def test_cpu_only_shape_with_gres_none_is_accepted(cluster, tmp_path):
    answer = cluster.test_only(JOBS / "single_node.sbatch", env=job_env(), args=[*SITE, "--gres=none"], cwd=tmp_path)
    assert "to start at" in answer


def test_array_sweep_listing_prints_the_settings_that_produced_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DATASETS="digits", SEEDS="0 1")
    proc = subprocess.run(["bash", str(JOBS / "array_sweep.sbatch")], capture_output=True, text=True,
                          env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert 'tasks: DATASETS="digits" SEEDS="0 1" sbatch --array=0-31 jobs/array_sweep.sbatch' in proc.stdout


def test_array_sweep_lists_a_clients_axis_and_keeps_its_tasks_without_one():
    # Prepare: Figure 2's sweep, 2 client counts x 2 algorithms.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DATASETS="digits", SPLITS="iid", CLIENTS="2 16", ALGOS="sfprompt fl-full", SEEDS="0")
    # Execute
    proc = subprocess.run(["bash", str(JOBS / "array_sweep.sbatch")], capture_output=True, text=True,
                          env=env, timeout=30)
    bad = subprocess.run(["bash", str(JOBS / "array_sweep.sbatch")], capture_output=True, text=True,
                         env={**env, "CLIENTS": "2 x"}, timeout=30)
    # Assert: the clients vary slower than the algorithm, every task lists its count, the command repeats them.
    assert proc.returncode == 0, proc.stderr
    tasks = [line.split() for line in proc.stdout.splitlines()[:-1]]
    assert [(t[0], t[3], t[5]) for t in tasks] == [("0", "2", "sfprompt"), ("1", "2", "fl-full"),
                                                   ("2", "16", "sfprompt"), ("3", "16", "fl-full")]
    assert proc.stdout.splitlines()[-1] == ('4 tasks: DATASETS="digits" SPLITS="iid" CLIENTS="2 16" '
                                            'ALGOS="sfprompt fl-full" SEEDS="0" sbatch --array=0-3 jobs/array_sweep.sbatch')
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "CLIENTS must be client counts" in bad.stderr


def _fails_at_once(cluster: SlurmCluster, script: str, tmp_path: Path, args: list[str], env: dict[str, str],
                   needle: str) -> str:
    job_id = cluster.submit(JOBS / script, env=env, args=[*SITE, *args], cwd=tmp_path)
    (info,) = cluster.wait(job_id, timeout=JOB_TIMEOUT)[:1]
    output = cluster.job_output(info)
    assert info.state == "FAILED" and info.exit_code == "2:0", f"{info.state} {info.exit_code}\n{output}"
    assert needle in output and "Traceback" not in output and "sfprompt_mpi.analyze" not in output, output
    return output


@pytest.mark.slurm
def test_an_interpreter_without_the_package_is_one_line_and_exit_2(cluster, tmp_path):
    _fails_at_once(cluster, "single_node.sbatch", tmp_path, ["--ntasks=2"],
                   job_env(PYTHON="/usr/bin/python3", EXTRA_ARGS=DRY), "or set PYTHON=")


@pytest.mark.slurm
def test_a_user_error_ends_the_job_with_2_whichever_rank_srun_signals_first(cluster, tmp_path):
    # srun --kill-on-bad-exit sends SIGTERM to the ranks still running once one exits 2: each still exits 2
    _fails_at_once(cluster, "single_node.sbatch", tmp_path, ["--ntasks=3"],
                   job_env(EXTRA_ARGS="--server-device cpu --keep-ratio 0"), "error: ")


@pytest.mark.slurm
def test_a_sweep_without_a_paper_config_suggests_config(cluster, tmp_path):
    env = job_env(EXTRA_ARGS=DRY, DATASETS="digits", ALGOS="sfprompt", SEEDS="0")
    del env["CONFIG"]
    _fails_at_once(cluster, "array_sweep.sbatch", tmp_path, ["--array=0", "--ntasks=2"], env, "set CONFIG=")


# --- every script's command passes --dry-run under the real Slurm ------------

DRY_RUNS = {
    "single_node": (["--ntasks=3"], {}),
    "single_node-mpiexec": (["--ntasks=3"], {"LAUNCHER": "mpiexec"}),
    "multi_node": (["--nodes=2", "--ntasks-per-node=2"], {}),
    # sbatch options before ':' go to every component, after it to component 1 only.
    "hetjob": ([":", *SITE, "--ntasks-per-node=2"], {"EXTRA_ARGS": f"{DRY} --clients 6"}),
    # Tasks 1 and 2 of (iid, dir0.1) x sfprompt x seeds (3, 4): both split kinds, both seeds.
    "array_sweep": (["--array=1-2", "--ntasks=2"],
                    {"DATASETS": "digits", "SPLITS": "iid dir0.1", "ALGOS": "sfprompt", "SEEDS": "3 4"}),
    # Tasks 0 and 1 of a clients axis (1, 4): one client takes 2 of the job's 3 ranks, four take all 3.
    "array_sweep-clients": (["--array=0-1", "--ntasks=3"],
                            {"DATASETS": "digits", "SPLITS": "iid", "CLIENTS": "1 4", "ALGOS": "sfprompt", "SEEDS": "0"}),
}


@pytest.mark.slurm
@pytest.mark.parametrize("case", list(DRY_RUNS))
def test_dry_run_through_slurm(cluster, tmp_path, case):
    # Prepare
    script = case.split("-")[0] + ".sbatch"
    args, extra_env = DRY_RUNS[case]
    env = job_env(**{"EXTRA_ARGS": DRY, **extra_env})
    # Execute
    outputs = run_job(cluster, script, tmp_path, [*SITE, *args], env)
    # Assert: rank 0 printed the plan for the whole world; no analyze line for a run directory never made.
    for out in outputs:
        assert "dry run: config and world size are valid" in out, out
        assert "python -m sfprompt_mpi.analyze" not in out, out
    if case == "array_sweep":
        assert len(outputs) == 2
        text = "".join(outputs)
        for needle in ("--dataset digits --partition iid --algo sfprompt --seed 4",
                       "--partition dirichlet --alpha 0.1 --algo sfprompt --seed 3",
                       "/1-digits_iid-sfprompt-seed4", "/2-digits_dir0.1-sfprompt-seed3"):
            assert needle in text, text
        assert "on digits" in text and "dirichlet" in text
    if case == "array_sweep-clients":
        text = "".join(outputs)
        for needle in ("--ntasks=2 ", "--clients 1 --algo sfprompt", "--clients 4 --algo sfprompt",
                       "/0-digits_iid-c1-sfprompt-seed0", "/1-digits_iid-c4-sfprompt-seed0"):
            assert needle in text, text


@pytest.mark.slurm
def test_srun_without_pmi_fails_with_one_line(cluster, tmp_path):
    # Prepare: srun --mpi=none starts the ranks with no process manager to join them.
    env = job_env(EXTRA_ARGS=DRY, SRUN_MPI="none")
    # Execute
    job_id = cluster.submit(JOBS / "single_node.sbatch", env=env, args=[*SITE, "--ntasks=2"], cwd=tmp_path)
    (info,) = cluster.wait(job_id, timeout=JOB_TIMEOUT)
    output = cluster.job_output(info)
    # Assert: a clear refusal and a failed job, not two independent one-rank runs.
    assert info.state == "FAILED", output
    assert "no MPI process manager is visible" in output, output
    assert "dry run: config and world size are valid" not in output, output


# --- a real (tiny) training run ----------------------------------------------

@pytest.mark.slurm
def test_single_node_trains_and_writes_run_dir(cluster, tmp_path):
    # Prepare: 1 server + 2 client ranks, server on CPU, one short round.
    env = job_env(EXTRA_ARGS="--server-device cpu --rounds 1 --max-train-samples 200 --max-test-samples 100")
    t0 = time.monotonic()
    # Execute
    (output,) = run_job(cluster, "single_node.sbatch", tmp_path, [*SITE, "--ntasks=3"], env)
    elapsed = time.monotonic() - t0
    # Assert: the run directory is named after the job and holds everything the contract names.
    job_id = re.search(r"job (\d+) finished with exit status 0", output)
    assert job_id, output
    run_dir = tmp_path / "runs" / job_id.group(1)
    assert (run_dir / "config.toml").is_file()
    assert (run_dir / "run.h5").is_file()
    for rank in range(3):
        assert (run_dir / "metrics" / f"rank{rank:05d}.h5").is_file(), sorted(run_dir.rglob("*"))
    assert not (run_dir / "metrics" / "rank00003.h5").exists()
    assert (run_dir / "checkpoint" / "global.safetensors").is_file()
    assert (run_dir / "checkpoint" / "state.json").is_file()
    print(f"single_node job: {elapsed:.1f} s")

    # The analyze command the script printed works as printed.
    line = next(ln for ln in output.splitlines() if "python -m sfprompt_mpi.analyze" in ln)
    cmd = shlex.split(line.split(":", 1)[1])
    cmd[0] = sys.executable
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- time limits and preemption: stop after a round, requeue, continue -------

# Rounds of 2-8 s on 2 cores (idle to loaded): 8 of them leave the scontrol requeue test 6 rounds to land
# in. The wall-time test makes its first round long instead (see there). Slurm starts a requeued job no
# sooner than 2 minutes later (its BeginTime); both tests move that to now, as an administrator may.
ROUNDS = 8
STOP_ARGS = f"--server-device cpu --server-batch 1 --rounds {ROUNDS} --seed 3 --max-test-samples 200"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run of STOP_ARGS in one process, uninterrupted: what every stopped and requeued job must end as."""
    from sfprompt_mpi.run import main
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(["--config", str(OFFLINE), "--threads", "1", "--run-dir", str(run_dir), *STOP_ARGS.split()]) == 0
    return run_dir


def _assert_requeued_and_continued(cluster: SlurmCluster, job_id: int, tmp_path: Path, whole: Path) -> str:
    """The job completed after at least one requeue and ends bitwise as ``whole``; -> its output."""
    from test_stopping import assert_continued_like_uninterrupted
    (info,) = cluster.wait(job_id, timeout=900)
    output = cluster.job_output(info)
    assert info.state == "COMPLETED" and info.exit_code == "0:0", \
        f"{info.state} {info.exit_code}\n{output}{cluster.job_log(job_id)}"
    assert int(info.fields.get("Restarts", 0)) >= 1, output + cluster.job_log(job_id)
    assert "stopped after round" in output and "Traceback" not in output, output
    assert_continued_like_uninterrupted(tmp_path / "runs" / str(job_id), whole, ROUNDS, ranks=3)
    return output


@pytest.mark.slurm
def test_wall_time_limit_stops_after_a_round_requeues_and_ends_like_an_uninterrupted_run(
        cluster, tmp_path, uninterrupted):
    # Prepare: rank 1 sends its first activations 25 s late (--inject-fault slow sleeps half of
    # --client-timeout), which changes no number. Round 1 then takes 25 s or more, so at its end at most
    # 35 s of the job's minute are left, less than stopping.py asks for another round (1.25 x 25 s + 5 s):
    # the run stops after round 1 on any machine, if its setup leaves round 1 time to end (< ~30 s)
    env = job_env(EXTRA_ARGS=STOP_ARGS + " --client-timeout 50 --inject-fault slow@rank:1,round:1")
    # Execute: the run reads the job's end time (--time-budget's default), stops, the script requeues;
    # then, as an administrator might, give the requeued job time enough to finish (one requeue, not five)
    job_id = cluster.submit(JOBS / "single_node.sbatch", env=env, cwd=tmp_path,
                            args=[*SITE, "--ntasks=3", "--time=1"])
    cluster.start_requeued_now(job_id, timeout=300, TimeLimit="10")
    output = _assert_requeued_and_continued(cluster, job_id, tmp_path, uninterrupted)
    # Assert: it stopped on its own, on the time budget, and said how it continues
    assert "(time budget:" in output and "requeueing job" in output, output
    assert "analyze it with:" in output.split("requeueing job")[-1], output


@pytest.mark.slurm
def test_scontrol_requeue_mid_round_stops_requeues_and_ends_like_an_uninterrupted_run(
        cluster, tmp_path, uninterrupted):
    # Prepare
    env = job_env(EXTRA_ARGS=STOP_ARGS)
    job_id = cluster.submit(JOBS / "single_node.sbatch", env=env, args=[*SITE, "--ntasks=3"], cwd=tmp_path)
    state = tmp_path / "runs" / str(job_id) / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (state.is_file() and '"round": 2' in state.read_text()):
        time.sleep(0.2)
    assert state.is_file(), cluster.job_output(cluster.job(job_id)[0])
    # Execute: what an administrator or a preempting job does, mid-round
    cluster._client(["scontrol", "requeue", str(job_id)])
    cluster.start_requeued_now(job_id, timeout=120)
    # Assert
    output = _assert_requeued_and_continued(cluster, job_id, tmp_path, uninterrupted)
    assert "SIGTERM to rank" in output, output
