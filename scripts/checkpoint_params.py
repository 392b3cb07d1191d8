"""Every named parameter of a zerotrain checkpoint, read with the manifest's layout table.

An outside tool's view: this script imports nothing of zerotrain -- only json, numpy and
the safetensors file format (an 8-byte little-endian header length, a JSON header, the
raw tensor bytes) -- and relies on nothing but what manifest.json says: its "shards"
(files) and its "layout" table (pipelines/store/checkpoint.py documents both).

    python scripts/checkpoint_params.py RUN_DIR/checkpoints/step-00000020
        prints one JSON line per parameter: name, shape, sha256 of its float32 bytes
    python scripts/checkpoint_params.py CKPT --vector exp_avg --out adam_m.npz
        the same for an optimizer vector, saved as an .npz (no pickle)

As a module: `read_params(ckpt_dir, vector="params") -> {name: array}`.
"""

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np

_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I64": "<i8", "I32": "<i4"}


def read_safetensors(path) -> dict:
    """{name: array} of a safetensors file (copies, little-endian)."""
    data = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + size :]
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        arr = np.frombuffer(body[begin:end], dtype=_DTYPES[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def read_params(ckpt, vector: str = "params") -> dict:
    """{parameter name: array of its shape} for one flat vector of checkpoint `ckpt`."""
    ckpt = Path(ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    table = manifest.get("layout")
    if not table:
        raise SystemExit(f"{ckpt}: manifest.json has no layout table")
    files = {s["rank"]: s["file"] for s in manifest["shards"]}
    flat = {p["name"]: np.full(p["length"], np.nan, dtype=np.float32) for p in table["params"]}
    for shard in table["shards"]:
        tensors = read_safetensors(ckpt / files[shard["rank"]])
        part = tensors[vector]
        if part.shape != (shard["hi"] - shard["lo"],):
            raise SystemExit(f"{files[shard['rank']]}: {vector} does not fit its shard")
        for piece in shard["pieces"]:
            length = piece["stop"] - piece["start"]
            at = piece["at"]
            flat[piece["name"]][piece["start"] : piece["stop"]] = part[at : at + length]
    return {
        p["name"]: flat[p["name"]].reshape(p["shape"], order=table["order"])
        for p in table["params"]
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint directory (holds manifest.json)")
    parser.add_argument("--vector", default="params", help="params, exp_avg, exp_avg_sq, ...")
    parser.add_argument("--out", help="also save the parameters to this .npz file")
    args = parser.parse_args(argv)
    params = read_params(args.checkpoint, args.vector)
    for name, arr in params.items():
        digest = hashlib.sha256(np.ascontiguousarray(arr, dtype="<f4").tobytes()).hexdigest()
        print(json.dumps({"name": name, "shape": list(arr.shape), "sha256": digest}))
    if args.out:
        np.savez(args.out, **params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
