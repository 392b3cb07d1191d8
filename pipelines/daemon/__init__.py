"""The long-running training daemon: `zerotrain serve`, its job queue and client verbs.

A tour, one job per module:

* ``statedir``   where the state dir is, its 0700 mode, the flock that names its owner
* ``jobs``       the job table (SQLite, WAL) and the job state machine
* ``scheduler``  which queued jobs start within the CPU budget (priority, then order)
* ``supervisor`` one job = one `zerotrain run` process group; stop, parent death, cleanup
* ``warm``       a `zerotrain run` process started before its job: imports done, ranks forked
* ``protocol``   the control endpoint's records and framing (actors' wire format; the
                 client's side on msgpack alone: a client verb imports no numpy)
* ``control``    the endpoint: a Unix socket, peer uid checked, hostile input bounded
* ``app``        the daemon itself: recovery on start, requests, shutdown; a running
                 job's live control (checkpoint, set) through pipelines.cluster.live
* ``http``       /metrics (prometheus_client), /healthz, /readyz, the status page
* ``notify``     systemd Type=notify: READY=1, WATCHDOG=1, STOPPING=1
* ``client``     the verbs' side of a request; ``commands`` wires them into `zerotrain`

    zerotrain serve --state-dir ~/zt &                 # or under systemd (scripts/)
    zerotrain submit mlp_classifier --ranks 2 --state-dir ~/zt      # prints the job id
    zerotrain jobs --state-dir ~/zt
    zerotrain pause 1 --state-dir ~/zt; zerotrain resume 1 --state-dir ~/zt
    zerotrain export 1 weights.safetensors --state-dir ~/zt
"""

from .commands import DAEMON_COMMANDS, register_daemon_commands, run_daemon_command

__all__ = ["DAEMON_COMMANDS", "register_daemon_commands", "run_daemon_command"]
