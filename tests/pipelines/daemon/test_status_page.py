"""The status page in a real headless browser (Debian's chromium): the job table and the
loss curve that the page's script renders from /api/status, not the static HTML."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

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


@needs_browser
def test_the_page_shows_eval_curves_and_a_killed_rank_with_its_restart_in_a_browser(
    daemon_factory, tmp_path
):
    from .conftest import http_get

    d = daemon_factory("--http", "127.0.0.1:0")
    where = json.loads((d.state_dir / "http.json").read_text())
    address = f"{where['host']}:{where['port']}"
    job = d.submit(*SMALL, "--steps", "100000", "--set", "eval.every=20", "--name", "health")
    run_dir = Path(d.wait_for(job, {"running"}, step=45)["run_dir"])
    killed = json.loads((run_dir / "live" / "rank-1.json").read_text())["pid"]
    os.kill(killed, signal.SIGKILL)

    def ranks() -> dict:
        status = json.loads(http_get(address, "/api/status")[1])
        (mine,) = [j for j in status["jobs"] if j["id"] == job]
        return {r["rank"]: r for r in mine.get("ranks_live") or ()}

    deadline = time.monotonic() + 120
    while not (ranks().get(1, {}).get("restarts") and ranks()[1]["pid"] != killed):
        assert time.monotonic() < deadline, ranks()
        time.sleep(0.2)
    dom = _dump_dom(f"http://{address}/", tmp_path / "profile")
    section = re.search(rf'<section class="job" id="job-{job}">.*?</section>', dom, re.S)
    assert section, dom[-3000:]
    section = section.group(0)
    # the loss curve and an evaluation curve, each point a logged step or evaluation
    loss = re.search(r'<svg class="curve loss".*?points="([^"]+)"', section)
    assert loss and len(loss.group(1).split()) >= 10, section
    ev = re.search(
        r'<svg class="curve eval" data-what="eval accuracy"[^>]*><text[^>]*>job \d+ eval '
        r'accuracy [^<]*, steps (\d+) \.\. (\d+)</text><polyline[^>]*points="([^"]+)"',
        section,
    )
    assert ev, section
    first, last = int(ev.group(1)), int(ev.group(2))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in records if r.get("eval") and r["step"] <= last]
    assert (first, last) == (20, evaluated[-1]) and all(s % 20 == 0 for s in evaluated)
    assert len(ev.group(3).split()) == len(evaluated) >= 3
    # the rank table: rank 1 was killed and replaced (up again, one crash restart)
    rows = {
        int(m.group(1)): m.group(2)
        for m in re.finditer(r'<tr data-rank="(\d+)">(.*?)</tr>', section, re.S)
    }
    assert set(rows) == {0, 1}, section
    cell = r'<td class="{}[^"]*">([^<]*)</td>'
    assert re.search(cell.format("health up"), rows[1]).group(1) == "up"
    assert re.search(cell.format("restarts"), rows[1]).group(1) == "1"
    assert re.search(cell.format("kinds"), rows[1]).group(1) == "1 crash"
    assert re.search(cell.format("reason"), rows[1]).group(1)  # what the run saw
    assert re.search(cell.format("restarts"), rows[0]).group(1) == "0"
    # refreshed live: the page fetched /api/status again within the virtual time
    refreshes = re.search(r'<p id="who" data-refreshes="(\d+)">', dom)
    assert refreshes and int(refreshes.group(1)) >= 2, dom[:2000]
    assert d.cli("cancel", job, "--wait").returncode == 0
