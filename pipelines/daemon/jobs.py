"""The job table: every job the daemon was given and its history, in SQLite (WAL).

A job's state machine (the daemon is its only writer)::

    queued ──start──> running ──exit 0──> done
      │  ^               │  └──exit != 0, not asked to stop──> failed
      │  │               └──pause / stop / cancel──> stopping ──process gone──> paused
      │  │                                                                  | stopped
      │  │                                                                  | cancelled
      │  └──resume── paused | stopped
      └──pause / stop / cancel──> paused | stopped | cancelled   (never started: no process)

``want`` records what a ``stopping`` job becomes once its processes are gone: ``paused``,
``stopped``, ``cancelled``, or ``queued`` (the daemon itself is shutting down; the job
resumes when a daemon next serves this state dir). A job that is started again resumes
from its run dir's newest valid checkpoint: its config, seed and run dir are fixed at
submit, so every restart continues the same run.

SQLite's WAL mode lets readers (``zerotrain jobs`` could read the file directly) run
beside the daemon's writes; every write is one short transaction, committed before the
state change is acted on, so a daemon killed at any point leaves a table that says what
was running, and the next daemon resumes exactly those jobs.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from .statedir import DaemonUsageError

__all__ = ["ACTIVE", "FINAL", "Job", "JobState", "JobTable"]


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
ACTIVE = frozenset({JobState.RUNNING, JobState.STOPPING})  # have (or may have) processes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    pipeline    TEXT NOT NULL,
    config      TEXT NOT NULL,      -- the resolved config, JSON (Config.to_dict())
    config_hash TEXT NOT NULL,
    argv        TEXT NOT NULL,      -- JSON list: `zerotrain run` arguments after CONFIG
    cwd         TEXT NOT NULL,
    ranks       INTEGER NOT NULL,
    priority    INTEGER NOT NULL,
    state       TEXT NOT NULL,
    want        TEXT,               -- what a stopping job becomes
    run_dir     TEXT NOT NULL,
    submitted   REAL NOT NULL,
    started     REAL,               -- the first start
    ended       REAL,
    attempts    INTEGER NOT NULL DEFAULT 0,  -- how many times a process was started
    restarts    INTEGER NOT NULL DEFAULT 0,  -- starts after the first (resumes)
    step        INTEGER NOT NULL DEFAULT 0,
    loss        REAL,
    pid         INTEGER,            -- the job's `zerotrain run` process while it runs
    exit_code   INTEGER,
    error       TEXT,
    summary     TEXT                -- summary.json once done, JSON
);
"""
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_by_end ON jobs (ended);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs (name);
"""

_COLUMNS = (
    "id name pipeline config config_hash argv cwd ranks priority state want run_dir "
    "submitted started ended attempts restarts step loss pid exit_code error summary"
).split()


@dataclass
class Job:
    id: int
    name: str
    pipeline: str
    config: dict
    config_hash: str
    argv: list[str]
    cwd: str
    ranks: int
    priority: int
    state: JobState
    want: str | None
    run_dir: str
    submitted: float
    started: float | None = None
    ended: float | None = None
    attempts: int = 0
    restarts: int = 0
    step: int = 0
    loss: float | None = None
    pid: int | None = None
    exit_code: int | None = None
    error: str | None = None
    summary: dict | None = field(default=None)

    @classmethod
    def _from_row(cls, row: tuple) -> Job:
        d = dict(zip(_COLUMNS, row, strict=True))
        d["config"] = json.loads(d["config"])
        d["argv"] = json.loads(d["argv"])
        d["summary"] = json.loads(d["summary"]) if d["summary"] else None
        d["state"] = JobState(d["state"])
        return cls(**d)

    def public(self) -> dict:
        """What `zerotrain status --json` shows: plain data."""
        out = {
            k: getattr(self, k)
            for k in (
                "id name pipeline state run_dir step loss restarts attempts priority ranks "
                "submitted started ended exit_code error config_hash"
            ).split()
        }
        out["state"] = str(self.state)
        out["summary"] = self.summary
        out["params_sha256"] = (self.summary or {}).get("params_sha256")
        return out


def _state_marks(states) -> tuple[str, list[str]]:
    """SQL placeholders for ``state IN (...)`` and their values, in a fixed order."""
    values = sorted(JobState(s).value for s in states)
    return ",".join("?" * len(values)), values


class JobTable:
    """The jobs table of one state dir. Opening it checks that the file is a database we
    can read; a file that is not is reported (DaemonUsageError) and left as it is.

    Reads come from a cache of parsed rows: the daemon is the table's only writer, and
    every write through :meth:`add` and :meth:`update` drops the row it changed, so a
    row's JSON columns are parsed once per change, not on every status request and
    every second's publishing. The cache holds every job not ended and only the
    ``ended_cached`` most recently read ended ones: a daemon that runs jobs for months
    keeps their history on disk, not in memory (at least the ``RECENT_ENDED`` listed
    every second, or each publish parses them again). The :class:`Job` objects returned are
    shared: read them, never change them.
    """

    def __init__(self, path: Path, *, ended_cached: int = 32):
        self.path = Path(path)
        self.ended_cached = ended_cached
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA cache_size=-512")  # KiB: the rows read are few (indexes)
            self.db.executescript(_SCHEMA)
            self.db.execute("SELECT count(*) FROM jobs").fetchone()
            missing = set(_COLUMNS) - {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
            if missing:
                raise sqlite3.DatabaseError(f"table jobs lacks columns {sorted(missing)}")
            self.db.executescript(_INDEXES)
            self._cache: dict[int, Job] = {}  # every job not ended
            self._ended: dict[int, Job] = {}  # ended ones, least recently read first
        except sqlite3.Error as err:
            raise DaemonUsageError(
                f"zerotrain serve: cannot read the job database {self.path}: {err} "
                "(the file is left as it is; move it away to start with an empty table)"
            ) from None

    def close(self) -> None:
        self.db.close()

    # ---- reads ---------------------------------------------------------------------

    def get(self, job_id: int) -> Job | None:
        job = self._cache.get(job_id)
        if job is None:
            job = self._ended.pop(job_id, None)
        if job is None:
            row = self.db.execute(
                f"SELECT {','.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                return None
            job = Job._from_row(row)
        if job.state in FINAL:
            self._ended[job_id] = job  # (re)inserted last: the most recently read
            if len(self._ended) > self.ended_cached:
                del self._ended[next(iter(self._ended))]
        else:
            self._cache[job_id] = job
        return job

    def all(self, states=None) -> list[Job]:
        """Every job, or those in ``states``, in submission order."""
        return self._jobs(self.ids(states))

    def ids(self, states=None) -> list[int]:
        if states is None:
            return [r[0] for r in self.db.execute("SELECT id FROM jobs ORDER BY id")]
        marks, wanted = _state_marks(states)
        query = f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY id"
        return [r[0] for r in self.db.execute(query, wanted)]

    def recent(self, ended: int) -> list[Job]:
        """The jobs not ended and the ``ended`` that ended last, in submission order:
        what a listing of the daemon's present shows. The indexes on state and end time
        keep its cost that of the rows it returns, however long the history."""
        marks, final = _state_marks(FINAL)
        last = self.db.execute(  # +state: newest first down the end-time index
            f"SELECT id FROM jobs WHERE +state IN ({marks}) ORDER BY ended DESC, id DESC LIMIT ?",
            (*final, ended),
        )
        return self._jobs(sorted({*self.ids(set(JobState) - FINAL), *(r[0] for r in last)}))

    def newest(self, n: int) -> list[Job]:
        """The ``n`` jobs submitted last, in submission order."""
        rows = self.db.execute("SELECT id FROM jobs ORDER BY id DESC LIMIT ?", (n,))
        return self._jobs(sorted(r[0] for r in rows))

    def _jobs(self, ids) -> list[Job]:
        return [j for j in map(self.get, ids) if j is not None]

    def named(self, name: str) -> Job | None:
        """The newest job called ``name``."""
        row = self.db.execute(
            "SELECT id FROM jobs WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)
        ).fetchone()
        return None if row is None else self.get(row[0])

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state (states with none left out)."""
        rows = self.db.execute("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")
        return dict(rows.fetchall())

    # ---- writes (one transaction each) ----------------------------------------------

    def add(
        self,
        *,
        name: str,
        pipeline: str,
        config: dict,
        config_hash: str,
        argv: list[str],
        cwd: str,
        ranks: int,
        priority: int,
        run_dir_for,
    ) -> Job:
        """Insert a queued job; ``run_dir_for(id)`` gives its run dir (it may need the id)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute(
                "INSERT INTO jobs (name, pipeline, config, config_hash, argv, cwd, ranks, "
                "priority, state, run_dir, submitted) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    pipeline,
                    json.dumps(config, sort_keys=True),
                    config_hash,
                    json.dumps(argv),
                    cwd,
                    ranks,
                    priority,
                    JobState.QUEUED.value,
                    "",
                    time.time(),
                ),
            )
            job_id = cur.lastrowid
            run_dir = str(run_dir_for(job_id))
            if not name:
                self.db.execute("UPDATE jobs SET name = ? WHERE id = ?", (f"job-{job_id}", job_id))
            self.db.execute("UPDATE jobs SET run_dir = ? WHERE id = ?", (run_dir, job_id))
        self._forget(job_id)
        return self.get(job_id)

    def update(self, job_id: int, **fields) -> None:
        if not fields:
            return
        for key in fields:
            if key not in _COLUMNS or key == "id":
                raise KeyError(f"jobs has no column {key!r}")
        values = []
        for key, value in fields.items():
            if key in ("summary", "config", "argv") and value is not None:
                value = json.dumps(value, sort_keys=True)
            elif isinstance(value, JobState):
                value = value.value
            values.append(value)
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._forget(job_id)  # also when the write fails: read it anew
        with self.db:
            self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values, job_id))

    def _forget(self, job_id: int) -> None:
        self._cache.pop(job_id, None)
        self._ended.pop(job_id, None)
