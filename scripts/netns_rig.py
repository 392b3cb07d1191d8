"""Two hosts on one machine: two network namespaces joined by a veth pair (Linux, root).

    with NetnsPair(rate="100mbit") as pair:      # rate None: the veth's own speed
        pair.argv(0, ["python", "x.py"])         # ["ip", "netns", "exec", NS0, "python", ...]
        pair.addr(1)                             # "10.X.Y.2", host 1's address

Each namespace has its loopback up and one end of the veth pair (`zt0` in host 0, `zt1`
in host 1), addressed 10.X.Y.1/24 and 10.X.Y.2/24. A `rate` caps each direction with a
token bucket (`tc qdisc ... root tbf`) on each end's egress; `set_rate` changes it in
place. The names carry this process's pid and a counter, so two rigs (or two test
sessions) never collide; `close()` deletes both namespaces, which takes the veth pair
and its qdiscs with them, and is idempotent. The kernel here has no netem: a rig caps
bandwidth, it does not add delay.

Used by tests/pipelines/cluster/test_netns.py (fixture `netns_pair`) and
scripts/bench_multinode.py. `missing()` says why a rig cannot be built here, or None.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

__all__ = ["NetnsPair", "missing", "namespaces"]

_PREFIX = "zt"
_counter = itertools.count()


def missing() -> str | None:
    """Why namespaces cannot be made here (no root, no `ip`/`tc`), or None."""
    absent = [p for p in ("ip", "tc") if _which(p) is None]
    if absent:
        return f"not installed: {', '.join(absent)} (apt-get install -y iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    return None


def namespaces() -> list[str]:
    """The names `ip netns list` shows (a rig's finalizer leaves none of its own)."""
    out = _run("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _which(program: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(program, path=path)


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([_which(argv[0]) or argv[0], *argv[1:]], capture_output=True, text=True)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


class NetnsPair:
    """Two network namespaces joined by a veth pair, optionally rate-capped (tbf)."""

    def __init__(self, rate: str | None = None) -> None:
        why = missing()
        if why is not None:
            raise RuntimeError(f"cannot build a netns pair: {why}")
        n = next(_counter)
        tag = f"{_PREFIX}{os.getpid()}-{n}"
        self.names = (f"{tag}a", f"{tag}b")
        # A /24 of 10/8 from the pid and counter: only the rig's own two ends ever
        # see it (each lives inside its namespace), so this only keeps logs readable.
        subnet = f"10.{(os.getpid() >> 8) % 250 + 1}.{(os.getpid() + n) % 250 + 1}"
        self._addrs = (f"{subnet}.1", f"{subnet}.2")
        self.devices = ("zt0", "zt1")
        self.rate: str | None = None
        self._closed = False
        try:
            for ns in self.names:
                _run("ip", "netns", "add", ns)
                self._ip(ns, "link", "set", "lo", "up")
            _run(
                "ip", "link", "add", self.devices[0], "netns", self.names[0], "type", "veth",
                "peer", "name", self.devices[1], "netns", self.names[1],
            )  # fmt: skip
            for ns, dev, addr in zip(self.names, self.devices, self._addrs, strict=True):
                self._ip(ns, "addr", "add", f"{addr}/24", "dev", dev)
                self._ip(ns, "link", "set", dev, "up")
            self.set_rate(rate)
        except BaseException:
            self.close()
            raise

    def _ip(self, ns: str, *args: str) -> None:
        _run("ip", "netns", "exec", ns, "ip", *args)

    def addr(self, host: int) -> str:
        """Host 0's or host 1's IPv4 address on the veth link."""
        return self._addrs[host]

    def argv(self, host: int, argv: list[str]) -> list[str]:
        """`argv` run inside host `host`'s namespace."""
        return [_which("ip") or "ip", "netns", "exec", self.names[host], *argv]

    def set_rate(self, rate: str | None) -> None:
        """Cap each direction at `rate` (tc syntax: "1gbit", "100mbit"), or lift the cap.

        tbf's bucket holds 4 ms at the rate (at least 64 KiB, so a GSO burst of the veth
        still passes), and a packet may queue 50 ms before it is dropped.
        """
        for ns, dev in zip(self.names, self.devices, strict=True):
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            if rate is not None:
                burst = max(_bits_per_second(rate) // 8 // 250, 64 << 10)
                _run(
                    "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                    "tbf", "rate", rate, "burst", str(burst), "latency", "50ms",
                )  # fmt: skip
        self.rate = rate

    def close(self) -> None:
        """Delete both namespaces (the veth pair and its qdiscs go with them)."""
        if self._closed:
            return
        self._closed = True
        for ns in self.names:
            _run("ip", "netns", "del", ns, check=False)

    def __enter__(self) -> NetnsPair:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_UNITS = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}


def _bits_per_second(rate: str) -> int:
    """tc's rate syntax ("1gbit", "100mbit", "500kbit") in bits per second."""
    for unit, scale in _UNITS.items():
        if rate.endswith(unit):
            try:
                return int(float(rate[: -len(unit)]) * scale)
            except ValueError:
                break
    raise ValueError(f"rate {rate!r}: expected a number with gbit, mbit, kbit or bit")
