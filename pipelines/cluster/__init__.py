"""The multi-rank runner: a cluster supervisor, a coordinator and one process per rank.

`run_cluster(cfg, run_dir)` is what `zerotrain run --ranks N` (N > 1) and `zerotrain
simulate` do. The modules, top to bottom:

    main         the process tree: the cluster node, the rank processes under a
                 one_for_one supervisor, the analyzer process; the run's summary
    coordinator  membership, step agreement, snapshots, checkpoints and recovery
    rank         a rank process: its supervisor and the Trainer that drives each step
    roles        the rank's role actors (DataLoader, GradientWorker, Optimizer, ...)
    chaos        faults injected on purpose: the --chaos grammar and its runtime
"""

from .main import run_cluster

__all__ = ["run_cluster"]
