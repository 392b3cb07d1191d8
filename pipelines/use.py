"""Using what was trained -- generate, predict, eval -- and checking data before a run.

    zerotrain generate RUN_DIR [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K]
                       [--seed S]
    zerotrain predict RUN_DIR INPUT [--out FILE.csv|FILE.jsonl]
    zerotrain eval RUN_DIR [--data PATH]
    zerotrain check-model PATH.py:NAME [--batch B] [--set KEY=VALUE ...]

A run directory holds what these need: config.json (the model), weights.safetensors (its
final weights) and data.json (the tokenizer and vocabulary, the classes, the feature
names and standardisation the model was trained with), so a prediction reads its input
exactly as training read its data.

`check_data` runs before any rank starts: a file dataset is read, checked and prepared
once (the ranks then map the prepared arrays), and a `--resume` whose data files changed
since the run is refused, naming the file, unless the change is allowed.

Every mistake is a `UsageError` of one line (the CLI prints it and exits 2).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from .cliargs import int_at_least
from .config import FILE_DATASETS, Config, from_resolved
from .data import DataError, file_identity

__all__ = ["COMMANDS", "Trained", "UsageError", "add_commands", "check_data", "load_run"]


class UsageError(ValueError):
    """Bad input to a command; `str(err)` is one line fit to print as it is."""


# ---------------------------------------------------------------------------------------
# Before a run: the data is usable, and unchanged when resuming
# ---------------------------------------------------------------------------------------


def check_data(cfg: Config, *, resume: Path | None = None, allow_change: bool = False) -> None:
    """Read, check and prepare a file dataset's splits (built-in datasets pass); DataError
    (one line, naming the file) for anything a run would have to guess about.

    With `resume`, the files recorded in that run's data.json must be unchanged (size and
    SHA-256) unless `allow_change`.
    """
    file_model = cfg.model.name.startswith("file:")
    if cfg.data.name not in FILE_DATASETS and not file_model:
        return
    from .data import load_dataset, with_default_cache

    data_cfg = with_default_cache(cfg.data)
    train = load_dataset(data_cfg, "train")
    load_dataset(data_cfg, "eval")
    if resume is not None and not allow_change and cfg.data.name in FILE_DATASETS:
        # a followed directory grows by design: only the recorded files must be unchanged
        growing = bool(cfg.data.options.get("follow"))
        _check_unchanged(resume, train.meta.get("files", []), allow_added=growing)
    if file_model:
        _check_file_model(cfg, train)


def _check_file_model(cfg: Config, train) -> None:
    """The file model builds and takes two samples of the data (UsageError otherwise)."""
    from .core import TrainingFailed, build_model_for

    try:
        model = build_model_for(cfg, train.meta)
    except TrainingFailed as err:
        raise UsageError(str(err)) from None
    batch = train.take(np.arange(2))
    try:
        model.compute_gradients(batch)
    except (KeyError, ValueError, TypeError, IndexError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(
            f"{cfg.model.name[5:]}: does not take the data's batch (keys "
            f"{', '.join(sorted(batch))}): {type(err).__name__}: {msg}"
        ) from None


def _check_unchanged(resume: Path, current: list[dict], allow_added: bool = False) -> None:
    record = None
    for where in (resume, resume.parent):
        if (where / "data.json").is_file():
            record = json.loads((where / "data.json").read_text())
            break
    if record is None:
        return  # a run from before data was recorded: nothing to compare
    before = record.get("meta", {}).get("files", [])
    now = {f["path"]: f for f in current}
    for old in before:
        path = old["path"]
        if path not in now:
            raise DataError(
                f"--resume: data file {path} of the run is no longer among data.path's "
                "files (pass --allow-data-change to resume anyway)"
            )
        new = file_identity(Path(path))
        if (new["size"], new["sha256"]) != (old["size"], old["sha256"]):
            raise DataError(
                f"--resume: data file {path} changed since the run (size {old['size']} -> "
                f"{new['size']}, sha256 {old['sha256'][:12]} -> {new['sha256'][:12]}); pass "
                "--allow-data-change to resume anyway"
            )
    added = sorted(set(now) - {f["path"] for f in before})
    if added and not allow_added:
        raise DataError(
            f"--resume: data file {added[0]} was not among the run's files (pass "
            "--allow-data-change to resume anyway)"
        )


# ---------------------------------------------------------------------------------------
# A trained run
# ---------------------------------------------------------------------------------------


class Trained:
    """A finished run's config, data record and model with its final weights."""

    def __init__(self, run_dir: Path, cfg: Config, meta: dict, model):
        self.run_dir, self.cfg, self.meta, self.model = run_dir, cfg, meta, model


def load_run(run_dir: str | Path) -> Trained:
    from .core import TrainingFailed, build_model_for
    from .store.checkpoint import read_safetensors_file

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"{run_dir}: not a run directory (no config.json)")
    weights = run_dir / "weights.safetensors"
    if not weights.is_file():
        raise UsageError(f"{run_dir}: no weights.safetensors (the run did not finish)")
    cfg = from_resolved(json.loads((run_dir / "config.json").read_text())["config"])
    if (run_dir / "data.json").is_file():
        meta = json.loads((run_dir / "data.json").read_text())["meta"]
    else:  # a built-in dataset: its meta is a function of the config
        from .data import load_dataset, with_default_cache

        meta = load_dataset(with_default_cache(cfg.data), "train").meta
    try:
        model = build_model_for(cfg, meta)
    except TrainingFailed as err:
        raise UsageError(f"{run_dir}: {err}") from None
    tensors, _ = read_safetensors_file(weights)
    try:
        model.load_state_dict({k: v.astype(model.dtype) for k, v in tensors.items()})
    except ValueError as err:
        raise UsageError(f"{weights}: {err}") from None
    return Trained(run_dir, cfg, meta, model)


def _kind(trained: Trained) -> str:
    from .metrics import model_kind

    return model_kind(trained.model)


# ---------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------


def _tokenizer(meta: dict):
    """(encode str -> ids, decode ids -> str) of a language run's data."""
    tok = meta.get("tokenizer")
    if tok == "bytes":
        return (
            lambda s: np.frombuffer(s.encode("utf-8"), np.uint8).astype(np.int64),
            lambda ids: bytes(int(i) for i in ids).decode("utf-8", errors="replace"),
        )
    if tok == "chars":
        from .data import chars_decode, chars_encode

        vocab = meta["vocab"]
        return (lambda s: chars_encode(s, vocab, "--prompt"), lambda ids: chars_decode(ids, vocab))
    from .data import decode, encode

    def enc(s):
        try:
            return encode(s)
        except ValueError as err:
            raise UsageError(f"--prompt: {err}") from None

    return enc, decode


def sample(model, ids: list[int], tokens: int, temperature=1.0, top_k=0, seed=0) -> list[int]:
    """`ids` followed by `tokens` sampled ids: token i is drawn with the i-th uniform of
    default_rng(seed) from softmax(logits / temperature) over the top_k likeliest (0 =
    all), the logits of the last model.seq_len ids; temperature 0 takes the likeliest."""
    ids = list(ids)
    rng = np.random.default_rng(seed)
    seq_len = model.seq_len
    for _ in range(tokens):
        ctx = np.asarray(ids[-seq_len:], np.int64)[None, :]
        logits = model.forward({"x": ctx})["logits"][0, -1].astype(np.float64)
        u = rng.random()
        if temperature == 0:
            ids.append(int(np.argmax(logits)))
            continue
        if top_k and top_k < logits.size:
            cut = np.partition(logits, -top_k)[-top_k]
            logits = np.where(logits >= cut, logits, -np.inf)
        p = np.exp((logits - logits.max()) / temperature)
        cdf = np.cumsum(p / p.sum())
        ids.append(int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), logits.size - 1)))
    return ids


def generate(
    trained: Trained,
    prompt: str = "",
    tokens: int = 200,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> str:
    """`tokens` tokens sampled after `prompt` (the prompt included in the result).

    Deterministic for a seed (see `sample`).
    """
    if _kind(trained) != "language":
        raise UsageError(
            f"generate: {trained.run_dir} trained {trained.cfg.model.name!r}, not a language "
            "model (char_transformer)"
        )
    model, meta = trained.model, trained.meta
    encode, decode = _tokenizer(meta)
    try:
        ids = list(encode(prompt)) if prompt else []
    except DataError as err:
        raise UsageError(str(err)) from None
    if not ids:  # start from a newline when the vocabulary has one
        start = encode("\n") if meta.get("tokenizer") != "chars" or "\n" in meta["vocab"] else [0]
        ids = [int(start[0])]
        prompt_len = 0
    else:
        prompt_len = len(ids)
    ids = sample(model, ids, tokens, temperature, top_k, seed)
    out = ids if prompt_len else ids[1:]
    return decode(out)


# ---------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------


def _table_input(trained: Trained, path: Path) -> np.ndarray:
    """The feature matrix of a table in the training format (float32, standardised)."""
    from .data import check_finite, read_features

    meta = trained.meta
    if path.suffix.lower() == ".npy":
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.ndim == 2 and arr.shape[1] == meta["n_features"]:
            x = arr  # features only
        else:
            x = read_features(path, meta["columns"], meta["target"], False)[0]
    else:
        x = read_features(path, meta["columns"], meta["target"], False)[0]
    if int(np.prod(x.shape[1:])) != meta["n_features"]:
        raise DataError(
            f"{path}: {int(np.prod(x.shape[1:]))} features per row, the model takes "
            f"{meta['n_features']}"
        )
    check_finite(path, x)
    x = np.asarray(x[:], np.float32).reshape(x.shape[0], -1)
    std = meta.get("standardize")
    if std:
        x = (x - np.asarray(std["mean"], np.float32)) / np.asarray(std["std"], np.float32)
    return x


def predict(trained: Trained, path: Path, batch_size: int = 1024) -> list[dict]:
    """One record per input row: {"row", "label", "probabilities": {class: p}} for a
    classifier, {"row", "value"} for a regressor."""
    kind = _kind(trained)
    if kind not in ("classifier", "regression"):
        raise UsageError(
            f"predict: {trained.run_dir} trained {trained.cfg.model.name!r}; predict takes a "
            "classifier or regressor run (a language model: use generate)"
        )
    x = _table_input(trained, path)
    classes = trained.meta.get("classes") or list(range(trained.meta.get("n_classes", 0)))
    records = []
    for lo in range(0, x.shape[0], batch_size):
        out = trained.model.forward({"x": x[lo : lo + batch_size]})
        if kind == "classifier":
            z = out["logits"].astype(np.float64)
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            for i, row in enumerate(p):
                records.append(
                    {
                        "row": lo + i,
                        "label": classes[int(np.argmax(row))],
                        "probabilities": {
                            str(c): float(v) for c, v in zip(classes, row, strict=True)
                        },
                    }
                )
        else:
            for i, v in enumerate(out["predictions"].reshape(len(out["predictions"]), -1)):
                records.append({"row": lo + i, "value": float(v[0])})
    return records


def write_predictions(records: list[dict], out, fmt: str) -> None:
    if fmt == "jsonl":
        for r in records:
            out.write(json.dumps(r) + "\n")
        return
    w = csv.writer(out)
    if records and "probabilities" in records[0]:
        classes = list(records[0]["probabilities"])
        w.writerow(["row", "label", *(f"p_{c}" for c in classes)])
        for r in records:
            w.writerow([r["row"], r["label"], *(f"{r['probabilities'][c]:.6g}" for c in classes)])
    else:
        w.writerow(["row", "value"])
        for r in records:
            w.writerow([r["row"], f"{r['value']:.8g}"])


# ---------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------


def eval_dataset(trained: Trained, path: Path | None):
    """The data `eval` scores: the run's own held-out split, or the file at `path` read
    with the run's tokenizer / columns, classes and standardisation."""
    from .data import load_dataset, with_default_cache

    cfg, meta = trained.cfg, trained.meta
    if path is None:
        return load_dataset(with_default_cache(cfg.data), cfg.eval.split)
    kind = _kind(trained)
    if kind == "language":
        from .data import TextWindows, check_utf8, encode_files, map_bytes

        check_utf8(path)
        tok = meta.get("tokenizer")
        if tok == "chars":
            tokens = encode_files([path], meta["vocab"], np.uint32)
        elif tok == "bytes":
            tokens = map_bytes(path)
        else:
            from .data import encode

            try:
                tokens = encode(path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise DataError(f"{path}: {err}") from None
        seq_len = trained.model.seq_len
        if len(tokens) <= seq_len:
            raise DataError(f"{path}: {len(tokens)} tokens; a sample needs {seq_len + 1}")
        return TextWindows("eval", tokens, seq_len, meta)
    if kind in ("classifier", "regression") and "columns" in meta:
        from .data import TableDataset, class_ids, read_features, regression_target

        x, raw, _, target = read_features(path, meta["columns"], meta["target"], True)
        if meta["task"] == "classification":
            y = class_ids(path, raw, target, meta["classes"])
        else:
            y = regression_target(path, raw, target)
        return TableDataset("eval", x, np.asarray(y), np.arange(x.shape[0]), meta)
    raise UsageError(
        f"eval --data: {trained.run_dir} trained on the built-in {cfg.data.name!r} data; "
        "--data takes a run trained on a table or text"
    )


def evaluate_run(trained: Trained, path: Path | None) -> dict:
    from .config import loss_spec
    from .metrics import evaluate

    ds = eval_dataset(trained, path)
    cfg = trained.cfg
    return evaluate(
        trained.model,
        ds,
        metrics=cfg.eval.metrics,
        batch_size=cfg.eval.batch_size,
        loss_fn=loss_spec(cfg.loss),
    )


# ---------------------------------------------------------------------------------------
# check-model
# ---------------------------------------------------------------------------------------

# Sizes offered to a model under check (it takes those it accepts; --set overrides).
_CHECK_SIZES = {"in_dim": 6, "n_classes": 3, "vocab": 11, "seq_len": 8}


def _example_batch(model, rng, b: int) -> dict:
    """A batch the model takes: its own example_batch(rng, b) when it has one, else
    tokens (a `vocab`) or features (an `in_dim`) with the first targets it accepts."""
    if hasattr(model, "example_batch"):
        return model.example_batch(rng, b)
    if hasattr(model, "vocab"):
        t = min(getattr(model, "seq_len", 8), 8)
        return {
            "x": rng.integers(0, model.vocab, (b, t)),
            "y": rng.integers(0, model.vocab, (b, t)),
        }
    if hasattr(model, "in_dim"):
        x = rng.normal(size=(b, model.in_dim))
        out = getattr(model, "out_dim", 1)
        for y in (rng.integers(0, 2, b), rng.normal(size=(b, out))):
            try:
                model.evaluate({"x": x, "y": y}, lambda o, bt, g=None, s=1.0: 0.0)
                return {"x": x, "y": y}
            except (ValueError, KeyError, IndexError):
                continue
    raise UsageError(
        f"check-model: cannot make a batch for {model.name}; give it a method "
        "example_batch(rng, batch_size) returning one"
    )


def check_model(spec: str, batch: int = 4, options: dict | None = None, per_tensor=5):
    """[(parameter name, worst relative error, passed)] of a central-difference check of
    the model's backward (float64, numpy backend, pipelines.model.testing's probe loss)."""
    from .model import ModelFileError, build_file_model
    from .model.testing import close_enough, probe_loss

    offered = {**_CHECK_SIZES, "seed": 0, "backend": "numpy", "dtype": "float64"}
    try:
        model = build_file_model(spec, dict(options or {}), offered)
    except (ModelFileError, ValueError) as err:
        raise UsageError(str(err).splitlines()[0]) from None
    if model.dtype != np.float64:
        raise UsageError(
            f"check-model: {spec} built a {model.dtype.name} model; pass its backend and "
            "dtype keywords on to _setup so it can be built in float64"
        )
    rng = np.random.default_rng(0)
    data = _example_batch(model, rng, batch)
    loss = probe_loss()
    _, grads = model.compute_gradients(data, loss)
    g, p0 = grads.copy(), model.params.copy()
    eps, rows = 1e-6, []
    try:
        for slot in model.layout:
            if not slot.trainable:
                continue
            size = int(np.prod(slot.shape))
            worst, ok = 0.0, True
            for i in rng.choice(size, size=min(per_tensor, size), replace=False):
                values = []
                for sign in (1.0, -1.0):
                    model.params[...] = p0
                    model.params[slot.offset + i] += sign * eps
                    values.append(model.compute_gradients(data, loss)[0])
                numeric, analytic = (values[0] - values[1]) / (2 * eps), g[slot.offset + i]
                scale = max(abs(numeric), abs(analytic), 1e-12)
                worst = max(worst, abs(numeric - analytic) / scale)
                ok &= close_enough(numeric, analytic)
            rows.append((slot.name, worst, bool(ok)))
    finally:
        model.params[...] = p0
    return rows


# ---------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise _arg_error(f"expected a number >= 0, got {text!r}")
    return value


_nonneg_int = int_at_least(0)


def _arg_error(msg):
    import argparse

    return argparse.ArgumentTypeError(msg)


def add_commands(sub) -> None:
    """Add generate, predict and eval to the CLI's subparsers."""
    g = sub.add_parser("generate", help="sample text from a trained language model")
    g.add_argument("run_dir", help="a finished run of a character LM")
    g.add_argument("--prompt", default="", help="text to continue (default: a new line)")
    g.add_argument("--tokens", type=_nonneg_int, default=200, help="tokens to sample")
    g.add_argument("--temperature", type=_nonneg_float, default=1.0, help="0 = most likely")
    g.add_argument("--top-k", type=_nonneg_int, default=0, help="sample among the k likeliest")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="sampling seed")
    p = sub.add_parser("predict", help="labels or values for a table, from a trained model")
    p.add_argument("run_dir", help="a finished classifier or regressor run")
    p.add_argument("input", help="a table in the training format (CSV/TSV, .npy, ...)")
    p.add_argument("--out", help="FILE.csv or FILE.jsonl (default: CSV on stdout)")
    e = sub.add_parser("eval", help="the configured metrics of a trained run on a data set")
    e.add_argument("run_dir", help="a finished run")
    e.add_argument("--data", help="a file in the training format (default: the run's eval)")
    c = sub.add_parser("check-model", help="finite-difference check of a model file's backward")
    c.add_argument("spec", metavar="PATH.py:NAME", help="a Model subclass or a function")
    c.add_argument("--batch", type=_nonneg_int, default=4, help="samples in the check batch")
    c.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword argument of the model (repeatable; TOML values)",
    )


def _cmd_generate(args, out) -> int:
    text = generate(
        load_run(args.run_dir),
        args.prompt,
        args.tokens,
        args.temperature,
        args.top_k,
        args.seed,
    )
    out.write(text + ("" if text.endswith("\n") else "\n"))
    return 0


def _cmd_predict(args, out) -> int:
    trained = load_run(args.run_dir)
    path = Path(args.input)
    if not path.is_file():
        raise UsageError(f"zerotrain predict: no such file {args.input!r}")
    records = predict(trained, path)
    if args.out:
        target = Path(args.out)
        fmt = {".csv": "csv", ".jsonl": "jsonl"}.get(target.suffix.lower())
        if fmt is None:
            raise UsageError(
                f"zerotrain predict --out: expected a .csv or .jsonl file, got {args.out!r}"
            )
        with open(target, "w", newline="") as f:
            write_predictions(records, f, fmt)
        print(f"wrote {len(records)} predictions to {target}", file=sys.stderr)
    else:
        write_predictions(records, out, "csv")
    return 0


def _cmd_eval(args, out) -> int:
    trained = load_run(args.run_dir)
    path = None
    if args.data:
        path = Path(args.data)
        if not path.is_file():
            raise UsageError(f"zerotrain eval --data: no such file {args.data!r}")
    out.write(json.dumps(evaluate_run(trained, path), sort_keys=True) + "\n")
    return 0


def _cmd_check_model(args, out) -> int:
    from .config import ConfigError, parse_override

    options = {}
    for text in args.options:
        try:
            parts, value = parse_override(text)
        except ConfigError as err:
            raise UsageError(f"zerotrain check-model: {err}") from None
        options[".".join(parts)] = value
    rows = check_model(args.spec, max(args.batch, 1), options)
    width = max([len(r[0]) for r in rows] + [9])
    out.write(f"{'parameter':<{width}}  {'worst rel. error':>16}  result\n")
    for name, worst, ok in rows:
        out.write(f"{name:<{width}}  {worst:>16.3e}  {'pass' if ok else 'FAIL'}\n")
    failed = sum(not ok for _, _, ok in rows)
    out.write(f"{len(rows) - failed} of {len(rows)} parameters pass\n")
    return 1 if failed else 0


COMMANDS = {
    "generate": _cmd_generate,
    "predict": _cmd_predict,
    "eval": _cmd_eval,
    "check-model": _cmd_check_model,
}
