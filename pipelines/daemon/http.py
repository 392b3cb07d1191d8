"""The daemon's read-only HTTP side: /metrics, /healthz, /readyz, /api/status and /.

It runs in a thread of its own (wsgiref, one thread per request) and reads only
``daemon.snapshot``, a dict the trio loop replaces whole once a second and on every state
change: the thread never touches the job table or a supervisor, so a slow scraper cannot
slow the daemon's loop, and the loop never waits for the thread.

/metrics is produced by prometheus_client from that snapshot (a custom collector, so a
job's series appear with the job and disappear once it is no longer among the snapshot's
jobs: those not ended and the last few ended), every series labelled by job, and
rendered once per snapshot (:class:`MetricsText`): a scrape reuses the text of the
snapshot it finds and adds only zerotrain_rank_up, which is read at scrape time. So a
scrape costs the same whatever the daemon holds (jobs, finished ones included), and
scrapes faster than the snapshot changes cost only the running ranks' /proc reads. From the
run's metrics.jsonl: zerotrain_step, zerotrain_loss, zerotrain_samples_total,
zerotrain_step_seconds (histogram of the gaps between consecutive steps),
zerotrain_last_step_timestamp_seconds. From its live/ files (pipelines.daemon.supervisor,
running jobs only): zerotrain_rank_up{rank} (process alive and not stopped, read from
/proc at scrape time), zerotrain_rank_compute_seconds{rank} (compute per step, recent:
the work before the collective, so the slow rank stands out), zerotrain_rss_bytes{rank},
zerotrain_restarts_total{reason} (reason="resume": the job's starts after its first; else
the kind of fault after which the run replaced a rank: crash, kill, stall, hang),
zerotrain_checkpoint_seconds (end of the newest checkpoint's step until its manifest was
written), zerotrain_hook_errors_total{hook} (error records in the run's hooks.jsonl: the
hook raised, returned no metrics or hung; 0 for a hook that only wrote metrics so far).
Also zerotrain_paused, zerotrain_queue_depth, zerotrain_jobs{state}.

/ is the status page: its script fetches /api/status (the snapshot, with each running
job's rank health read at request time) every 2 s and draws the job table and, per
running job, its loss curve, one curve per evaluation metric (metrics.jsonl's "eval")
and a table of its ranks: up or why down, pid, step, what it is doing, restarts by fault
kind and the last fault's reason (live/faults.json).

/readyz is 503 while the daemon starts or stops, and while a rank of a running job is
down, naming the job, the rank and why: its process gone, stopped or a zombie (from
/proc), or silent -- another rank has waited in the step's collectives for longer than
the run's heartbeat timeout while this one made no progress on the step or wrote no
telemetry (pipelines.daemon.supervisor.silent_ranks). Both are read at request time
(/proc and the ranks' live/ files, replaced every 0.5 s), not from the snapshot, so a
rank that goes silent is named within the heartbeat timeout + about 0.5 s.
zerotrain_rank_up is the same judgement: 0 while /readyz names the rank.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .statedir import DEFAULT_HTTP, DaemonUsageError
from .supervisor import STEP_BUCKETS, job_marker, rank_state, read_live_ranks, silent_ranks

__all__ = ["DEFAULT_HTTP", "HttpServer", "MetricsText", "parse_http", "start_http"]

log = logging.getLogger("zerotrain.daemon")


def parse_http(text: str) -> str | None:
    """``HOST:PORT`` (or ``off``) -> the address, or None for off; DaemonUsageError if
    malformed. A non-loopback host is accepted with a warning (the endpoints are
    read-only but name run dirs and losses)."""
    if text == "off":
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not host or not 0 <= int(port) <= 65535:
            raise ValueError
        ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        raise DaemonUsageError(
            f"zerotrain serve: --http expected HOST:PORT (e.g. {DEFAULT_HTTP}) or off, got {text!r}"
        ) from None
    if not ip.is_loopback:
        log.warning(
            "[daemon] --http %s is not a loopback address: reachable from the network", text
        )
    return text


class MetricsText:
    """The /metrics body for ``daemon``: the snapshot's families rendered once per
    snapshot (the daemon replaces it whole, so identity says it changed), plus
    zerotrain_rank_up read now. Safe to call from several request threads."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.renders = 0  # snapshots rendered (a scrape of an unchanged one renders none)
        self._lock = threading.Lock()
        self._snap: dict | None = None
        self._text = b""
        self._up = CollectorRegistry(auto_describe=False)
        self._up.register(_RankUp(daemon))

    def render(self) -> bytes:
        snap = self.daemon.snapshot
        with self._lock:
            if snap is not self._snap:
                registry = CollectorRegistry(auto_describe=False)
                registry.register(_Collector(snap))
                self._text = generate_latest(registry)
                self._snap = snap
                self.renders += 1
            text = self._text
        return text + generate_latest(self._up)


class _RankUp:
    """zerotrain_rank_up: the running jobs' ranks, judged now (rank_health)."""

    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        up = GaugeMetricFamily(
            "zerotrain_rank_up", "1 while the rank's process runs", labels=["job", "rank"]
        )
        health = rank_health(self.daemon)
        for job in self.daemon.snapshot.get("jobs", []):
            for r in job.get("ranks_live") or ():
                why = health.get((job["id"], r["rank"]))
                up.add_metric([str(job["id"]), str(r["rank"])], 1.0 if why == "up" else 0.0)
        yield up


class _Collector:
    """The families read from one snapshot."""

    def __init__(self, snap: dict):
        self.snap = snap

    def collect(self):
        snap = self.snap
        jobs = snap.get("jobs", [])
        step = GaugeMetricFamily("zerotrain_step", "Last optimizer step", labels=["job"])
        loss = GaugeMetricFamily("zerotrain_loss", "Last training loss", labels=["job"])
        samples = CounterMetricFamily(
            "zerotrain_samples", "Samples trained (steps x global batch)", labels=["job"]
        )
        last = GaugeMetricFamily(
            "zerotrain_last_step_timestamp_seconds", "Wall time of the last step", labels=["job"]
        )
        paused = GaugeMetricFamily("zerotrain_paused", "1 while the job is paused", labels=["job"])
        restarts = CounterMetricFamily(
            "zerotrain_restarts", "Starts of a job after its first", labels=["job", "reason"]
        )
        hist = HistogramMetricFamily(
            "zerotrain_step_seconds", "Seconds between consecutive steps", labels=["job"]
        )
        compute = GaugeMetricFamily(
            "zerotrain_rank_compute_seconds",
            "Seconds of compute per step before the collective (recent)",
            labels=["job", "rank"],
        )
        rss = GaugeMetricFamily(
            "zerotrain_rss_bytes", "Resident memory of the rank", labels=["job", "rank"]
        )
        ckpt = GaugeMetricFamily(
            "zerotrain_checkpoint_seconds",
            "End of the newest checkpoint's step until its manifest was written",
            labels=["job"],
        )
        hook_errors = CounterMetricFamily(
            "zerotrain_hook_errors",
            "Error records of a hook in the run's hooks.jsonl (raised, bad metrics, hung)",
            labels=["job", "hook"],
        )
        for job in jobs:
            label = [str(job["id"])]
            paused.add_metric(label, 1.0 if job["state"] == "paused" else 0.0)
            restarts.add_metric([*label, "resume"], float(job.get("restarts") or 0))
            for reason, n in sorted((job.get("restarts_by_reason") or {}).items()):
                restarts.add_metric([*label, reason], float(n))
            for r in job.get("ranks_live") or ():
                rl = [*label, str(r["rank"])]
                if r.get("compute_per_step") is not None:
                    compute.add_metric(rl, float(r["compute_per_step"]))
                if r.get("rss_bytes") is not None:
                    rss.add_metric(rl, float(r["rss_bytes"]))
            for hook, n in sorted((job.get("hook_errors") or {}).items()):
                hook_errors.add_metric([*label, hook], float(n))
            if job.get("checkpoint_s") is not None:
                ckpt.add_metric(label, float(job["checkpoint_s"]))
            if job.get("step"):
                step.add_metric(label, float(job["step"]))
                samples.add_metric(label, float(job["step"] * job.get("batch_size", 0)))
            if job.get("loss") is not None:
                loss.add_metric(label, float(job["loss"]))
            if job.get("last_step_t") is not None:
                last.add_metric(label, float(job["last_step_t"]))
            if "step_hist" in job:
                counts, cumulative, buckets = job["step_hist"], 0, []
                for bound, n in zip([*STEP_BUCKETS, float("inf")], counts, strict=True):
                    cumulative += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                hist.add_metric(label, buckets, job["step_sum"])
        queue = GaugeMetricFamily("zerotrain_queue_depth", "Jobs waiting to start")
        by_state = snap.get("daemon", {}).get("jobs", {})  # every job, not only those listed
        queue.add_metric([], float(by_state.get("queued", 0)))
        states = GaugeMetricFamily("zerotrain_jobs", "Jobs by state", labels=["state"])
        for state, n in sorted(by_state.items()):
            states.add_metric([state], float(n))
        yield from (step, loss, samples, last, paused, restarts, hist, compute, rss, ckpt)
        yield hook_errors
        yield from (queue, states)


def rank_health(daemon) -> dict[tuple[int, int], str]:
    """(job, rank) -> 'up' or why down, for the running jobs' ranks, read now: the
    process from /proc (gone, stopped, zombie), else whether it is silent (the ranks'
    live/ files, pipelines.daemon.supervisor.silent_ranks)."""
    snap = daemon.snapshot
    state_dir = snap.get("daemon", {}).get("state_dir")
    now = time.time()
    out = {}
    for job in snap.get("jobs", []):
        if job.get("state") != "running" or state_dir is None:
            continue
        marker = job_marker(state_dir, job["id"])
        records = {r["rank"]: r for r in job.get("ranks_live") or ()}
        if job.get("attempt_started") is not None:
            records.update(read_live_ranks(Path(job["run_dir"]), job["attempt_started"]))
        silent = silent_ranks(records, float(job.get("heartbeat_timeout") or 2.0), now)
        for r, rec in sorted(records.items()):
            if isinstance(rec.get("pid"), int):
                state = rank_state(rec["pid"], marker)
                out[(job["id"], r)] = silent.get(r, "up") if state == "up" else state
    return out


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):  # requests are not news
        pass


class HttpServer:
    def __init__(self, server: _Server, thread: threading.Thread):
        self.server = server
        self.thread = thread
        host, port = server.server_address[:2]
        self.address = f"{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_http(address: str, daemon) -> HttpServer:
    host, _, port = address.rpartition(":")
    metrics = MetricsText(daemon)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", "read-only: GET only\n")
        if path == "/metrics":
            return _reply(start_response, "200 OK", metrics.render(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return _reply(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            info = daemon.snapshot.get("daemon", {})
            down = [(j, r, why) for (j, r), why in rank_health(daemon).items() if why != "up"]
            if daemon.ready and not down:
                return _reply(start_response, "200 OK", "ready\n")
            if daemon.ready:
                what = "; ".join(f"job {j} rank {r} down ({why})" for j, r, why in down)
                return _reply(start_response, "503 Service Unavailable", f"not ready: {what}\n")
            why = "stopping" if info.get("closing") else "starting"
            return _reply(start_response, "503 Service Unavailable", f"not ready: {why}\n")
        if path == "/api/status":
            snap, health = daemon.snapshot, rank_health(daemon)
            jobs = [
                dict(j, rank_health={str(r): why for (i, r), why in health.items() if i == j["id"]})
                if j.get("ranks_live") is not None
                else j
                for j in snap.get("jobs", [])
            ]
            body = json.dumps({**snap, "jobs": jobs}, default=str)
            return _reply(start_response, "200 OK", body, "application/json")
        if path == "/":
            return _reply(start_response, "200 OK", _PAGE, "text/html; charset=utf-8")
        return _reply(start_response, "404 Not Found", f"no page {path}\n")

    server = make_server(host.strip("[]"), int(port), app, _Server, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="zerotrain-http", daemon=True)
    thread.start()
    return HttpServer(server, thread)


def _reply(start_response, status, body, content_type="text/plain; charset=utf-8"):
    data = body.encode() if isinstance(body, str) else body
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(data)))])
    return [data]


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>zerotrain</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; } td, th { padding: .3em .8em; text-align: left; }
th { border-bottom: 2px solid #888; } tr:nth-child(even) { background: #f3f3f3; }
.running { color: #06c; } .done { color: #080; } .failed { color: #c00; }
.paused, .stopped, .stopping { color: #a60; } .cancelled { color: #777; }
.up { color: #080; } .down { color: #c00; font-weight: bold; }
section.job { margin: 1.5em 0; } section.job h2 { font-size: 1.1em; margin: .3em 0; }
svg { background: #fafafa; border: 1px solid #ddd; margin: .5em 1em .5em 0; }
svg text { font-size: 11px; } #who { color: #666; }
</style></head>
<body><h1>zerotrain</h1><p id="who">connecting...</p>
<table id="jobs"><thead><tr><th>id</th><th>name</th><th>pipeline</th><th>state</th>
<th>step</th><th>loss</th><th>ranks</th><th>restarts</th><th>params_sha256</th></tr></thead>
<tbody></tbody></table><div id="curves"></div>
<script>
// Built from /api/status every 2 s: the job table, then for each running job its loss
// curve, one curve per evaluation metric and its ranks' health and restarts.
const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"};
function esc(s) { return String(s ?? "").replace(/[&<>"]/g, c => ESC[c]); }
function plot(job, what, cls, pts, color) {
  if (pts.length < 2) return "";
  const W = 360, H = 140, xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const line = pts.map(p => ((p[0]-x0)/((x1-x0)||1)*(W-20)+10).toFixed(1) + "," +
                            (H-10-(p[1]-y0)/((y1-y0)||1)*(H-30)).toFixed(1)).join(" ");
  return `<svg class="curve ${cls}" data-what="${esc(what)}" width="${W}" height="${H}">` +
         `<text x="10" y="14">job ${job.id} ${esc(what)} ${y1.toPrecision(3)} .. ` +
         `${y0.toPrecision(3)}, steps ${x0} .. ${x1}</text>` +
         `<polyline fill="none" stroke="${color}" stroke-width="1.5" points="${line}"/></svg>`;
}
function curves(job) {
  const evals = job.evals || [], names = [];
  for (const [, m] of evals) for (const k in m) if (!names.includes(k)) names.push(k);
  return plot(job, "loss", "loss", job.losses || [], "#06c") + names.map(k =>
    plot(job, "eval " + k, "eval", evals.filter(e => k in e[1]).map(e => [e[0], e[1][k]]),
         "#a40")).join("");
}
function ranks(job) {
  const health = job.rank_health || {};
  const rows = (job.ranks_live || []).map(r => {
    const h = health[r.rank] ?? "unknown", up = h === "up";
    const kinds = Object.entries(r.restarts || {});
    const total = kinds.reduce((a, [, n]) => a + n, 0);
    return `<tr data-rank="${r.rank}"><td>${r.rank}</td>` +
      `<td class="health ${up ? "up" : "down"}">${up ? "up" : "down: " + esc(h)}</td>` +
      `<td>${r.pid ?? ""}</td><td>${r.step ?? ""}</td><td>${esc(r.phase)}</td>` +
      `<td class="restarts">${total}</td>` +
      `<td class="kinds">${esc(kinds.map(([k, n]) => `${n} ${k}`).join(", "))}</td>` +
      `<td class="reason">${esc(r.reason)}</td></tr>`;
  }).join("");
  return `<table class="ranks"><thead><tr><th>rank</th><th>health</th><th>pid</th>` +
    `<th>step</th><th>doing</th><th>restarts</th><th>by kind</th><th>last fault</th>` +
    `</tr></thead><tbody>${rows}</tbody></table>`;
}
let refreshes = 0;
async function refresh() {
  try {
    const snap = await (await fetch("/api/status")).json(), d = snap.daemon;
    const who = document.getElementById("who");
    who.textContent = `daemon pid ${d.pid} - ${d.state_dir} - ${d.cpus_in_use} of ` +
      `${d.cpus} cpus in use - updated ${new Date().toLocaleTimeString()}`;
    who.dataset.refreshes = ++refreshes;
    document.querySelector("#jobs tbody").innerHTML = snap.jobs.slice().reverse().map(j =>
      `<tr><td>${j.id}</td><td>${esc(j.name)}</td><td>${esc(j.pipeline)}</td>` +
      `<td class="${esc(j.state)}">${esc(j.state)}</td><td>${j.step}</td>` +
      `<td>${j.loss == null ? "" : j.loss.toFixed(4)}</td><td>${j.ranks}</td>` +
      `<td>${j.restarts}</td>` +
      `<td><code>${esc((j.params_sha256 || "").slice(0, 16))}</code></td></tr>`
    ).join("");
    document.getElementById("curves").innerHTML = snap.jobs
      .filter(j => j.ranks_live !== undefined)
      .map(j => `<section class="job" id="job-${j.id}"><h2>job ${j.id} ` +
                `${esc(j.name)}: ${esc(j.state)}</h2>${curves(j)}${ranks(j)}</section>`)
      .join("");
  } catch (e) { document.getElementById("who").textContent = "daemon unreachable"; }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
