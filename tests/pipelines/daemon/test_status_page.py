"""The status page in a real headless browser (Debian's chromium): the job table and the
loss curve that the page's script renders from /api/status, not the static HTML."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from .conftest import SMALL

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the flags that work on this kind of machine (closed network, root, no GPU)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

needs_browser = pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true",
    reason="no chromium on PATH (apt-get install chromium); under CI=true this runs and fails",
)


def _dump_dom(url: str, profile) -> str:
    """The DOM after the page's script ran: virtual time runs the timers, and waits for
    the fetch of /api/status that the first refresh makes."""
    assert CHROMIUM, "CI=true: chromium must be installed (.ci/run installs it)"
    r = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
        + ["--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@needs_browser
def test_the_page_shows_the_job_table_and_a_loss_curve_in_a_browser(daemon_factory, tmp_path):
    d = daemon_factory("--http", "127.0.0.1:0")
    where = json.loads((d.state_dir / "http.json").read_text())
    url = f"http://{where['host']}:{where['port']}/"
    job = d.submit(*SMALL, "--steps", "100000", "--name", "in-browser")
    d.wait_for(job, {"running"}, step=10)
    dom = _dump_dom(url, tmp_path / "profile")
    # the table: a row the script built from /api/status (the static page has no rows)
    cells = r"<tr><td>(\d+)</td><td>([^<]*)</td><td>([^<]*)</td><td class=\"(\w+)\">"
    rows = re.findall(cells, dom)
    assert (str(job), "in-browser", "mlp_classifier", "running") in rows, dom[-3000:]
    assert re.search(rf"daemon pid {d.proc.pid} - {re.escape(str(d.state_dir))}", dom)
    # the loss curve: an svg polyline with one point per logged step it has seen
    curve = re.search(rf"<svg[^>]*><text[^>]*>job {job} loss [^<]+</text><polyline[^>]*>", dom)
    assert curve, dom[-3000:]
    points = re.search(r'points="([^"]+)"', curve.group(0)).group(1).split()
    assert len(points) >= 10
    xs = [float(p.split(",")[0]) for p in points]
    assert xs == sorted(xs) and xs[0] == 10.0 and xs[-1] == 350.0  # steps left to right
    assert d.cli("cancel", job, "--wait").returncode == 0
