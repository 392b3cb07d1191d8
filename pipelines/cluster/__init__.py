"""The multi-rank runner: a cluster supervisor, a coordinator and one process per rank.

`run_cluster(cfg, run_dir)` is what `zerotrain run --ranks N` (N > 1) and `zerotrain
simulate` do. The modules, top to bottom:

    main         the process tree: the cluster node, the rank processes under a
                 one_for_one supervisor, the analyzer process; the run's summary
    coordinator  membership, generations and recovery (its `Recovery` states), with
                 helpers for the metrics log, early stopping, manifests and faults
    rank         a rank process: its role supervisor and the Trainer that drives steps
    roles        the rank's role actors (DataLoader, Optimizer, Checkpointer,
                 HookSampler) and the gradient functions the Trainer runs
    messages     the protocol: one record and one client function per message
    nodes        node agents, one per host (--nodes N): the Rendezvous, a lost node's rejoin
    live         live control from outside: a token holder's remote call to the Coordinator
    prefork      ranks forked ahead by a warm process (the daemon's job runner)
    chaos        faults injected on purpose: the --chaos grammar and its runtime

Recovery, hop by hop: rank 1 of 4 is SIGKILLed during step 14 (snapshots every 4 steps)
-----------------------------------------------------------------------------------------
1. Detection, in the `zerotrain` process. The rank's `actors.ProcessChild.run`
   (actors._process) sees the process exit, raises ProcessExit to the "RankSupervisor"
   (main._serve) and calls `Node.peer_exited("rank1")`, which retires the peer: the
   Coordinator's monitor of "Trainer@rank1" (taken in `Coordinator._join`) delivers a
   Down. A SIGSTOPped rank is found the same way once its heartbeats have been silent
   for cluster.heartbeat_timeout (it is SIGKILLed first).
2. Restart. The supervisor charges its restart budget (cluster.max_restarts in
   max_seconds; spent: `main._ranks` fails the run with the last good checkpoint) and
   starts a fresh `python -m pipelines.cluster.rank` (`rank.main` -> `rank._main`).
3. The regroup call. `Coordinator.handle_info(Down)` records the fault
   (`FaultLog.down`), answers REGROUP to ranks waiting in RankFinished, moves TRAINING
   -> REGROUPING, and `Coordinator._ask_regroup` casts `RegroupCalled(g + 1)` to the
   ranks that are not down (`messages.ask_regroup`) and starts `_enforce_regroup`
   (a rank not rejoined within cluster.collective_timeout is SIGKILLed).
4. Survivors abort step 14. `Trainer.handle_cast(RegroupCalled)` ->
   `RankState.abort_collectives` cancels the collective in flight
   (`RankState.collective`); the ring's own error does the same for a neighbour of the
   dead rank. `roles._guarded` answers `Failed`; the client function
   (`messages.apply_update`) or `Trainer._gradients` raises `Regroup`, which
   `Trainer._drive` catches.
5. Everyone joins. `Trainer._drive` asks its Checkpointer what it holds
   (`messages.held_snapshots` -> `Checkpointer.handle_call(HeldQuery)`: own steps 8 and
   12, and the left neighbour's replicas) and calls `messages.join` (a `Join` record).
   The fresh rank 1 joins too, holding nothing. `Coordinator._join` holds each call.
6. The restore point. With all N joined, `Coordinator._form_generation` calls
   `_restore_point`: the newest step s whose shard r is in rank r's own snapshots or
   in rank r+1's replicas -- step 12 here (rank 1's shard of it lives on rank 2); else
   the newest valid checkpoint (`store.checkpoint.latest_valid`); else the seed. It
   notes the replay in `FaultLog.restored` and answers every Join with
   `Plan(generation=g + 1, step=12, source="memory")`: TRAINING again.
7. Restore. `Trainer._restore` moves the ring to the new generation; rank 1 fetches
   its shard with `messages.replica_of(2, 1, 12)` (`Checkpointer.handle_call(
   ReplicaWanted)` on rank 2), the others take theirs with `messages.own_snapshot`;
   `messages.restore_state` -> `Optimizer._restore` installs the shard and all-gathers
   the full parameters; `messages.take_snapshot` keeps the restored state as a
   snapshot (and replica) of step 12.
8. Replay. `Trainer._train` runs steps 13, 14, ... again: batches, dropout and
   summation order are functions of (seed, step, rank), so the bits are those of a run
   without the kill. `Coordinator._log_step` logs a replayed step once (`StepLog.log`)
   and `FaultLog.step_seen` marks the fault recovered at the new generation's first
   step; recovery.json gets detection_s, recovery_s, steps_replayed and restored_from.
"""

__all__ = ["run_cluster"]


def __getattr__(name: str):
    # Imported on first use, not with the package: a rank process runs
    # `python -m pipelines.cluster.rank`, and importing main (which imports rank) here
    # would load rank twice, once as a module and once as __main__.
    if name == "run_cluster":
        from .main import run_cluster

        return run_cluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
