"""A node's identity from flags, ZEROTRAIN_* variables, torchrun / PyTorchJob / Indexed
Job / JobSet variables and Slurm under srun: each source alone, how they combine, and
every refusal as one line naming the variables involved."""

import dataclasses

import pytest

from pipelines.launch import IdentityError, NodeIdentity, resolve_identity, slurm_master_port

FLAGS = {
    "nodes": "2",
    "node_rank": "1",
    "master": "node0:29500",
    "ranks_per_node": "3",
    "advertise_addr": "10.0.0.2",
    "run_id": "exp-7",
}
ZEROTRAIN = {
    "ZEROTRAIN_NODES": "2",
    "ZEROTRAIN_NODE_RANK": "1",
    "ZEROTRAIN_MASTER": "node0:29500",
    "ZEROTRAIN_RANKS_PER_NODE": "3",
    "ZEROTRAIN_ADVERTISE_ADDR": "10.0.0.2",
    "ZEROTRAIN_RUN_ID": "exp-7",
}
# what `srun -N2 --ntasks-per-node=1` gave node 1 of job 4711 on the test Slurm (22.05),
# the job id and node names changed
SRUN = {
    "SLURM_JOB_ID": "4711",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NNODES": "2",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURMD_NODENAME": "gpu08",
}
# what salloc -N2 gives its shell: an allocation, no step
SALLOC = {
    "SLURM_JOB_ID": "4712",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NODELIST": "gpu[07-08]",
}


def resolve(flags=None, env=None, **kw) -> NodeIdentity:
    return resolve_identity(flags or {}, env or {}, **kw)


def test_with_no_source_a_node_is_the_only_node_of_a_single_node_run():
    ident = resolve()
    assert (ident.nnodes, ident.node_rank, ident.master_addr, ident.run_id) == (1, 0, None, None)
    assert ident.launcher == "none"
    assert "no launcher" in ident.sources["nnodes"]


@pytest.mark.parametrize("source", ["flags", "zerotrain-env"])
def test_flags_and_zerotrain_variables_give_every_value(source):
    ident = resolve(FLAGS) if source == "flags" else resolve(env=ZEROTRAIN)
    assert (ident.nnodes, ident.node_rank, ident.ranks_per_node) == (2, 1, 3)
    assert (ident.master_addr, ident.master_port) == ("node0", 29500)
    assert (ident.advertise_addr, ident.run_id) == ("10.0.0.2", "exp-7")
    assert (ident.world_size, ident.first_rank) == (6, 3)
    assert ident.launcher == source
    spelled = "--node-rank 1" if source == "flags" else "ZEROTRAIN_NODE_RANK=1"
    assert ident.sources["node_rank"] == spelled


def test_an_ipv6_master_is_written_in_brackets():
    ident = resolve({"nodes": "2", "node_rank": "0", "master": "[fd00::1]:29500"})
    assert (ident.master_addr, ident.master_port) == ("fd00::1", 29500)


@pytest.mark.parametrize(
    "env, node_rank, nnodes, run_id",
    [
        # torchrun-style, as a user or a launcher script exports them
        ({"NODE_RANK": "1", "NNODES": "2"}, 1, 2, None),
        # torchrun's worker variables (zerotrain started by torchrun --nproc-per-node 1):
        # RANK is the process rank there, GROUP_RANK the node's
        (
            {"GROUP_RANK": "1", "LOCAL_RANK": "0", "RANK": "1", "GROUP_WORLD_SIZE": "2",
             "LOCAL_WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "rdzv-9"},
            1, 2, "rdzv-9",
        ),
        # Kubeflow PyTorchJob (training-operator): RANK = the pod's index (master 0,
        # worker i -> i+1), PET_NODE_RANK the same, WORLD_SIZE = pods x nproc (not nodes)
        (
            {"RANK": "2", "PET_NODE_RANK": "2", "PET_NNODES": "3", "WORLD_SIZE": "6",
             "PET_NPROC_PER_NODE": "2"},
            2, 3, None,
        ),
        # an older PyTorchJob: RANK alone is the pod index
        ({"RANK": "2", "NNODES": "3"}, 2, 3, None),
        ({"PET_NODE_RANK": "1", "PET_NNODES": "2:2"}, 1, 2, None),  # torchrun's N:N form
        # Kubernetes Indexed Job / JobSet: the completion index; JOBSET_NAME names the run
        (
            {"JOB_COMPLETION_INDEX": "1", "JOB_INDEX": "0", "NNODES": "2",
             "JOBSET_NAME": "train-js"},
            1, 2, "train-js",
        ),
        # torchrun's default rendezvous id 'none' names no run
        ({"NODE_RANK": "0", "NNODES": "2", "TORCHELASTIC_RUN_ID": "none"}, 0, 2, None),
    ],
)  # fmt: skip
def test_torchrun_pytorchjob_and_indexed_job_variables(env, node_rank, nnodes, run_id):
    env = {"MASTER_ADDR": "trainer-0.svc", "MASTER_PORT": "23456", **env}
    ident = resolve(env=env)
    assert (ident.node_rank, ident.nnodes, ident.run_id) == (node_rank, nnodes, run_id)
    assert (ident.master_addr, ident.master_port) == ("trainer-0.svc", 23456)
    assert ident.launcher == "torchrun"


def test_pytorchjob_rank_is_not_read_inside_a_torchrun_worker():
    """There RANK is a process rank: RANK=3 of 4 processes is node 1 of 2 only by GROUP_RANK."""
    env = {"MASTER_ADDR": "m", "MASTER_PORT": "1", "GROUP_RANK": "1", "RANK": "3",
           "LOCAL_RANK": "1", "GROUP_WORLD_SIZE": "2"}  # fmt: skip
    assert resolve(env=env).node_rank == 1


def test_slurm_under_srun_gives_rank_count_master_on_the_first_host_and_the_job_id():
    ident = resolve(env=SRUN)
    assert (ident.node_rank, ident.nnodes, ident.launcher) == (1, 2, "slurm")
    assert ident.master_addr == "gpu07"
    assert ident.master_port == slurm_master_port(4711) == 24711
    assert (ident.run_id, ident.advertise_addr) == ("4711", "gpu08")
    assert ident.sources["master_addr"] == "first host of SLURM_STEP_NODELIST=gpu[07-08]"
    assert "agrees: SLURM_NNODES=2" in ident.sources["nnodes"]


def test_a_slurm_step_on_part_of_the_allocation_takes_its_master_from_the_step_list():
    """`salloc -N2` then `srun -N1 -w gpu08`: the job list still says gpu[07-08]."""
    one = ("SLURM_NNODES", "SLURM_STEP_NUM_NODES", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS")
    env = {**SRUN, **dict.fromkeys(one, "1"), "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "gpu08"}
    ident = resolve(env=env)
    assert (ident.nnodes, ident.master_addr) == (1, "gpu08")


def test_an_srun_task_that_names_its_step_only_as_slurm_stepid_is_a_launch():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}
    env["SLURM_STEPID"] = "0"  # the older spelling, which srun still sets
    ident = resolve(env=env)
    assert (ident.launcher, ident.node_rank, ident.notes) == ("slurm", 1, ())


def test_without_a_step_list_the_job_list_is_used():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}
    env["SLURM_JOB_NODELIST"] = "rack[1-2]-n[01]"
    assert resolve(env=env).master_addr == "rack1-n01"


@pytest.mark.parametrize(
    "env",
    [SALLOC, {**SALLOC, "SLURM_PROCID": "0", "SLURM_NODEID": "0"}],  # salloc; sbatch's script
    ids=["salloc shell", "sbatch script"],
)
def test_an_allocation_shell_without_srun_is_not_a_launch(env):
    ident = resolve(env=env)
    assert (ident.nnodes, ident.launcher, ident.run_id) == (1, "none", None)
    assert len(ident.notes) == 1 and "without SLURM_STEP_ID" in ident.notes[0]


def test_ranks_per_node_defaults_to_cluster_ranks_over_the_nodes():
    ident = resolve(env=SRUN, cluster_ranks=4)
    assert (ident.ranks_per_node, ident.world_size, ident.first_rank) == (2, 4, 2)
    assert ident.sources["ranks_per_node"] == "cluster.ranks = 4 / 2 node(s)"
    agreeing = resolve({"ranks_per_node": "2"}, SRUN, cluster_ranks=4)
    assert agreeing.ranks_per_node == 2


# ---- combining sources --------------------------------------------------------------


def test_a_higher_source_chooses_the_master_and_names_what_it_overrode():
    env = {**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "29400"}
    ident = resolve(env=env)
    assert (ident.master_addr, ident.master_port) == ("head", 29400)
    assert "(over first host of SLURM_STEP_NODELIST" in ident.sources["master_addr"]
    flagged = resolve({"master": "flag-host:1234"}, {**env, "ZEROTRAIN_MASTER": "z:1"})
    assert (flagged.master_addr, flagged.master_port) == ("flag-host", 1234)
    assert flagged.sources["master_addr"].startswith("--master flag-host:1234 (over ")
    assert resolve({"run_id": "mine"}, SRUN).run_id == "mine"


def test_each_choice_comes_from_the_first_source_flags_zerotrain_torchrun_slurm():
    """Every source gives a master, a run id and (but torchrun) an address; dropping the
    first source each time hands each value to the next one, and the launcher with it."""
    flags = {"master": "f:1", "run_id": "f-id", "advertise_addr": "f-adv", "node_rank": "1"}
    zt = {"ZEROTRAIN_MASTER": "z:2", "ZEROTRAIN_RUN_ID": "z-id", "ZEROTRAIN_NODE_RANK": "1",
          "ZEROTRAIN_ADVERTISE_ADDR": "z-adv"}  # fmt: skip
    torch = {"MASTER_ADDR": "t", "MASTER_PORT": "3", "NODE_RANK": "1",
             "TORCHELASTIC_RUN_ID": "t-id", "JOBSET_NAME": "js"}  # fmt: skip
    chain = [
        (flags, {**zt, **torch, **SRUN}, ("f", 1, "f-id", "f-adv", "flags")),
        ({}, {**zt, **torch, **SRUN}, ("z", 2, "z-id", "z-adv", "zerotrain-env")),
        ({}, {**torch, **SRUN}, ("t", 3, "t-id", "gpu08", "torchrun")),
        ({}, {**torch, "TORCHELASTIC_RUN_ID": "none", **SRUN}, ("t", 3, "js", "gpu08", "torchrun")),
        ({}, SRUN, ("gpu07", 24711, "4711", "gpu08", "slurm")),
    ]
    for given, env, want in chain:
        ident = resolve(given, env)
        got = (ident.master_addr, ident.master_port, ident.run_id, ident.advertise_addr)
        assert (*got, ident.launcher) == want, (given, env)


def test_a_jobset_job_past_the_first_takes_its_node_rank_from_another_source():
    """JOB_COMPLETION_INDEX=0 of JOB_INDEX=1 is pod 0 of the second job, not node 0: the
    node rank the refusal asks for (NODE_RANK, ZEROTRAIN_NODE_RANK, --node-rank) is used."""
    env = {"JOB_COMPLETION_INDEX": "0", "JOB_INDEX": "1", "NNODES": "4", "JOBSET_NAME": "js",
           "MASTER_ADDR": "m", "MASTER_PORT": "1"}  # fmt: skip
    assert resolve(env={**env, "NODE_RANK": "2"}).node_rank == 2
    assert resolve(env={**env, "ZEROTRAIN_NODE_RANK": "2"}).node_rank == 2
    assert resolve({"node_rank": "3"}, env).node_rank == 3
    assert resolve(env={**env, "JOB_INDEX": "0"}).node_rank == 0  # the first job: the index


def test_node_rank_and_count_given_twice_alike_are_accepted_and_both_named():
    ident = resolve({"node_rank": "1", "nodes": "2"}, {**SRUN, "NODE_RANK": "1"})
    assert ident.launcher == "flags"
    assert ident.sources["node_rank"] == (
        "--node-rank 1 (agrees: NODE_RANK=1) (agrees: SLURM_NODEID=1)"
    )


# ---- refusals -------------------------------------------------------------------------

REFUSED = [
    # conflicting sources: the node rank and count are facts, every source must agree
    ({"node_rank": "0"}, SRUN, r"conflicting node rank: --node-rank 0 but SLURM_NODEID=1"),
    ({}, {**SRUN, "ZEROTRAIN_NODES": "3"},
     r"conflicting node count: ZEROTRAIN_NODES=3 but SLURM_STEP_NUM_NODES=2"),
    ({}, {"NODE_RANK": "0", "GROUP_RANK": "1", "NNODES": "2", "MASTER_ADDR": "m",
          "MASTER_PORT": "1"}, r"conflicting node rank: NODE_RANK=0 but GROUP_RANK=1"),
    ({}, {**SRUN, "NNODES": "4"}, r"conflicting node count: NNODES=4 but SLURM_STEP_NUM_NODES=2"),
    # a world that does not add up
    ({"nodes": "2", "node_rank": "2", "master": "m:1"}, {}, r"node rank 2 is outside 2 node"),
    ({"node_rank": "1"}, {}, r"--node-rank 1 but no node count"),
    ({"nodes": "2", "master": "m:1"}, {}, r"--nodes 2 but no node rank"),
    ({"nodes": "2", "node_rank": "1"}, {}, r"2 nodes but no master"),
    ({}, {**SRUN, "SLURM_STEP_NODELIST": "gpu[07-09]"},
     r"SLURM_STEP_NODELIST=gpu\[07-09\] names 3 host\(s\) but SLURM_STEP_NUM_NODES=2"),
    ({}, {**SRUN, "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"},
     r"SLURM_STEP_NUM_TASKS=4 over SLURM_STEP_NUM_NODES=2: .*--ntasks-per-node=1"),
    ({}, {**SRUN, "SLURM_STEP_NODELIST": "gpu[08-07]"}, r"SLURM_STEP_NODELIST: .*backwards"),
    ({}, {"NODE_RANK": "0", "PET_NNODES": "1:4", "MASTER_ADDR": "m", "MASTER_PORT": "1"},
     r"PET_NNODES=1:4: an elastic range"),
    ({}, {"GROUP_RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4",
          "GROUP_WORLD_SIZE": "2"}, r"LOCAL_WORLD_SIZE=4: torchrun started 4 processes"),
    ({}, {"JOB_COMPLETION_INDEX": "0", "JOB_INDEX": "1", "NNODES": "4"},
     r"JOB_COMPLETION_INDEX=0 counts pods within JobSet job JOB_INDEX=1"),
    # values that are not what they should be
    ({"master": "node0"}, {}, r"--master: expected HOST:PORT .*got 'node0'"),
    ({"master": "node0:0"}, {}, r"--master: expected an integer >= 1, got '0'"),
    ({}, {"MASTER_PORT": "70000"}, r"MASTER_PORT: expected a port 1-65535, got '70000'"),
    ({"nodes": "0"}, {}, r"--nodes: expected an integer >= 1, got '0'"),
    ({}, {"ZEROTRAIN_NODE_RANK": "one"}, r"NODE_RANK: expected an integer >= 0, got 'one'"),
    ({"run_id": "my run"}, {}, r"run id: expected .* got 'my run'"),
    ({}, {**SRUN, "SLURM_JOB_ID": "x1"}, r"SLURM_JOB_ID: expected an integer >= 0, got 'x1'"),
]  # fmt: skip


@pytest.mark.parametrize("flags, env, says", REFUSED)
def test_a_launch_that_does_not_add_up_is_refused_in_one_line(flags, env, says, raises_one_line):
    with raises_one_line(IdentityError, match=says):
        resolve(flags, env)


@pytest.mark.parametrize(
    "flags, cluster_ranks, says",
    [
        ({}, 5, r"cluster.ranks = 5 does not split evenly over 2 nodes"),
        ({"ranks_per_node": "3"}, 4, r"2 node\(s\) x --ranks-per-node 3 is 6 ranks, but "),
    ],
)
def test_cluster_ranks_must_fit_the_nodes(flags, cluster_ranks, says, raises_one_line):
    with raises_one_line(IdentityError, match=says):
        resolve(flags, SRUN, cluster_ranks=cluster_ranks)


def test_an_identity_is_checked_data_and_cannot_be_changed(raises_one_line):
    ident = resolve(env=SRUN)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ident.node_rank = 0
    with pytest.raises(TypeError):
        ident.sources["node_rank"] = "forged"
    with raises_one_line(IdentityError, match="master: an address and a port or neither"):
        NodeIdentity(nnodes=1, master_addr="m")
    with raises_one_line(IdentityError, match="launcher: unknown source kind 'mpi'"):
        NodeIdentity(launcher="mpi")
    with raises_one_line(IdentityError, match=r"nnodes: expected an integer >= 0, got True"):
        NodeIdentity(nnodes=True)
