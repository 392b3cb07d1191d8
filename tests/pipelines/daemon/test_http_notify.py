"""The daemon's HTTP side and its systemd notifications, against a real daemon."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from .conftest import SMALL, http_get

pytestmark = pytest.mark.slow


def test_metrics_health_and_the_status_page(daemon_factory):
    d = daemon_factory("--http", "127.0.0.1:0")
    where = json.loads((d.state_dir / "http.json").read_text())
    address = f"{where['host']}:{where['port']}"
    assert http_get(address, "/healthz") == (200, "ok\n")
    assert http_get(address, "/readyz") == (200, "ready\n")
    job = d.submit(*SMALL, "--steps", "30")
    d.wait_for(job, {"done"})
    # long enough that the pause finds it running whatever the start takes (a warm runner
    # starts it at once): then paused once its processes are gone
    d.submit(*SMALL, "--steps", "100000", "--ranks", "2", "--name", "waiting")
    assert d.cli("pause", "waiting", "--wait").stdout.strip().endswith(": paused")
    time.sleep(1.5)  # the snapshot the HTTP thread reads is published once a second
    code, text = http_get(address, "/metrics")
    assert code == 200
    lines = set(text.splitlines())
    assert "zerotrain_queue_depth 0.0" in lines
    assert 'zerotrain_jobs{state="done"} 1.0' in lines
    assert 'zerotrain_paused{job="2"} 1.0' in lines
    assert f'zerotrain_step{{job="{job}"}} 30.0' in lines
    assert 'zerotrain_restarts_total{job="1",reason="resume"} 0.0' in lines
    status = json.loads(http_get(address, "/api/status")[1])
    assert [j["state"] for j in status["jobs"]] == ["done", "paused"]
    code, page = http_get(address, "/")
    assert code == 200 and "<title>zerotrain</title>" in page and "/api/status" in page
    assert http_get(address, "/nope")[0] == 404


def test_a_bad_http_address_is_one_line(tmp_path):
    from .conftest import zerotrain

    r = zerotrain("serve", "--state-dir", tmp_path / "s", "--http", "localhost")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "zerotrain serve: --http expected HOST:PORT (e.g. 127.0.0.1:9477) or off, got 'localhost'"
    )


def test_systemd_hears_ready_watchdog_and_stopping(daemon_factory, tmp_path):
    path = str(tmp_path / "notify.sock")
    sd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sd.bind(path)
    sd.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    d = daemon_factory(env=env, start=False).start(wait=False)
    got = []
    while "READY=1" not in "\n".join(got):
        got.append(sd.recv(4096).decode())
    d.wait_ready()  # READY=1 came, and the control endpoint answers
    pings = 0
    while pings < 3:  # every WATCHDOG_USEC / 2
        pings += sd.recv(4096) == b"WATCHDOG=1"
    assert d.terminate() == 0
    rest = []
    sd.settimeout(2)
    try:
        while True:
            rest.append(sd.recv(4096).decode())
    except TimeoutError:
        pass
    assert "STOPPING=1" in rest
    sd.close()
