"""The rank's role actors and shared state (pipelines.cluster.roles): what a regroup
interrupts, the DataLoader's prefetch, the Optimizer's restore, the Checkpointer's
replicas."""

import shutil
import tempfile
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import trio
import trio.testing

import actors
from pipelines.cluster import roles
from pipelines.cluster.chaos import RankChaos
from pipelines.cluster.messages import (
    COORDINATOR,
    BatchesWanted,
    Held,
    HeldQuery,
    OwnSnapshot,
    ReplicaWanted,
    RestoreState,
    Snapshot,
    TakeSnapshot,
)
from pipelines.cluster.roles import Checkpointer, DataLoader, Optimizer, RankState
from pipelines.config import load_config
from pipelines.core import build_model_for, rank_batches
from pipelines.data import load_dataset
from pipelines.step import RankStep
from pipelines.store.checkpoint import save_checkpoint

LIMIT = 10  # seconds: a hang fails the test


def state(generation=0):
    ring = SimpleNamespace(generation=generation)  # only its generation is read here
    fields = dict.fromkeys(
        ("cfg", "dataset", "evalset", "model", "step", "ckpt_root", "chaos", "initial_params")
    )
    return RankState(rank=0, world=2, ring=ring, **fields)


async def waiting(nursery, st, event) -> trio.Event:
    """Start st.wait_unless_regroup(event) in `nursery`; once it blocks, check that it
    still waits and return the Event it sets when the wait ends."""
    done = trio.Event()

    async def wait():
        await st.wait_unless_regroup(event)
        done.set()

    nursery.start_soon(wait)
    await trio.testing.wait_all_tasks_blocked()
    assert not done.is_set()  # waiting for the event (or a regroup)
    return done


async def test_a_regroup_ends_a_wait_for_something_a_dead_neighbour_will_never_send():
    # e.g. the ack of a snapshot replica: the right neighbour died before sending it
    st, never = state(), trio.Event()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            done = await waiting(nursery, st, never)
            st.abort_collectives(1)
        assert done.is_set() and not never.is_set()
        await st.wait_unless_regroup(trio.Event())  # already called for: no wait at all


async def test_without_a_regroup_the_wait_is_for_the_event():
    st, acked = state(), trio.Event()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            done = await waiting(nursery, st, acked)
            acked.set()
        assert done.is_set() and st.min_generation == 0


# ---------------------------------------------------------------------------------------
# Role actors with real models, data, rings and nodes (pipelines.cluster.roles)
# ---------------------------------------------------------------------------------------


def tiny(mode="zero2", world=2, steps=6):
    # 784 -> 24 -> 10 = 19090 parameters: two uneven-free shards of 9545
    return load_config(
        "mlp_classifier",
        ["model.hidden=[24]", "data.n_train=512", "data.n_eval=64", "train.batch_size=48",
         f"train.steps={steps}", f"cluster.ranks={world}", f"cluster.mode={mode}"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def data():
    return load_dataset(tiny().data, "train")


def rank_state(cfg, data, rank, ring, ckpt_root="unused"):
    model = build_model_for(cfg, data.meta)
    return RankState(
        cfg=cfg,
        rank=rank,
        world=cfg.cluster.ranks,
        dataset=data,
        evalset=None,
        model=model,
        step=RankStep(model, cfg, ring),
        ring=ring,
        ckpt_root=ckpt_root,
        chaos=RankChaos(rank, COORDINATOR),
        initial_params=model.params.copy(),
    )


def idle_ring(rank, world=2):
    """Where a role that runs no collective needs a ring: its place (rank, world) and
    generation."""
    return SimpleNamespace(rank=rank, world=world, generation=0)


def same_batches(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        assert all(np.array_equal(g[k], e[k]) for k in e)


async def test_the_data_loader_serves_each_step_s_batches_prefetching_only_the_next(data):
    cfg = tiny(steps=6)
    st = rank_state(cfg, data, 1, idle_ring(1))
    loader = DataLoader(st)
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            ref = await actors.spawn(nursery, loader)
            # 0, 1, 2 in order (1 and 2 come from the prefetch), a rollback to 1 (the
            # prefetched 3 must not be served for it), then on to the last step
            for s in (0, 1, 2, 1, 2, 3, 4, 5):
                got = await actors.call(ref, BatchesWanted(s))
                same_batches(got, rank_batches(data, cfg, s, 1, 2))
                await trio.testing.wait_all_tasks_blocked()
                # bounded: exactly the next step is prepared, nothing past the last step
                if s + 1 < cfg.train.steps:
                    assert sorted(loader._ready) == [s + 1]
                    await loader._ready[s + 1].wait()
                    assert sorted(loader._ahead) == [s + 1]
                else:
                    assert not loader._ready and not loader._ahead
            nursery.cancel_scope.cancel()


async def test_the_optimizer_restores_a_snapshot_from_disk_or_the_seed_on_every_rank(
    data, tmp_path
):
    for mode in ("zero2", "ddp"):
        await restore_each_way(tiny(mode=mode), data, tmp_path / mode)


async def restore_each_way(cfg, data, tmp_path):
    world = cfg.cluster.ranks
    rings = [
        actors.Ring(r, world, f"ipc://{tmp_path}-{{rank}}", timeout=20.0) for r in range(world)
    ]
    states = [rank_state(cfg, data, r, rings[r]) for r in range(world)]
    n, rng = states[0].step.n, np.random.default_rng(7)
    params = rng.standard_normal(n).astype(np.float32)
    opt = {k: rng.standard_normal(n).astype(np.float32) for k in states[0].step.opt.state}
    counters = {"steps_applied": 12, "skipped": 1}

    def snapshot(st):
        lo, hi = st.step.lo, st.step.hi
        return Snapshot(
            st.rank, 12, {"params": params[lo:hi]} | {k: v[lo:hi] for k, v in opt.items()}, counters
        )

    save_checkpoint(
        tmp_path / "ckpt", 12, [(0, n, {"params": params, **opt})], n, dict(counters=counters)
    )
    ways = {
        "memory": [RestoreState("memory", 12, snapshot=snapshot(st)) for st in states],
        "disk": [RestoreState("disk", 12, path=str(tmp_path / "ckpt" / "step-00000012"))] * world,
    }
    try:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                refs = [await actors.spawn(nursery, Optimizer(st)) for st in states]
                for source, hows in ways.items():
                    for st in states:  # what the restore must overwrite
                        st.model.params[:] = -1
                        for buf in st.step.opt.state.values():
                            buf[:] = -1
                    async with trio.open_nursery() as both:
                        for ref, how in zip(refs, hows, strict=True):
                            both.start_soon(actors.call, ref, how)
                    for st in states:
                        restored(st, params, opt, counters, source)
                async with trio.open_nursery() as both:
                    for ref in refs:
                        both.start_soon(actors.call, ref, RestoreState("init", 0))
                for st in states:
                    np.testing.assert_array_equal(st.model.params, st.initial_params)
                    assert all(not buf.any() for buf in st.step.opt.state.values())
                    assert st.step.opt.counters() == {"steps_applied": 0, "skipped": 0}
                nursery.cancel_scope.cancel()
    finally:
        for ring in rings:
            await trio.to_thread.run_sync(ring.close, abandon_on_cancel=True)


def restored(st, params, opt, counters, source):
    rs = st.step
    lo, hi = rs.lo, rs.hi
    # the full parameters on every rank: its own shard installed, the others gathered
    np.testing.assert_array_equal(rs.model.params, params, err_msg=f"{source} rank {st.rank}")
    for key, buf in rs.opt.state.items():  # ddp: full state; zero: this rank's shard
        expected = opt[key] if rs.mode == "ddp" else opt[key][lo:hi]
        np.testing.assert_array_equal(buf, expected, err_msg=f"{source} {key} rank {st.rank}")
    assert rs.opt.counters() == counters, source


def neighbour(cfg, data, directory, steps, go, took, done, out):
    """Rank 0 in a trio loop and node of its own (run in a thread): its Checkpointer
    snapshots `steps`, each snapshot's params set to the step's number, once `go`."""

    async def main():
        with trio.fail_after(NODES_LIMIT):
            async with actors.open_node("rank0", directory=directory):
                st = rank_state(cfg, data, 0, idle_ring(0))
                async with trio.open_nursery() as nursery:
                    await actors.spawn(nursery, Optimizer(st), name="Optimizer")
                    await actors.spawn(nursery, Checkpointer(st), name="Checkpointer")
                    await trio.to_thread.run_sync(go.wait)
                    out["shard"] = (st.step.lo, st.step.hi)
                    for s in steps:
                        st.model.params[:] = s
                        await actors.call("Checkpointer", TakeSnapshot(s, False), timeout=None)
                    # its own snapshots are copies: the params moved on since step 8
                    own = await actors.call("Checkpointer", OwnSnapshot(8), timeout=None)
                    out["own 8"] = own.tensors["params"].copy()
                    took.set()  # every snapshot's reply came: each was acked
                    await trio.to_thread.run_sync(done.wait)
                    nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as exc:  # reported by the test
        out["error"] = exc
        took.set()


NODES_LIMIT = 60  # seconds: two nodes in one loaded process


async def test_the_checkpointer_keeps_its_left_neighbours_newest_replicas_and_acks_each(
    data, monkeypatch
):
    # a snapshot's reply waits for the right neighbour's ack; with the fallback wait made
    # longer than the test, only the ack can release it
    monkeypatch.setattr(roles, "REPLICA_ACK_WAIT_S", 10 * NODES_LIMIT)
    cfg = tiny()
    directory = tempfile.mkdtemp(prefix="zt-")
    go, took, done, out = threading.Event(), threading.Event(), threading.Event(), {}
    steps = (4, 8, 12, 16)
    thread = threading.Thread(
        target=neighbour, args=(cfg, data, directory, steps, go, took, done, out)
    )
    try:
        with trio.fail_after(NODES_LIMIT):
            async with actors.open_node("rank1", directory=directory):
                st = rank_state(cfg, data, 1, idle_ring(1))
                async with trio.open_nursery() as nursery:
                    ref = await actors.spawn(nursery, Checkpointer(st), name="Checkpointer")
                    thread.start()
                    go.set()
                    await trio.to_thread.run_sync(took.wait)
                    assert "error" not in out, out.get("error")
                    await replicas_held(ref, out["shard"])
                    lo, hi = out["shard"]
                    np.testing.assert_array_equal(out["own 8"], np.full(hi - lo, 8, np.float32))
                    nursery.cancel_scope.cancel()
    finally:
        done.set()
        if thread.is_alive():
            await trio.to_thread.run_sync(thread.join)
        shutil.rmtree(directory, ignore_errors=True)


async def replicas_held(ref, shard):
    lo, hi = shard
    held = await actors.call(ref, HeldQuery())
    assert held == Held([], [8, 12, 16])  # rank 0's newest KEEP_SNAPSHOTS, none of its own
    snap = await actors.call(ref, ReplicaWanted(0, 16))
    assert snap.rank == 0 and snap.step == 16
    np.testing.assert_array_equal(snap.tensors["params"], np.full(hi - lo, 16, np.float32))
    assert await actors.call(ref, ReplicaWanted(0, 4)) is None  # trimmed
    assert await actors.call(ref, ReplicaWanted(1, 16)) is None  # not rank 1's
    # a snapshot from a rank that is not the left neighbour is not kept, but counted
    await actors.cast(ref, Snapshot(1, 20, {"params": np.zeros(1, np.float32)}, {}))
    assert await actors.call(ref, HeldQuery()) == held
    assert ref.dropped == 1
