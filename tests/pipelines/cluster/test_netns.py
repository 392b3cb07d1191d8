"""Two hosts as two network namespaces joined by a veth pair (scripts/netns_rig.py), the
link capped with tc tbf: two node agents, one in each namespace on its 10.x address,
give the params_sha256 of the same ranks on one host.

Tests marked `netns` need root and iproute2: skipped with the reason elsewhere, failed
under CI=true (where the suite runs as root, and a skip would hide a test that never
ran). The fixture deletes its namespaces in its finalizer and checks none is left.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.pipelines.cli_util import REPO, zerotrain
from tests.pipelines.cluster.cluster_util import agent, finish, params_sha256

sys.path.insert(0, str(REPO / "scripts"))
import netns_rig  # noqa: E402  (scripts/ is no package: the rig is shared with a benchmark)

pytestmark = [pytest.mark.slow, pytest.mark.netns]

STEPS = ("--steps", "40")
RUN = ("run", "char_lm", "--ranks", "4", "--mode", "zero2", *STEPS, "--seed", "11")
PORT = 29500


@pytest.fixture
def netns_pair():
    """Two namespaces on a veth pair capped at 100 Mbit/s each way; gone afterwards."""
    why = netns_rig.missing()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"a netns test cannot run under CI=true: {why}")
        pytest.skip(f"netns test: {why}")
    pair = netns_rig.NetnsPair(rate="100mbit")
    try:
        yield pair
    finally:
        pair.close()
        left = set(pair.names) & set(netns_rig.namespaces())
        assert not left, f"namespaces left behind: {sorted(left)}"


def _agent(pair, host: int, args: list[str], cwd: Path):
    """Node `host`'s agent, run in the namespace of host `host`."""
    return agent(args, {}, cwd, f"node{host}", wrap=lambda argv: pair.argv(host, argv))


@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_two_agents_in_two_namespaces_give_the_bits_of_one_host(tmp_path, netns_pair, wire):
    """Node 0 in namespace a, node 1 in namespace b, started by flags, their ranks' ring
    crossing the capped veth link over tcp (frames) while one host's ring runs on
    shared-memory lanes: the same bits, with the fp32 wire and with the bf16 one."""
    wire_set = ("--set", f"cluster.wire_dtype={wire}") if wire != "fp32" else ()
    keys = tmp_path / "keys"
    made = zerotrain("keys", "init", str(keys), "--nodes", "2")
    assert made.returncode == 0, made.stderr
    master = f"{netns_pair.addr(0)}:{PORT}"
    run_dir = tmp_path / "run"
    common = [*RUN, *wire_set, "--nodes", "2", "--master", master, "--run-dir", str(run_dir)]
    common += ["--keys", str(keys)]
    node1 = [*common, "--node-rank", "1", "--advertise-addr", netns_pair.addr(1)]
    agents = {
        "node1": _agent(netns_pair, 1, node1, tmp_path),
        "node0": _agent(netns_pair, 0, [*common, "--node-rank", "0"], tmp_path),
    }
    results = finish(agents, timeout=400)
    if "not wired in yet" in results["node0"][1]:
        # The only transport a non-loopback address may use is CURVE (issue 20); until
        # the node transport has it, an agent refuses --keys in one line.
        pytest.skip(f"CURVE is not on the node transport yet: {results['node0'][1].strip()}")
    assert results["node0"][0] == 0, results["node0"][1]
    assert results["node1"][0] == 0, results["node1"][1]
    one_host = tmp_path / "one_host"
    done = zerotrain(*RUN, *wire_set, "--run-dir", str(one_host), timeout=400)
    assert done.returncode == 0, done.stderr
    assert params_sha256(run_dir) == params_sha256(one_host)
    # node 1's ranks lived on host b's address and talked to node 0's across the link
    plan1 = json.loads((run_dir / "node-1" / "plan.json").read_text())
    assert plan1["endpoints"][2].startswith(f"tcp://{netns_pair.addr(1)}:")
    assert plan1["peers"]["rank1"].startswith(f"tcp://{netns_pair.addr(0)}:")
