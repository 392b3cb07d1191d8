"""The one way the pipeline tests run the real command line: `zerotrain(*args)`.

A helper module, not a fixture, because module-scoped fixtures and plain helpers
(tests/pipelines/cluster/cluster_util.py) call it too; import it as
`from tests.pipelines.cli_util import zerotrain`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The CLI gives each rank process one BLAS thread unless these are set (pipelines/cli.py,
# _limit_blas_threads); the thread count changes the last bits, so a test's runs must not
# inherit them from the shell or from an in-process benchmark.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def zerotrain(*args: str, cwd=None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`zerotrain ARGS` in a fresh interpreter on this checkout's code (first on
    PYTHONPATH, also for the rank and analyzer processes it starts), with the test's
    environment otherwise, in `cwd` (default: the test's); output captured as text."""
    env = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
