"""`zerotrain env`: the identity and where each value came from, as a table or JSON;
anything refused is one line on stderr and exit 2."""

import json

import pytest

from pipelines.cli import main
from pipelines.launch import slurm_master_port
from tests.pipelines.cli_util import zerotrain

SRUN = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_ID": "0",
    "SLURM_NODEID": "1",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NODELIST": "zn[1-2]",
    "SLURMD_NODENAME": "zn2",
}


@pytest.fixture
def under_srun(monkeypatch):
    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)


def env_json(capsys, *argv) -> dict:
    assert main(["env", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_env_json_gives_the_identity_and_each_values_source(under_srun, capsys):
    out = env_json(capsys, "--ranks", "4")
    assert {k: out[k] for k in ("nnodes", "node_rank", "master_addr", "run_id")} == {
        "nnodes": 2,
        "node_rank": 1,
        "master_addr": "zn1",
        "run_id": "77",
    }
    assert (out["master_port"], out["ranks_per_node"], out["world_size"]) == (
        slurm_master_port(77), 2, 4,
    )  # fmt: skip
    assert out["sources"]["node_rank"] == "SLURM_NODEID=1"
    assert out["sources"]["ranks_per_node"] == "--ranks = 4 / 2 node(s)"
    assert out["launcher"] == "slurm" and out["notes"] == []


def test_env_prints_a_table_of_values_and_sources(under_srun, capsys):
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line.split(None, 2)[1:] for line in lines}
    assert row["node_rank"] == ["1", "SLURM_NODEID=1"]
    assert row["master_addr"] == ["zn1", "first host of SLURM_STEP_NODELIST=zn[1-2]"]
    assert row["ranks_per_node"][0] == "-" and "not known" in row["ranks_per_node"][1]


def test_env_takes_flags_and_the_ranks_of_a_config(capsys):
    flags = ["--nodes", "2", "--node-rank", "0", "--master", "h:9000"]
    out = env_json(capsys, "mlp_classifier", "--ranks", "4", *flags)
    assert (out["launcher"], out["ranks_per_node"], out["master_port"]) == ("flags", 2, 9000)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--nodes", "2", "--node-rank", "0"], "2 nodes but no master"),
        (["--nodes", "2", "--node-rank", "0", "--master", "h:1", "--ranks", "3"],
         "--ranks = 3 does not split evenly over 2 nodes"),
        (["char_lm", "--nodes", "2", "--node-rank", "1", "--master", "h:1"],
         "cluster.ranks = 1 does not split evenly over 2 nodes"),
    ],
)  # fmt: skip
def test_env_refuses_in_one_line_with_exit_2(capsys, argv, says):
    assert main(["env", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("zerotrain env: ") and captured.err.count("\n") == 1
    assert says in captured.err


def test_env_refuses_a_flag_that_conflicts_with_slurm(under_srun, capsys):
    assert main(["env", "--node-rank", "0"]) == 2
    says = "conflicting node rank: --node-rank 0 but SLURM_NODEID=1"
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("zerotrain env: ") and captured.err.count("\n") == 1
    assert says in captured.err


def test_the_zerotrain_command_resolves_zerotrain_variables(monkeypatch):
    monkeypatch.setenv("ZEROTRAIN_NODES", "3")
    monkeypatch.setenv("ZEROTRAIN_NODE_RANK", "2")
    monkeypatch.setenv("ZEROTRAIN_MASTER", "10.1.0.1:29400")
    monkeypatch.setenv("ZEROTRAIN_RUN_ID", "nightly-3")
    done = zerotrain("env", "--json", "--ranks-per-node", "2")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["node_rank"], out["world_size"], out["run_id"]) == (2, 6, "nightly-3")
    assert out["launcher"] == "zerotrain-env"
    assert out["sources"]["master_port"] == "ZEROTRAIN_MASTER=10.1.0.1:29400"
