"""The flat buffers: layout, views, state dicts, gradient-ready ranges, tied weights, LoRA."""

import numpy as np
import pytest

from pipelines.model import build_model

LM = {"vocab": 11, "d_model": 8, "n_head": 2, "n_layer": 2, "seq_len": 6}
LORA = {"rank": 2, "alpha": 4, "targets": ["attn.qkv", "attn.proj"]}


def lm_batch(b=3, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 11, size=(b, 7))
    return {"x": tokens[:, :-1].copy(), "y": tokens[:, 1:].copy()}


def test_the_layout_tiles_the_buffer_in_named_parameters_order():
    model = build_model("char_transformer", **LM)
    end = 0
    for slot in model.layout:
        assert slot.trainable and slot.offset == end
        end += int(np.prod(slot.shape))
    assert end == model.params.size == model.grads.size == model.num_parameters()
    assert [s.name for s in model.layout] == [n for n, _ in model.named_parameters()]
    assert model.layout[0].name == "tok_emb.weight" and model.layout[-1].name == "ln_f.bias"
    names = {s.name: s.shape for s in model.layout}
    assert names["blocks.1.attn.qkv.weight"] == (24, 8)
    assert names["blocks.0.mlp.fc.weight"] == (32, 8)


def test_parameters_are_views_of_the_flat_buffer():
    model = build_model("mlp_classifier", in_dim=3, n_classes=2, hidden=[4])
    views = dict(model.named_parameters())
    model.params[:] = np.arange(model.params.size)
    assert views["layers.0.weight"][0, 1] == 1.0
    views["layers.1.bias"][:] = -5.0
    assert np.all(model.params[-2:] == -5.0)
    assert all(np.shares_memory(v, model.params) for v in views.values())


def test_state_dict_round_trips_and_holds_copies():
    a = build_model("char_transformer", **LM, seed=1)
    b = build_model("char_transformer", **LM, seed=2)
    sd = a.state_dict()
    assert not any(np.shares_memory(v, a.params) for v in sd.values())
    b.load_state_dict(sd)
    assert b.params.tobytes() == a.params.tobytes()


def test_load_state_dict_rejects_a_bad_dict_in_one_line_and_writes_nothing(raises_one_line):
    model = build_model("mlp_classifier", in_dim=3, n_classes=2, hidden=[4])
    before = model.params.copy()
    sd = model.state_dict()
    sd["layers.0.weight"] = sd["layers.0.weight"] + 1  # would change the model if written
    missing = {k: v for k, v in sd.items() if k != "layers.1.bias"}
    with raises_one_line(ValueError, match=r"missing key 'layers.1.bias' \(shape \(2,\)\)"):
        model.load_state_dict(missing)
    with raises_one_line(ValueError, match="unexpected key 'head.weight'"):
        model.load_state_dict({**sd, "head.weight": np.zeros(1, np.float32)})
    with pytest.raises(
        ValueError, match=r"'layers.1.weight' has shape \(4, 2\), expected \(2, 4\)"
    ):
        model.load_state_dict({**sd, "layers.1.weight": np.zeros((4, 2), np.float32)})
    with raises_one_line(ValueError, match="'layers.1.bias' has dtype float64, expected float32"):
        model.load_state_dict({**sd, "layers.1.bias": np.zeros(2)})
    assert np.array_equal(model.params, before)


def test_grad_ready_ranges_cover_the_buffer_exactly_once_from_the_end():
    model = build_model("char_transformer", **LM)
    ranges, seen = [], []

    def grad_ready(start, stop):
        ranges.append((start, stop))
        seen.append(model.grads[start:stop].copy())

    _, grads = model.compute_gradients(lm_batch(), grad_ready=grad_ready)
    assert ranges[0][1] == model.grads.size and ranges[-1][0] == 0
    assert all(a[0] == b[1] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(start < stop for start, stop in ranges)
    # every range was already final when reported
    for (start, stop), values in zip(ranges, seen, strict=True):
        assert np.array_equal(values, grads[start:stop])


def test_the_tied_embedding_finishes_last_and_gets_both_uses_gradients():
    model = build_model("char_transformer", **LM, backend="numpy", dtype="float64")
    ranges = []
    batch = lm_batch()
    _, grads = model.compute_gradients(batch, grad_ready=lambda a, b: ranges.append((a, b)))
    tok = model.layout[0]
    assert tok.name == "tok_emb.weight" and ranges[-1][0] == 0
    assert ranges[-1][1] <= model.layout[1].offset  # reported after pos_emb's range
    g = grads[: int(np.prod(tok.shape))].copy()
    # the head's share alone: dlogits^T h_final; the rest is the input embedding's share
    logits = model._forward(model._eval_pass, model._prepare(batch, True))["logits"]
    h = model._h.copy()
    dlogits = {"logits": np.zeros_like(logits)}
    model._resolve_loss(None)({"logits": logits}, model._prepare(batch, True), dlogits)
    head_share = (dlogits["logits"].T @ h).reshape(-1)
    assert np.abs(head_share).max() > 1e-6 and np.abs(g - head_share).max() > 1e-6
    # and the sum is the true derivative, element by element
    p0 = model.params.copy()
    eps = 1e-6
    for i in range(g.size):
        values = []
        for sign in (1, -1):
            model.params[...] = p0
            model.params[i] += sign * eps
            values.append(model.evaluate(batch)["loss"])
        assert abs((values[0] - values[1]) / (2 * eps) - g[i]) < 1e-7 + 1e-5 * abs(g[i])
    model.params[...] = p0


def test_lora_trains_only_the_adapters_and_keeps_the_base_out_of_params():
    plain = build_model("char_transformer", **LM, seed=5)
    model = build_model("char_transformer", **LM, seed=5, lora=LORA)
    trainable = [s.name for s in model.layout if s.trainable]
    assert trainable == [
        f"blocks.{i}.attn.{m}.lora_{ab}.weight"
        for i in range(2)
        for m in ("qkv", "proj")
        for ab in "AB"
    ]
    assert model.params.size == sum(int(np.prod(s.shape)) for s in model.layout if s.trainable)
    assert model.frozen.size == plain.params.size
    assert not any(np.shares_memory(model.frozen, v) for v in [model.params, model.grads])
    # the base weights are the plain model's bits, and the adapted model starts equal to it
    sd = model.state_dict()
    for name, value in plain.state_dict().items():
        assert np.array_equal(sd[name], value)
    batch = lm_batch()
    assert model.evaluate(batch)["loss"] == plain.evaluate(batch)["loss"]
    frozen_before = model.frozen.copy()
    _, grads = model.compute_gradients(batch)
    assert grads.size == model.params.size and np.array_equal(model.frozen, frozen_before)
    b_grads = [s for s in model.layout if s.name.endswith("lora_B.weight")]
    assert all(grads[s.offset : s.offset + int(np.prod(s.shape))].any() for s in b_grads)


def test_a_lora_target_that_matches_nothing_is_a_one_line_error(raises_one_line):
    with raises_one_line(ValueError, match=r"lora targets \['attn.out'\] match no Linear layer"):
        build_model("char_transformer", **LM, lora={"rank": 2, "targets": ["attn.out"]})
    with raises_one_line(ValueError, match=r"lora: unknown key\(s\) \['r'\]"):
        build_model("char_transformer", **LM, lora={"r": 2, "targets": ["qkv"]})
