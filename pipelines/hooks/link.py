"""The rank's end of the hook link: offer a step's gradients to the analyzer, never wait.

Each rank process holds one `HookOutbox`. After a step whose number some analyzer wants
(`outbox.due(step)`), the rank copies what the analyzer needs into a `HookSample` and
`offer`s it; a task of the rank (`outbox.run`) forwards queued samples to the
HookAnalyzer actor in the analyzer process with a call. The step itself only ever does
a `put_nowait` on a small bounded queue:

    outbox = HookOutbox(cfg.hooks.specs + cli_hooks, layout=model.layout)
    nursery.start_soon(outbox.run)                       # lives as long as the rank
    ...
    if outbox.due(step):                                 # 1-based: steps done
        outbox.offer(HookSample(step=step, rank=r, world=w, ..., rank_grad=g.copy(), ...))

## Demand: a sample is built only when the analyzer can take it (GenStage-style)

The analyzer answers a sample's call once that sample has its final fate (analyzed,
dropped, stale, ...): until then the rank has no *credit* (`has_credit()`). Building
a sample costs copies of the gradient, parameters and update, and sending it costs the
memory traffic of a few MB; an analyzer that is slower than training would drop most
of them anyway. So the ranks sample a due step only when every rank has credit: each
adds its credit to the step's small all-reduce (`RankStep.hook_credit` ->
`hooks_agreed`) and all sample the next due step, or none does -- a step is complete
from every rank or absent, and which steps get sampled never touches the training
arithmetic. A due step without agreement is `decline`d: counted as offered and
dropped, nothing copied.

## Exact hooks: waiting instead of declining

A step due for an analyzer declared `exact=True` is never declined: before computing
it, each rank waits (`wait_for_credit`) until the analyzer has answered every sample it
sent, then samples it. Every rank decides so from the step number alone, so all sample
it; and since no rank sends a sample before the last one is answered, the analyzer
holds one step at a time and never has to drop one. Training pays for it in time
whenever the analyzer is slower than the steps.

The wait covers the analyzer's restart too. A silent analyzer (starved of the CPU, or
a hook holding the GIL) is declared down after the run's heartbeat timeout, and its
supervisor kills and restarts it; a sample of an exact step whose call then fails
(the analyzer went down before answering, or answered "lost": its HookAnalyzer
restarted) is not given up: the forwarder waits for the analyzer to be up again and
sends the same sample to it, so the ranks wait at that step. Only a sample still
unanswered `exact_wait` seconds after its first failed attempt (the analyzer's
supervisor gave up) makes the step a gap: counted `failed`, with a one-line warning;
later exact samples then fail at once until the analyzer is seen up again, so a run
whose analyzer is gone is not slowed step after step.

## When the analyzer cannot take a sample (the rank's side of the failure policy)

A rank never waits for the analyzer and never sees its errors (the policy as a whole is
in the `pipelines.hooks` doc):

- **Queue full**: `offer` drops the new sample at once and counts it (`dropped`). What
  is queued goes out.
- **Analyzer down** (its process is restarting, killed, never started): the forwarder
  checks the analyzer node's liveness before each call; a sample for a node known to be
  down is not sent and counts as `failed`, as does a call that raises (the node went
  down meanwhile, no node in this process, a value that cannot travel). Nothing is
  raised into the rank, and the credit comes back.
- **Analyzer slow or stopped**: no answer within `reply_timeout` gives the credit back
  (counted `sent`). Only the forwarder task waits; meanwhile due steps are declined.

`sent` means "handed to the analyzer", not "analyzed"; the analyzer's own stats say
what it analyzed and dropped (per rank, in samples).

- **The run's end**: the rank waits for `flush` (bounded) before it reports and exits:
  queued samples go out, then one call to the analyzer answers how many it received.
  Without it the last sample, still queued in the rank or unread by a starved
  (SCHED_IDLE) analyzer, dies with the rank process, and the cluster's "stats" (another
  connection) is answered before it arrives. `lost` = sent but never received;
  `unconfirmed` = no answer in time.

The arrays of an offered sample are sent without a copy: give `offer` copies (or fresh
arrays) that the rank will not modify afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import trio

import actors

__all__ = ["DEFAULT_TARGET", "HookOutbox", "HookSample"]

DEFAULT_TARGET = "HookAnalyzer@analyzer"

_log = logging.getLogger("zerotrain.hooks.link")

# what became of a rank's samples in the analyzer (summary.json hooks.analyzer.ranks),
# besides "received" and "pending" (held at the time of "stats"): every received sample
# ends in one of these, and a sample's call is answered with it. Any other answer
# ("lost": the HookAnalyzer holding it restarted) means it never got a fate.
SAMPLE_FATES = ("received", "analyzed", "dropped", "stale", "rejected", "skipped")
FINAL_FATES = frozenset(SAMPLE_FATES[1:])


@actors.record(name="zerotrain.HookSample")
@dataclasses.dataclass(frozen=True, eq=False)
class HookSample:
    """One rank's view of one step, as the analyzer needs it.

    step        1-based: the number of steps done (as in metrics.jsonl).
    rank, world this rank and the world size.
    loss, lr    the step's global mean loss and learning rate.
    lo, hi      this rank's shard of the flat parameter vector: [lo, hi).
    batch_size  samples per rank per step (B_small of the noise scale).
    rank_grad   this rank's own averaged gradient, full length n, before the reduction.
    grad        the reduced averaged gradient, shard [lo:hi], before clipping.
    params      shard [lo:hi] of the parameters before the update.
    update      shard [lo:hi] of the applied update (params_after - params_before).
    layout      (name, offset, shape) of each parameter in layer order, as model.layout
                (a few hundred bytes; sent with every sample so that a restarted
                analyzer needs nothing else). `HookOutbox(layout=...)` fills it in.
    """

    step: int
    rank: int
    world: int
    loss: float
    lr: float
    lo: int
    hi: int
    batch_size: int
    rank_grad: np.ndarray
    grad: np.ndarray
    params: np.ndarray
    update: np.ndarray
    layout: list = dataclasses.field(default_factory=list)


def wire_layout(layout) -> list:
    """A model layout as wire data: [[name, offset, [shape...]], ...]."""
    from pipelines.hooks import normalise_layout

    return [[name, offset, list(shape)] for name, offset, shape in normalise_layout(layout)]


class HookOutbox:
    """A bounded, never-blocking queue of HookSamples from one rank to the analyzer.

    specs     the run's hook specs (strings or dicts, as in the config) or loaded Hooks;
              only the analyzers' sampling periods matter here (transforms run in the
              rank, outside this class).
    target    the HookAnalyzer actor, "name@node".
    capacity  samples queued at most; an offer beyond that is dropped.
    layout    the model's layout, stamped into samples offered without one.
    reply_timeout  how long one call waits for the analyzer's answer.
    exact_wait     how long a sample of an exact step waits for a down analyzer to be
              up again before the step is given up (see "Exact hooks").
    """

    def __init__(
        self,
        specs: list,
        *,
        target: str = DEFAULT_TARGET,
        capacity: int = 1,
        layout=None,
        reply_timeout: float = 30.0,
        exact_wait: float = 60.0,
    ):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"HookOutbox capacity must be an int >= 1, got {capacity!r}")
        if "@" not in target:
            raise ValueError(f"HookOutbox target must be 'name@node', got {target!r}")
        from pipelines.hooks import ANALYZER, Hook, load_hooks

        loaded = [s for s in specs if isinstance(s, Hook)]
        texts = [s for s in specs if not isinstance(s, Hook)]
        if texts:
            loaded += load_hooks(texts)
        self.periods = sorted({h.every for h in loaded if h.kind == ANALYZER})
        self.exact_periods = sorted({h.every for h in loaded if h.kind == ANALYZER and h.exact})
        # the run's own analyzers by name (the live records may detach one)
        self.own = {h.name: (h.every, h.exact) for h in loaded if h.kind == ANALYZER}
        self.live: list[dict] = []  # RUN/hooks_live.jsonl's records, as the Plan says
        self.target = target
        self.node = target.rsplit("@", 1)[1]
        self.capacity = capacity
        self.reply_timeout = reply_timeout
        self.exact_wait = exact_wait
        self._gone = False  # an exact sample waited exact_wait in vain: do not wait again
        self.layout = wire_layout(layout) if layout is not None else []
        self._send, self._receive = trio.open_memory_channel(capacity)
        self._counts = {"offered": 0, "sent": 0, "dropped": 0, "failed": 0}
        # Samples offered and not yet counted (queued, or on their way and unanswered).
        # Counted at the offer: a memory channel hands an item straight to a waiting
        # receiver, so neither its buffer nor the forwarder shows that sample until the
        # forwarder has run (test_a_sample_handed_to_the_waiting_forwarder_...).
        self._unsettled = 0
        self._settled = None  # an Event for `wait_for_credit`, set when _unsettled is 0
        self.flushed = None  # what `flush` learned: {"lost", "unconfirmed"} or None

    def set_live(self, records: list[dict]) -> None:
        """The analyzers attached and detached live (pipelines.store.overrides): from now
        on `due` and `exact` count each in its window of steps. Every rank sets the same
        records before the first step they change, so all sample alike."""
        if records == self.live:
            return
        from pipelines.store.overrides import hook_windows

        self.live = list(records)
        windows = hook_windows(records)
        hooks = dict(self.own)
        for rec in records:
            if rec["action"] == "attach":
                hooks[rec["name"]] = (rec["every"], rec["exact"])
        self.windows = [(e, x, *windows.get(n, (0, math.inf))) for n, (e, x) in hooks.items()]

    windows = None  # [(every, exact, after, until)] once live records were set

    def due(self, step: int) -> bool:
        """True when some analyzer samples `step` (1-based): worth building a sample."""
        if self.windows is not None:
            return any(a < step <= u and step % e == 0 for e, _, a, u in self.windows)
        return any(step % every == 0 for every in self.periods)

    def exact(self, step: int) -> bool:
        """True when an exact analyzer samples `step`: wait for credit, never decline."""
        if self.windows is not None:
            return any(x and a < step <= u and step % e == 0 for e, x, a, u in self.windows)
        return any(step % every == 0 for every in self.exact_periods)

    async def wait_for_credit(self) -> None:
        """Return once `has_credit()`: every sample sent has its answer (or gave up:
        the forwarder's call is bounded by `reply_timeout`, a down analyzer fails it)."""
        while self._unsettled:
            self._settled = trio.Event()
            await self._settled.wait()

    def _settle_one(self) -> None:
        self._unsettled -= 1
        if not self._unsettled and self._settled is not None:
            self._settled.set()

    def has_credit(self) -> bool:
        """True when the analyzer has answered every sample this outbox sent it and
        nothing is queued: a sample offered now goes out at once. (The ranks agree on
        their credit before they sample a step: see RankStep.hook_credit.)"""
        return not self._unsettled

    def decline(self, step: int) -> None:
        """A due step not sampled for want of credit: counted as offered and dropped,
        without a copy of anything."""
        self._counts["offered"] += 1
        self._counts["dropped"] += 1

    def offer(self, sample: HookSample) -> bool:
        """Queue `sample` without waiting; False (and counted as dropped) if full."""
        self._counts["offered"] += 1
        if self.layout and not sample.layout:
            sample = dataclasses.replace(sample, layout=self.layout)
        try:
            self._send.send_nowait(sample)
        except trio.WouldBlock:
            self._counts["dropped"] += 1
            return False
        self._unsettled += 1
        return True

    async def run(self) -> None:
        """Forward queued samples to the target until cancelled; never raises for a
        failed send (see the failure rules in the module doc)."""
        async for sample in self._receive:
            try:
                await self._forward(sample)
            finally:
                self._settle_one()

    async def _forward(self, sample: HookSample) -> None:
        if self.exact(sample.step):
            await self._forward_exact(sample)
            return
        node = _current_node()
        info = node.peer_info(self.node) if node is not None else None
        if node is None or (info is not None and info.alive is False):
            self._fail(sample, "no node" if node is None else f"node {self.node} is down")
            return
        try:
            # a call, answered once the analyzer is done with the sample (analyzed,
            # dropped, ...): until then this rank has no credit for another one
            await actors.call(self.target, sample, timeout=self.reply_timeout)
        except actors.CallTimeout:
            pass  # it went out; the analyzer is slow (or stopped): offer again
        except Exception as exc:  # the analyzer's trouble must never reach the rank
            self._fail(sample, f"{type(exc).__name__}: {exc}")
            return
        self._counts["sent"] += 1

    async def _forward_exact(self, sample: HookSample) -> None:
        """Send `sample` until an analyzer answers it with its fate, waiting for a down
        analyzer to be up again: at most `exact_wait` s from the first failure (see
        "Exact hooks")."""
        name = self.target.rsplit("@", 1)[0]
        give_up_at = None  # set by the first failed attempt
        while True:
            node = _current_node()
            if node is None:
                self._fail(sample, "no node")
                return
            info = node.peer_info(self.node)
            if info is not None and (info.alive is False or name not in info.names):
                if self._gone:  # waited in vain before, and it is still down
                    self._fail(sample, f"node {self.node} is down")
                    return
                give_up_at = give_up_at or trio.current_time() + self.exact_wait
                with trio.move_on_at(give_up_at):
                    await node.wait_peer(self.node, names=(name,))
                if trio.current_time() >= give_up_at:
                    self._gone = True
                    why = f"down for {self.exact_wait:g} s: exact step {sample.step} not analysed"
                    self._fail(sample, why)
                    return
            self._gone = False
            try:
                fate = await actors.call(self.target, sample, timeout=self.reply_timeout)
            except actors.CallTimeout:
                break  # it went out; the analyzer is alive but slow: go on
            except (actors.ActorExited, actors.NoSuchActor) as exc:
                fate = f"{type(exc).__name__}: {exc}"  # down before answering: again
            except Exception as exc:  # the analyzer's trouble must never reach the rank
                self._fail(sample, f"{type(exc).__name__}: {exc}")
                return
            if fate not in FINAL_FATES:  # "lost": its HookAnalyzer restarted; or down
                give_up_at = give_up_at or trio.current_time() + self.exact_wait
                if trio.current_time() >= give_up_at:
                    self._fail(sample, f"exact step {sample.step} not analysed: {fate}")
                    return
                await trio.sleep(0.05)
                continue
            break
        self._counts["sent"] += 1

    async def flush(self, rank: int, timeout: float) -> dict:
        """The rank is done: wait (at most `timeout` s, in all) until the queue is empty,
        then ask the analyzer for what it received from `rank` -- a call after the samples'
        on the same connection, so its answer counts every sample that ever arrives. Sets
        and returns `flushed`: {"lost": sent but never received, "unconfirmed": sent
        with no answer to tell}. Samples still queued at the deadline count as failed.
        Never raises for the analyzer's trouble; call it once, after the last offer."""
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline):
            while self._unsettled:
                await trio.sleep(0.01)
        while True:  # left over at the deadline: never sent
            try:
                sample = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            self._settle_one()
            self._fail(sample, f"still queued {timeout:g} s after the run's end")
        sent = self._counts["sent"]
        self.flushed = {"lost": 0, "unconfirmed": sent}
        if not sent:
            self.flushed["unconfirmed"] = 0
            return self.flushed
        received, why = None, "no time left"
        while received is None and trio.current_time() < deadline:
            try:
                left = max(deadline - trio.current_time(), 0.1)
                got = await actors.call(self.target, ("flush", rank), timeout=left)
                received = int(got["received"])
            except Exception as exc:  # the analyzer's trouble must never reach the rank
                why = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, actors.CallTimeout):
                    break
                await trio.sleep(0.2)  # down for now (starved, restarting): ask again
        if received is None:
            _log.warning(
                "[HookOutbox %s] %d samples sent to %s, none confirmed: %s",
                rank,
                sent,
                self.target,
                why,
            )
            return self.flushed
        # fewer received than sent: lost on the way (or counted by an analyzer process
        # that has since restarted); more: an earlier incarnation of this rank sent them
        self.flushed = {"lost": max(sent - received, 0), "unconfirmed": 0}
        if self.flushed["lost"]:
            _log.warning(
                "[HookOutbox %s] %d of %d samples sent to %s never arrived",
                rank,
                self.flushed["lost"],
                sent,
                self.target,
            )
        return self.flushed

    def _fail(self, sample, why):
        self._counts["failed"] += 1
        if self._counts["failed"] == 1 or self._counts["failed"] % 100 == 0:
            _log.warning(
                "[HookOutbox %s] step %d not sent to %s: %s (%d failed so far)",
                sample.rank,
                sample.step,
                self.target,
                why,
                self._counts["failed"],
            )

    def stats(self) -> dict:
        """{"offered", "sent", "dropped", "failed", "queued"} counts of this outbox
        (queued: waiting, or on its way and not yet answered; offered is the sum of the
        other four), and after `flush` "lost" and "unconfirmed" (see there)."""
        stats = {**self._counts, "queued": self._unsettled}
        return {**stats, **(self.flushed or {})}


def _current_node():
    """This process's node, or None: the outbox is made before the rank's node opens and
    used after it closes, so it asks at each send instead of being handed the node."""
    return actors.current_node(required=False)
