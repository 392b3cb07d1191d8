"""The client verbs' side: `zerotrain status` is a remote call and imports only what one
needs (no training modules, no trio, no zmq), so it costs little more than the
interpreter's own start."""

from __future__ import annotations

import subprocess
import sys

_LIST_MODULES = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('MODULES', *sorted(sys.modules), file=sys.stderr))\n"
    "from pipelines.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _modules_imported_by(*args: str) -> set[str]:
    """Module names a `zerotrain ARGS` process had imported when it exited."""
    r = subprocess.run(
        [sys.executable, "-c", _LIST_MODULES, *args], capture_output=True, text=True, timeout=60
    )
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("MODULES ")]
    return set(line.split()[1:])


def test_zerotrain_status_imports_no_training_modules_nor_trio_nor_zmq(tmp_path):
    mods = _modules_imported_by("status", "--state-dir", str(tmp_path / "none"))
    assert "pipelines.daemon.protocol" in mods  # it did get as far as the call
    heavy = {"trio", "zmq", "pipelines.config", "pipelines.data", "pipelines.use"}
    assert sorted(heavy & mods) == []
    assert sorted(m for m in mods if m.startswith("pipelines.launch")) == []
    # the frame codec, and none of the runtime (`import actors` loads its modules on use)
    assert sorted(m for m in mods if m.startswith("actors.")) == ["actors._frames", "actors._wire"]
