"""The cluster's CURVE keys: `zerotrain keys init DIR --nodes N` writes them,
`load_keys(DIR)` reads them back and refuses files others could read.

The scheme: one keypair per node. Node K's agent binds its tcp:// sockets as a CURVE
server with node K's keypair and connects to node J as a client with the same keypair
and node J's public key as the server key. So one key names one node both ways: a peer
proves it is node K by holding node K's secret key (the authenticator sees its public
key as the connection's User-Id and `ClusterKeys.node_of` maps it back to K), and a
client that reached node J knows it is node J. A single shared client key could not
tell node 1 from node 2, so a valid peer claiming another node's rank could not be
refused; a separate server keypair per node would add files and prove nothing more.

DIR holds, for each node K, `node-K.key` (its public key) and `node-K.key_secret` (the
public and the secret key), in ZeroMQ's certificate format (`zmq.auth.load_certificate`
reads them). Every file is 0600 and DIR 0700, written so (`O_EXCL`, no window with
looser modes). On a shared filesystem every node reads the one DIR; where nodes get
their own copy (a Kubernetes secret per pod), node K needs every `node-*.key` and its
own `node-K.key_secret` only. A Kubernetes secret volume mounts files 0644 unless told
otherwise: give it `defaultMode: 0400`.

`load_keys` refuses, with one line naming the file and its mode, any key file or DIR
that its group or others may read or write; and a DIR with no keys, or with a gap in
the node numbers.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ClusterKeys", "KeysError", "init_keys", "load_keys"]

_NODE_FILE = re.compile(r"node-(\d+)\.key(_secret)?")


class KeysError(ValueError):
    """Keys that cannot be written or used (the message is one line)."""


@dataclass(frozen=True)
class ClusterKeys:
    """The cluster's keys as loaded from `directory` (z85-encoded bytes, as zmq takes
    them). `public[K]` is node K's public key; `secret` holds the secret keys of the
    nodes whose `node-K.key_secret` is present."""

    directory: Path
    public: tuple[bytes, ...]
    secret: dict[int, bytes] = field(default_factory=dict, compare=False, repr=False)

    @property
    def nodes(self) -> int:
        return len(self.public)

    def keypair(self, node: int) -> tuple[bytes, bytes]:
        """(public, secret) of `node`; KeysError when its secret key file is absent."""
        if not 0 <= node < self.nodes:
            raise KeysError(
                f"node {node}: the keys in {self.directory} are for nodes 0..{self.nodes - 1}"
            )
        if node not in self.secret:
            raise KeysError(
                f"{self.directory / f'node-{node}.key_secret'}: not found "
                f"(node {node}'s secret key)"
            )
        return self.public[node], self.secret[node]

    def node_of(self, public_key: bytes | str) -> int | None:
        """The node whose public key this is (z85, bytes or str), None for a stranger."""
        key = public_key.encode("ascii") if isinstance(public_key, str) else public_key
        try:
            return self.public.index(key)
        except ValueError:
            return None


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def init_keys(directory: str | os.PathLike, nodes: int) -> ClusterKeys:
    """Write a fresh keypair for each of `nodes` nodes into `directory` (created 0700; it
    must not exist or be empty: keys are never overwritten) and return them loaded."""
    if type(nodes) is not int or not 1 <= nodes <= 4096:
        raise KeysError(f"nodes: expected an integer 1-4096, got {nodes!r}")
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise KeysError(f"{directory}: exists and is not a directory")
        if any(directory.iterdir()):
            raise KeysError(
                f"{directory}: not empty; keys are never overwritten (choose a new "
                "directory, or remove the old keys first)"
            )
    else:
        directory.mkdir(mode=0o700, parents=True)
    os.chmod(directory, 0o700)
    import zmq

    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    for node in range(nodes):
        public, secret = zmq.curve_keypair()
        base = directory / f"node-{node}.key"
        _write_private(base, _certificate(public, None, node, stamp))
        _write_private(
            base.with_name(base.name + "_secret"), _certificate(public, secret, node, stamp)
        )
    return load_keys(directory)


def _certificate(public: bytes, secret: bytes | None, node: int, stamp: str) -> str:
    """ZeroMQ's certificate text (what zmq.auth.create_certificates writes)."""
    kind = "Secret" if secret is not None else "Public"
    lines = [
        f"#   ****  zerotrain node {node}, generated {stamp}  ****",
        f"#   ZeroMQ CURVE {kind} Certificate",
        "#   zerotrain refuses this file if its group or others may read it.",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str) -> None:
    """Create `path` 0600 (O_EXCL: never over an existing file) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only have narrowed it; say it exactly
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------


def _check_private(path: Path, what: str, fix: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeysError(
            f"{path}: mode {mode:04o} lets its group or others in; {what} must be "
            f"readable by its owner only (chmod {fix} {path})"
        )


def load_keys(directory: str | os.PathLike) -> ClusterKeys:
    """The keys `init_keys` wrote into `directory`, after checking that neither it nor
    any key file is open to its group or others (KeysError, one line, otherwise)."""
    import zmq.auth  # here, not at the top: `zerotrain env` has no use for zmq

    directory = Path(directory)
    if not directory.is_dir():
        raise KeysError(
            f"{directory}: no such keys directory (create one with "
            "`zerotrain keys init DIR --nodes N`)"
        )
    _check_private(directory, "a keys directory", "700")
    public: dict[int, bytes] = {}
    secret: dict[int, bytes] = {}
    for path in sorted(directory.iterdir()):
        match = _NODE_FILE.fullmatch(path.name)
        if match is None:
            continue
        _check_private(path, "a key file", "600")
        node = int(match.group(1))
        try:
            pub, sec = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as err:
            raise KeysError(f"{path}: not a ZeroMQ certificate ({err})") from None
        if match.group(2):
            if sec is None:
                raise KeysError(f"{path}: holds no secret-key")
            secret[node] = sec
            if node in public and public[node] != pub:
                raise KeysError(f"{path}: its public key differs from node-{node}.key")
        else:
            if node in public and public[node] != pub:
                raise KeysError(f"{path}: its public key differs from node-{node}.key_secret")
        public.setdefault(node, pub)
        for key in (pub, sec):
            if key is not None and len(key) != 40:
                raise KeysError(f"{path}: a key is not 40 z85 characters")
    if not public:
        raise KeysError(
            f"{directory}: holds no node-K.key files (create them with "
            "`zerotrain keys init DIR --nodes N`)"
        )
    missing = sorted(set(range(max(public) + 1)) - set(public))
    if missing:
        raise KeysError(
            f"{directory}: no key for node {missing[0]} (nodes 0..{max(public)} "
            "must all have node-K.key)"
        )
    return ClusterKeys(directory, tuple(public[k] for k in range(len(public))), secret)
