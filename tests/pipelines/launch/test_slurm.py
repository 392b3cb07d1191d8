"""`zerotrain env` under a real two-node Slurm (the slurm_cluster fixture: slurmctld and
`slurmd -N zn1`, `-N zn2` on this machine): srun's tasks resolve as nodes 0 and 1 of 2
with one master and one run id; other launches are refused or are no launch at all."""

import json
import subprocess

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
