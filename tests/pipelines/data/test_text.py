"""data.name = "text": UTF-8 files as tokens -- bytes or the training files' characters."""

import inspect
import mmap
import textwrap

import numpy as np
import pytest

from pipelines.config import DataConfig, load_config
from pipelines.core import build_model_for
from pipelines.data import DataError, load_dataset

# A text file nobody on the project wrote: a standard-library module's source.
SOURCE = inspect.getsourcefile(textwrap)
SOURCE_TEXT = open(SOURCE, encoding="utf-8").read()


def text(path, cache_dir="", **opts):
    return DataConfig(name="text", cache_dir=cache_dir, options={"path": str(path), **opts})


def tokens_of(ds):
    return np.asarray(ds.arrays["tokens"])


def test_bytes_are_the_file_itself_memory_mapped_with_the_tail_held_out():
    cfg = text(SOURCE, eval_fraction=0.1, seq_len=32)
    train, ev = load_dataset(cfg, "train"), load_dataset(cfg, "eval")
    raw = np.frombuffer(SOURCE_TEXT.encode("utf-8"), np.uint8)
    cut = int(raw.size * 0.9)
    np.testing.assert_array_equal(tokens_of(train), raw[:cut])
    np.testing.assert_array_equal(tokens_of(ev), raw[cut:])
    base = train.arrays["tokens"]
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(getattr(base, "obj", base), mmap.mmap)  # the file's map, not a copy
    assert train.meta["vocab_size"] == 256
    b = train.take(np.array([0, 5]))
    assert b["x"].dtype == np.int64 and b["x"].shape == (2, 32)
    np.testing.assert_array_equal(b["y"][:, :-1], b["x"][:, 1:])


def test_chars_vocabulary_is_the_training_files_characters_and_round_trips():
    cfg = text(SOURCE, tokenizer="chars", eval_fraction=0.1, seq_len=32)
    train, ev = load_dataset(cfg, "train"), load_dataset(cfg, "eval")
    vocab = train.meta["vocab"]
    assert vocab == "".join(sorted(set(SOURCE_TEXT)))
    assert train.meta["vocab_size"] == len(vocab)
    decoded = "".join(vocab[i] for i in np.concatenate([tokens_of(train), tokens_of(ev)]))
    assert decoded == SOURCE_TEXT


def test_a_directory_and_a_glob_read_every_file_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second é\n" * 20)
    (tmp_path / "a.txt").write_text("first\n" * 20)
    (tmp_path / ".hidden").write_text("QQQ\n")
    stream = "first\n" * 20 + "second é\n" * 20
    for path in (tmp_path, tmp_path / "*.txt"):
        cfg = text(path, tokenizer="chars", seq_len=8, eval_fraction=0.1)
        train, ev = load_dataset(cfg, "train"), load_dataset(cfg, "eval")
        vocab = train.meta["vocab"]
        assert vocab == "".join(sorted(set(stream)))  # .hidden's Q is skipped
        # the whole stream, a then b: train is its first 90%, eval the rest
        got = [vocab[i] for i in np.concatenate([tokens_of(train), tokens_of(ev)])]
        assert "".join(got) == stream
        assert len(tokens_of(train)) == int(len(stream) * 0.9)


def test_a_cached_multi_file_stream_is_mapped_by_the_next_process(tmp_path):
    (tmp_path / "a.txt").write_text("abc\n" * 40)
    (tmp_path / "b.txt").write_text("xyz\n" * 40)
    cache = str(tmp_path / "cache")
    first = load_dataset(text(tmp_path / "*.txt", cache, seq_len=8, eval_fraction=0.1), "train")
    again = load_dataset(text(tmp_path / "*.txt", cache, seq_len=8, eval_fraction=0.1), "train")
    assert isinstance(again.arrays["tokens"].base, np.memmap)
    # the bytes of a.txt then b.txt, the train share of them
    stream = np.frombuffer(("abc\n" * 40 + "xyz\n" * 40).encode(), np.uint8)
    np.testing.assert_array_equal(tokens_of(first), stream[: len(tokens_of(first))])
    assert len(tokens_of(first)) == int(stream.size * 0.9)
    np.testing.assert_array_equal(tokens_of(first), tokens_of(again))
    # other options, same files and cache: prepared again, not served the bytes' arrays
    chars = load_dataset(text(tmp_path / "*.txt", cache, seq_len=8, tokenizer="chars"), "train")
    assert chars.meta["vocab"] == "\nabcxyz"
    assert tokens_of(chars)[:4].tolist() == [1, 2, 3, 0]


def test_eval_path_is_encoded_with_the_training_vocabulary(tmp_path, raises_one_line):
    (tmp_path / "train.txt").write_text("abcabc\n" * 30)
    (tmp_path / "eval.txt").write_text("cba\n" * 10)
    cfg = text(tmp_path / "train.txt", tokenizer="chars", eval_path=str(tmp_path / "eval.txt"))
    cfg = DataConfig(name="text", options={**cfg.options, "seq_len": 4})
    ev = load_dataset(cfg, "eval")
    assert "".join(ev.meta["vocab"][i] for i in tokens_of(ev)) == "cba\n" * 10
    (tmp_path / "eval.txt").write_text("cba\n" * 3 + "abz\n")
    with raises_one_line(DataError, match=r"eval.txt line 4: character 'z' is not in the voc"):
        load_dataset(cfg, "eval")


def test_the_char_transformer_vocabulary_follows_the_data():
    cfg = load_config(
        "char_lm", ["data.name=text", f'data.path="{SOURCE}"', "data.tokenizer=chars"]
    )
    meta = load_dataset(cfg.data, "train").meta
    model = build_model_for(cfg, meta)
    assert dict(model.named_parameters())["tok_emb.weight"].shape[0] == len(set(SOURCE_TEXT))


def test_text_that_is_not_utf8_says_where(tmp_path, raises_one_line):
    (tmp_path / "t.txt").write_bytes(b"good line\nsecond \xff line\n" + b"x" * 100)
    with raises_one_line(DataError, match=r"t.txt: not UTF-8 at byte 17 \(line 2, byte 8 of"):
        load_dataset(text(tmp_path / "t.txt"), "train")


def test_a_bad_byte_after_the_first_piece_is_located_in_the_whole_file(
    tmp_path, monkeypatch, raises_one_line
):
    from pipelines.data import _text

    monkeypatch.setattr(_text, "_PIECE", 16)
    # two-byte characters straddle the pieces, and so does the bad sequence: its lead
    # byte ends piece 4 (byte 79) and the decoder holds it until piece 5 shows "("
    body = "é" * 20 + "\n" + "ab\n" * 12 + "ab"
    raw = body.encode() + b"\xc3(" + b"tail\n"
    (tmp_path / "t.txt").write_bytes(raw)
    at = len(body.encode())
    assert at == 79
    with raises_one_line(DataError, match=rf"not UTF-8 at byte {at} \(line 14, byte 3 of"):
        load_dataset(text(tmp_path / "t.txt"), "train")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "none.txt", r"no such file or directory .*none.txt"),
        (lambda p: p / "*.md", r"no files match .*\*\.md"),
        (lambda p: (p / "e.txt").write_text("") and None or p / "e.txt", r"e.txt: empty file"),
        (
            lambda p: (p / "s.txt").write_text("tiny") and None or p / "s.txt",
            r"has 3 tokens; a sample needs data.seq_len \+ 1 = 65",
        ),
    ],
    ids=["missing", "glob matches nothing", "empty", "shorter than a sample"],
)
def test_bad_text_sources_are_one_line(tmp_path, make, match, raises_one_line):
    with raises_one_line(DataError, match=match):
        load_dataset(text(make(tmp_path)), "train")
