"""How the pipeline tests run the real command line: `zerotrain(*args)` in a fresh
interpreter, `cli(capsys, *args)` in the test's own process (pipelines.cli.main), and
`one_line(err)`, the check that an error is the one line the project's rule asks for.

A helper module, not a fixture, because module-scoped fixtures and plain helpers
(tests/pipelines/cluster/cluster_util.py) call it too; import it as
`from tests.pipelines.cli_util import zerotrain`.
"""

from __future__ import annotations

import json
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


def cli(capsys, *args) -> tuple[int, str, str]:
    """pipelines.cli.main(ARGS) in this process: (exit code, stdout, stderr)."""
    from pipelines.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The only line of `err` (fails the test when there are more or none)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def table_data(path: Path, cache_dir: Path) -> list[str]:
    """The --set options that train on the table file `path` (data.name=table), its
    parsed cache in `cache_dir`."""
    sets = (
        "data.name=table",
        f"data.path={json.dumps(str(path))}",
        f"data.cache_dir={json.dumps(str(cache_dir))}",
    )
    return [word for key_value in sets for word in ("--set", key_value)]
