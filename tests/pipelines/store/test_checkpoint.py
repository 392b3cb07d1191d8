"""Sharded checkpoints: round trip, durability, corruption detection, resharding, loaders."""

import json

import numpy as np
import pytest
import trio

from pipelines.config import load_config
from pipelines.core import build_model_for, rank_batches
from pipelines.data import load_dataset
from pipelines.step import InProcessGroup, LocalCollective, RankStep, shard_bounds
from pipelines.store import checkpoint as ck
from pipelines.store.safetensors import SafetensorsError, read_safetensors, safetensors_bytes

N = 1001


def vectors(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=N).astype(np.float32) for k in ("params", "exp_avg", "exp_avg_sq")}


def save(root, step, world, full, **manifest):
    shards = []
    for r in range(world):
        lo, hi = shard_bounds(N, world, r)
        shards.append((lo, hi, {k: v[lo:hi] for k, v in full.items()}))
    return ck.save_checkpoint(root, step, shards, N, {"mode": "zero2", **manifest})


def test_a_checkpoint_round_trips_whatever_the_world_size(tmp_path):
    full = vectors()
    for world in (1, 3, 4):
        path = save(tmp_path / f"w{world}", 10, world, full)
        manifest, loaded = ck.load_full(path)
        assert manifest["world"] == world and manifest["step"] == 10
        assert sorted(loaded) == sorted(full)
        for k in full:
            np.testing.assert_array_equal(loaded[k], full[k])


def test_writes_leave_no_temp_files_and_the_manifest_lists_every_shard(tmp_path):
    path = save(tmp_path, 5, 4, vectors(), config_hash="abc")
    names = sorted(p.name for p in path.iterdir())
    assert names == ["manifest.json"] + [f"shard-{r:05d}-of-00004.safetensors" for r in range(4)]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["config_hash"] == "abc"
    assert [s["rank"] for s in manifest["shards"]] == [0, 1, 2, 3]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])


def _corrupt(path, how):
    shard = path / "shard-00001-of-00002.safetensors"
    if how == "torn":  # shards written, the process died before the manifest
        (path / "manifest.json").unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "bit-flip":
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        shard.write_bytes(bytes(raw))
    elif how == "missing-shard":
        shard.unlink()
    elif how == "garbled-manifest":
        (path / "manifest.json").write_text('{"format": ')


@pytest.mark.parametrize(
    "how, reason",
    [
        ("torn", "no manifest.json"),
        ("truncated", "truncated or torn"),
        ("bit-flip", "SHA-256 mismatch"),
        ("missing-shard", "missing"),
        ("garbled-manifest", "unreadable"),
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_with_a_reason(tmp_path, how, reason):
    good = vectors(1)
    save(tmp_path, 10, 2, good)
    newest = save(tmp_path, 20, 2, vectors(2))
    _corrupt(newest, how)
    found = ck.latest_valid(tmp_path)
    assert found.path == ck.checkpoint_dir(tmp_path, 10)
    assert len(found.skipped) == 1 and found.skipped[0][0] == newest
    assert reason in found.skipped[0][1]
    _, loaded = ck.load_full(found.path)
    np.testing.assert_array_equal(loaded["params"], good["params"])
    with pytest.raises(ck.CheckpointError):
        ck.verify_checkpoint(newest)


def test_no_valid_checkpoint_gives_none_and_every_reason(tmp_path):
    first = save(tmp_path, 1, 2, vectors())
    _corrupt(first, "bit-flip")
    second = save(tmp_path, 2, 2, vectors())
    _corrupt(second, "torn")
    found = ck.latest_valid(tmp_path)
    assert found.path is None
    reasons = dict(found.skipped)
    assert set(reasons) == {first, second}
    assert "SHA-256 mismatch" in reasons[first] and "no manifest.json" in reasons[second]
    assert ck.latest_valid(tmp_path / "nothing").path is None


def test_retention_keeps_the_last_k_and_the_best(tmp_path):
    losses = {1: 0.9, 2: 0.2, 3: 0.8, 4: 0.7, 5: 0.6}
    for step, loss in losses.items():
        save(tmp_path, step, 1, vectors(step), metrics={"loss": loss})
    ck.apply_retention(tmp_path, keep_last=2, keep_best=1, best_metric="loss")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [
        "step-00000002",
        "step-00000004",
        "step-00000005",
    ]


def test_retention_leaves_an_in_flight_checkpoint_alone(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, 1, vectors(step))
    (ck.checkpoint_dir(tmp_path, 3) / "manifest.json").unlink()  # being written
    ck.apply_retention(tmp_path, keep_last=1)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


def test_retention_keeps_a_checkpoint_a_user_asked_for(tmp_path):
    # step 1 asked for (`zerotrain checkpoint`), step 2 torn, steps 3-5 periodic
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step, 1, vectors(step), **({"asked": True} if step == 1 else {}))
    (ck.checkpoint_dir(tmp_path, 2) / "manifest.json").unlink()
    ck.apply_retention(tmp_path, keep_last=2)
    # the torn step 2 is older than every checkpoint the rolling window keeps: deleted
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [
        "step-00000001",
        "step-00000004",
        "step-00000005",
    ]


def test_our_safetensors_files_load_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    path = save(tmp_path, 3, 2, vectors())
    manifest = json.loads((path / "manifest.json").read_text())
    for s in manifest["shards"]:
        loaded = st.load_file(str(path / s["file"]))
        assert sorted(loaded) == ["exp_avg", "exp_avg_sq", "params"]
        assert loaded["params"].shape == (s["hi"] - s["lo"],)
    # and the package's files load with our reader
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int64)}
    st.save_file(arrays, str(tmp_path / "theirs.safetensors"), metadata={"k": "v"})
    ours, meta = ck.read_safetensors_file(tmp_path / "theirs.safetensors")
    assert meta == {"k": "v"}
    for k in arrays:
        np.testing.assert_array_equal(ours[k], arrays[k])


def test_the_reader_rejects_malformed_bytes_with_a_reason():
    blob = b"".join(bytes(c) for c in safetensors_bytes({"x": np.ones(4, np.float32)}))
    assert read_safetensors(blob)[0]["x"].sum() == 4
    for bad, why in [
        (blob[:5], "shorter"),
        (blob[:-1], "truncated"),
        (blob + b"\0", "trailing"),
        (b"\xff" * 8 + blob[8:], "header size"),
    ]:
        with pytest.raises(SafetensorsError, match=why):
            read_safetensors(bad)


def test_exported_weights_load_into_the_equivalent_torch_module(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    cfg = load_config(
        "mlp_classifier", ["model.hidden=[32, 16]", "data.n_train=64", "data.n_eval=16"]
    )
    data = load_dataset(cfg.data, "eval")
    model = build_model_for(cfg, data.meta)
    ck.export_weights(tmp_path / "w.safetensors", model.state_dict())

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                [torch.nn.Linear(784, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 10)]
            )

        def forward(self, x):
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < len(self.layers) - 1:
                    x = torch.relu(x)
            return x

    net = Net()
    net.load_state_dict(st_torch.load_file(str(tmp_path / "w.safetensors")), strict=True)
    x = data.arrays["x"][:8]
    ours = model.forward({"x": x})["logits"]
    theirs = net(torch.from_numpy(np.ascontiguousarray(x))).detach().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


async def test_a_world_4_zero2_checkpoint_resumes_on_2_ranks_zero1(tmp_path):
    """Reshard 4 -> 2 (and zero2 -> zero1) mid-run: the result matches an uninterrupted
    world-1 run within 1e-5."""
    base = [
        "model.hidden=[24]",
        "data.n_train=512",
        "data.n_eval=64",
        "train.batch_size=48",
        "optimizer.lr=0.01",
    ]
    cfg1 = load_config("mlp_classifier", base)
    data = load_dataset(cfg1.data, "train")

    async def train(cfg, world, steps, first=0, loaded=None):
        members = [LocalCollective()] if world == 1 else InProcessGroup(world).members
        ranks = [RankStep(build_model_for(cfg, data.meta), cfg, m) for m in members]
        if loaded is not None:
            manifest, full = loaded
            params = full.pop("params")
            for rs in ranks:
                rs.load_full(params, dict(full), manifest["counters"])

        async def one(r):
            for s in range(first, first + steps):
                await ranks[r].step(s, rank_batches(data, cfg, s, r, world))

        async with trio.open_nursery() as nursery:
            for r in range(world):
                nursery.start_soon(one, r)
        return ranks

    ref = await train(cfg1, 1, 6)
    cfg4 = load_config("mlp_classifier", base + ["cluster.ranks=4", "cluster.mode=zero2"])
    four = await train(cfg4, 4, 3)
    shards = [(rs.lo, rs.hi, rs.shard_tensors()) for rs in four]
    path = ck.save_checkpoint(
        tmp_path, 3, shards, four[0].n, {"mode": "zero2", "counters": four[0].opt.counters()}
    )
    cfg2 = load_config("mlp_classifier", base + ["cluster.ranks=2", "cluster.mode=zero1"])
    two = await train(cfg2, 2, 3, first=3, loaded=ck.load_full(path))
    a, b = two[0].model.params, ref[0].model.params
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5
    assert two[0].opt.steps_applied == 6
