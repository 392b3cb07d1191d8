"""The layout table: a checkpoint's flat vector described for tools outside zerotrain.

The end-to-end test runs real rank processes (three ranks, so ZeRO shards cut
parameters in the middle) and then scripts/checkpoint_params.py in an interpreter where
zerotrain's packages cannot be imported: it must rebuild every named parameter from the
manifest's layout table alone, bit for bit the run's final weights.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actors import shard_bounds
from pipelines.model import build_model
from pipelines.store.checkpoint import layout_table, read_safetensors_file
from tests.pipelines.cluster.cluster_util import SMALL, zerotrain

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "checkpoint_params.py"
# runs the script with zerotrain's packages made unimportable
OUTSIDE = (
    "import runpy, sys; sys.modules['pipelines'] = sys.modules['actors'] = None; "
    "sys.modules['cykernels'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_the_table_places_every_parameter_and_cuts_it_across_shards():
    model = build_model("mlp_classifier", in_dim=5, n_classes=3, hidden=(7,), seed=0)
    n = model.params.size
    bounds = [shard_bounds(n, 3, r) for r in range(3)]
    table = layout_table(model, bounds)
    assert table["n"] == n and table["frozen"] == []
    assert [(p["name"], p["offset"], tuple(p["shape"])) for p in table["params"]] == [
        (s.name, s.offset, s.shape) for s in model.layout
    ]
    flat = np.full(n, np.nan, dtype=np.float32)
    for shard, (lo, hi) in zip(table["shards"], bounds, strict=True):
        assert (shard["lo"], shard["hi"]) == (lo, hi)
        part = model.params[lo:hi]
        covered = 0
        for piece in shard["pieces"]:
            p = next(q for q in table["params"] if q["name"] == piece["name"])
            length = piece["stop"] - piece["start"]
            assert piece["at"] == covered  # pieces tile the shard in order
            flat[p["offset"] + piece["start"] : p["offset"] + piece["stop"]] = part[
                piece["at"] : piece["at"] + length
            ]
            covered += length
        assert covered == hi - lo
    for name, arr in model.state_dict().items():
        p = next(q for q in table["params"] if q["name"] == name)
        got = flat[p["offset"] : p["offset"] + p["length"]].reshape(p["shape"])
        assert np.array_equal(got, arr), name
    assert any(s["pieces"][0]["start"] > 0 for s in table["shards"][1:])  # a cut parameter


@pytest.mark.parametrize("ranks", [1, 3])  # the single-process runner, and a cluster
def test_an_outside_script_rebuilds_every_named_parameter_from_the_layout_table(tmp_path, ranks):
    run_dir = tmp_path / "run"
    proc = zerotrain(
        "run", "mlp_classifier", *SMALL, "--ranks", str(ranks), "--mode", "zero2",
        "--set", "train.batch_size=63",
        "--run-dir", str(run_dir),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = max((run_dir / "checkpoints").glob("step-*"))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 16 and manifest["world"] == ranks
    out = tmp_path / "params.npz"
    done = subprocess.run(
        [sys.executable, "-I", "-c", OUTSIDE, str(SCRIPT), str(ckpt), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    weights, meta = read_safetensors_file(run_dir / "weights.safetensors")
    assert sorted(line["name"] for line in lines) == sorted(weights)  # every parameter
    with np.load(out, allow_pickle=False) as rebuilt:
        for name, arr in weights.items():
            assert rebuilt[name].shape == arr.shape and np.array_equal(rebuilt[name], arr), name
    # weights.safetensors carries the same table (one shard) in its metadata
    table = json.loads(meta["layout"])
    assert table["params"] == manifest["layout"]["params"]
    assert [(s["lo"], s["hi"]) for s in table["shards"]] == [(0, table["n"])]
