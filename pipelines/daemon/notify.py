"""systemd's notify protocol, for `Type=notify` units: a datagram to $NOTIFY_SOCKET.

READY=1 once the control endpoint answers, WATCHDOG=1 every half $WATCHDOG_USEC while
the daemon's trio loop runs (a loop that is stuck stops the pings, and systemd restarts
the unit), STOPPING=1 when it begins to stop its jobs. Without $NOTIFY_SOCKET (not under
systemd) every call does nothing. An address starting with '@' is in the abstract
namespace. (sd_notify(3): the protocol is this datagram; no library needed.)
"""

from __future__ import annotations

import os
import socket

import trio

__all__ = ["notify", "watchdog", "watchdog_interval"]


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated KEY=VALUE) to systemd; False when not under it
    or when the socket cannot be reached."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between pings ($WATCHDOG_USEC / 2), or None when no watchdog is asked for
    (or it is meant for another pid, $WATCHDOG_PID)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


async def watchdog() -> None:
    """Ping systemd's watchdog for as long as this task runs (it returns at once when
    no watchdog is configured)."""
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)
