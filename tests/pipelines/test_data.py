"""Datasets and the pure batch function."""

import numpy as np
import pytest

from pipelines.config import DataConfig
from pipelines.data import (
    VOCAB,
    batch_for,
    batch_indices,
    decode,
    encode,
    load_corpus_text,
    load_dataset,
    position,
)


def small(name, **opts):
    sizes = {"n_train": 400, "n_eval": 100} if name != "corpus" else {}
    return DataConfig(name=name, options={**sizes, **opts})


@pytest.fixture(scope="module")
def digits():
    return load_dataset(small("digits"), "train")


def test_the_same_arguments_give_the_same_batch(digits):
    a = batch_for(digits, 7, 1, 2, 0, 1, 32)
    b = batch_for(digits, 7, 1, 2, 0, 1, 32)
    assert a.keys() == {"x", "y"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("world, accum", [(2, 1), (4, 1), (4, 2), (3, 1)])
def test_rank_slices_partition_the_world_one_batch(world, accum):
    n, seed, epoch, step, batch = 1000, 3, 2, 5, 48
    whole = batch_indices(n, seed, epoch, step, 0, 1, batch)
    parts = [
        batch_indices(n, seed, epoch, step, r, world, batch, micro=k, accum=accum)
        for k in range(accum)
        for r in range(world)
    ]
    assert all(p.size == batch // (world * accum) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_each_epoch_is_a_different_permutation_covering_every_sample():
    n, batch = 96, 16
    for epoch in (0, 1):
        seen = np.concatenate([batch_indices(n, 0, epoch, s, 0, 1, batch) for s in range(6)])
        assert sorted(seen) == list(range(n))
    e0 = batch_indices(n, 0, 0, 0, 0, 1, batch)
    e1 = batch_indices(n, 0, 1, 0, 0, 1, batch)
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, batch_indices(n, 1, 0, 0, 0, 1, batch))  # seed matters


def test_position_maps_a_global_step_to_epoch_and_step():
    assert position(0, 100, 30) == (0, 0)
    assert position(2, 100, 30) == (0, 2)
    assert position(3, 100, 30) == (1, 0)  # the partial tail of 10 samples is dropped
    with pytest.raises(ValueError, match="batch_size"):
        position(0, 10, 30)


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="multiple of world"):
        batch_indices(100, 0, 0, 0, 0, 3, 32)


def test_the_corpus_ships_with_the_package_and_round_trips_through_the_vocab():
    text = load_corpus_text()
    assert 300_000 < len(text) < 1_200_000
    assert set(text) <= set(VOCAB) and len(VOCAB) == 96
    assert decode(encode(text[:500])) == text[:500]
    with pytest.raises(ValueError, match="VOCAB"):
        encode("caf\u00e9")


def test_corpus_batches_are_next_character_pairs_and_eval_is_held_out():
    cfg = small("corpus", seq_len=16)
    train, held = load_dataset(cfg, "train"), load_dataset(cfg, "eval")
    b = batch_for(train, 0, 0, 0, 0, 1, 8)
    assert b["x"].shape == b["y"].shape == (8, 16) and b["x"].dtype == np.int64
    np.testing.assert_array_equal(b["x"][:, 1:], b["y"][:, :-1])
    n = len(load_corpus_text())
    assert len(train) + len(held) + 32 == n
    assert 0.04 < (len(held) + 16) / n < 0.06
    # held out: the eval tokens are the corpus's tail, the train tokens all before it
    tokens = encode(load_corpus_text())
    train_tokens, held_tokens = train.arrays["tokens"], held.arrays["tokens"]
    np.testing.assert_array_equal(train_tokens, tokens[: len(train_tokens)])
    np.testing.assert_array_equal(held_tokens, tokens[len(train_tokens) :])


def test_digits_are_deterministic_images_of_all_ten_classes(digits):
    again = load_dataset(small("digits"), "train")
    np.testing.assert_array_equal(digits.arrays["x"], again.arrays["x"])
    x, y = digits.arrays["x"], digits.arrays["y"]
    assert x.shape == (400, 784) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == set(range(10))
    held = load_dataset(small("digits"), "eval")
    assert not np.array_equal(held.arrays["x"][:10], x[:10])
    # the classes are told apart by their mean images, not all alike
    means = np.stack([x[y == k].mean(0) for k in range(10)])
    assert np.linalg.matrix_rank(means) == 10


def test_friedman_targets_are_standardised():
    ds = load_dataset(small("friedman", n_train=4000), "train")
    y = ds.arrays["y"]
    assert y.shape == (4000, 1) and abs(float(y.mean())) < 0.1 and 0.9 < y.std() < 1.15


def test_triplets_pair_an_anchor_with_its_class_and_a_negative_from_another():
    ds = load_dataset(small("digit_triplets"), "train")
    rows, labels = ds.arrays["triplets"], ds.arrays["labels"]
    assert (labels[rows[:, 0]] == labels[rows[:, 1]]).all()
    assert (labels[rows[:, 0]] != labels[rows[:, 2]]).all()
    assert (rows[:, 0] != rows[:, 1]).all()
    b = batch_for(ds, 0, 0, 0, 0, 1, 8)
    assert b.keys() == {"anchor", "positive", "negative"} and b["anchor"].shape == (8, 784)


def test_a_cached_dataset_is_memory_mapped_and_identical(tmp_path):
    mem = load_dataset(small("digits"), "train")
    cfg = DataConfig(
        name="digits", cache_dir=str(tmp_path), options={"n_train": 400, "n_eval": 100}
    )
    first = load_dataset(cfg, "train")
    second = load_dataset(cfg, "train")
    assert isinstance(second.arrays["x"], np.memmap)
    np.testing.assert_array_equal(np.asarray(second.arrays["x"]), mem.arrays["x"])
    np.testing.assert_array_equal(
        batch_for(first, 0, 0, 1, 1, 2, 32)["x"], batch_for(mem, 0, 0, 1, 1, 2, 32)["x"]
    )
    assert not list(tmp_path.rglob("*.tmp-*"))
