"""`zerotrain env` under a real two-node Slurm (the slurm_cluster fixture: slurmctld and
`slurmd -N zn1`, `-N zn2` on this machine): srun's tasks resolve as nodes 0 and 1 of 2
with one master and one run id; other launches are refused or are no launch at all."""

import json
import os
import signal
import subprocess
import time

import pytest

from pipelines.launch import slurm_master_port

pytestmark = pytest.mark.slurm


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_srun_tasks_resolve_as_nodes_0_and_1_of_one_run(slurm_cluster):
    done = slurm_cluster.run(
        "srun", "-N2", "--ntasks-per-node=1", *slurm_cluster.zerotrain(), "env", "--json"
    )
    assert done.returncode == 0, done.stderr
    tasks = sorted(json_lines(done.stdout), key=lambda t: t["node_rank"])
    assert [t["node_rank"] for t in tasks] == [0, 1]
    assert [t["advertise_addr"] for t in tasks] == ["zn1", "zn2"]
    assert {t["nnodes"] for t in tasks} == {2}
    assert {t["launcher"] for t in tasks} == {"slurm"}
    (master,) = {(t["master_addr"], t["master_port"], t["run_id"]) for t in tasks}
    job_id = int(master[2])
    assert master == ("zn1", slurm_master_port(job_id), str(job_id))


def test_srun_with_several_tasks_per_node_is_refused_by_every_task(slurm_cluster):
    done = slurm_cluster.run("srun", "-N2", "-n4", *slurm_cluster.zerotrain(), "env")
    assert done.returncode == 2
    refusals = [line for line in done.stderr.splitlines() if line.startswith("zerotrain env:")]
    assert len(refusals) == 4
    assert all("SLURM_STEP_NUM_TASKS=4 over SLURM_STEP_NUM_NODES=2" in r for r in refusals)


def test_a_bare_salloc_shell_is_not_a_launch(slurm_cluster):
    done = slurm_cluster.run("salloc", "-N2", *slurm_cluster.zerotrain(), "env", "--json")
    assert done.returncode == 0, done.stderr
    (ident,) = json_lines(done.stdout)
    assert (ident["nnodes"], ident["launcher"], ident["run_id"]) == (1, "none", None)
    assert "without SLURM_STEP_ID" in ident["notes"][0]


def test_a_step_on_the_second_node_of_an_allocation_is_its_own_master(slurm_cluster):
    done = slurm_cluster.run(
        "salloc", "-N2", "srun", "-N1", "-w", "zn2", *slurm_cluster.zerotrain(), "env", "--json"
    )
    assert done.returncode == 0, done.stderr
    (ident,) = json_lines(done.stdout)
    assert (ident["nnodes"], ident["node_rank"], ident["master_addr"]) == (1, 0, "zn2")


def test_srun_of_two_node_agents_gives_the_bits_of_one_host(slurm_cluster, tmp_path):
    """The acceptance run: `srun -N2 --ntasks-per-node=1 zerotrain run char_lm --ranks 4
    --mode zero2 --steps 40` -- two agents on zn1 (127.0.0.2) and zn2 (127.0.0.3), the
    run dir runs/char_lm-<job id> shared through the cwd -- ends with the params_sha256
    of the same run on one host."""
    run = ["run", "char_lm", "--ranks", "4", "--mode", "zero2", "--steps", "40"]
    done = subprocess.run(
        ["srun", "-N2", "--ntasks-per-node=1", *slurm_cluster.zerotrain(), *run],
        env=slurm_cluster.env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").glob("char_lm-*")
    assert (run_dir / "node-1" / "config.json").exists()
    one_host = subprocess.run(
        [*slurm_cluster.zerotrain(), *run, "--run-dir", str(tmp_path / "one")],
        env=slurm_cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one_host.returncode == 0, one_host.stderr[-3000:]
    sha = [json.loads((d / "summary.json").read_text())["params_sha256"]
           for d in (run_dir, tmp_path / "one")]  # fmt: skip
    assert sha[0] == sha[1]


def test_scancel_usr1_stops_both_nodes_at_one_step_and_a_resumed_srun_gives_the_bits_of_one_host(
    slurm_cluster, tmp_path
):
    """`scancel --signal=USR1` during `srun -N2 ... zerotrain run`: Slurm signals every
    task (both agents, and their ranks), one planned stop; srun ends with exit 4, the
    checkpoint of the agreed step is complete; a second srun of the same command with
    --resume (a requeue) ends with the params_sha256 of the run on one host."""
    run_dir = tmp_path / "run"
    run = ["run", "char_lm", "--ranks", "4", "--mode", "zero2", "--steps", "40"]
    srun = ["srun", "-N2", "--ntasks-per-node=1", *slurm_cluster.zerotrain(), *run]
    srun += ["--run-dir", str(run_dir)]
    first = subprocess.Popen(
        srun, env=slurm_cluster.env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 5:
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no 5 steps within 300 s"
            time.sleep(0.1)
        jobs = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()
        assert len(jobs) == 1, jobs
        cancel = slurm_cluster.run("scancel", "--signal=USR1", jobs[0])
        assert cancel.returncode == 0, cancel.stderr
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 4, err[-3000:]
    stopped = [ln for ln in err.splitlines() if "zerotrain run: stopped at step" in ln]
    assert len(stopped) == 2, err[-3000:]  # one line from each node's agent
    steps = {int(ln.split("stopped at step ")[1].split()[0]) for ln in stopped}
    assert len(steps) == 1, stopped  # one step agreed by both nodes
    (step,) = steps
    assert 5 <= step < 40
    assert (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists()

    again = subprocess.run(
        [*srun, "--resume", str(run_dir)], env=slurm_cluster.env, cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed at step {step}" in again.stderr
    one_host = subprocess.run(
        [*slurm_cluster.zerotrain(), *run, "--run-dir", str(tmp_path / "one")],
        env=slurm_cluster.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one_host.returncode == 0, one_host.stderr[-3000:]
    sha = [json.loads((d / "summary.json").read_text())["params_sha256"]
           for d in (run_dir, tmp_path / "one")]  # fmt: skip
    assert sha[0] == sha[1]
