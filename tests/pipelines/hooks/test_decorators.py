import pytest

from pipelines.hooks import ANALYZER, TRANSFORM, Hook, HookError, analyzer, transform


def test_a_bare_decorator_makes_an_analyzer_sampled_every_step():
    @analyzer
    def probe(ctx):
        """Doc of probe."""
        return {"x": 1.0}

    assert isinstance(probe, Hook)
    assert (probe.kind, probe.name, probe.every, probe.timeout_s) == (ANALYZER, "probe", 1, None)
    assert probe.fn.__doc__ == "Doc of probe."
    assert probe(None) == {"x": 1.0}  # still callable as the function


def test_decorator_arguments_set_name_period_and_timeout():
    @analyzer(every=7, name="renamed", timeout_s=0.5)
    def probe(ctx):
        return None

    assert (probe.name, probe.every, probe.timeout_s) == ("renamed", 7, 0.5)


def test_a_transform_has_its_kind_and_no_timeout():
    @transform(every=3)
    def squash(ctx):
        return None

    assert (squash.kind, squash.every, squash.timeout_s) == (TRANSFORM, 3, None)
    with pytest.raises(HookError, match="take no timeout_s"):
        squash.replace(timeout_s=1.0)


@pytest.mark.parametrize("every", [0, -1, 1.5, "2", True])
def test_a_bad_period_is_refused_with_what_was_given(every):
    with pytest.raises(HookError, match=f"every must be an int >= 1, got {every!r}"):
        analyzer(every=every)(lambda ctx: None)


def test_a_name_with_a_slash_is_refused_since_names_prefix_metric_tags():
    with pytest.raises(HookError, match="without '/'"):
        analyzer(name="a/b")(lambda ctx: None)


@pytest.mark.parametrize("every", [1, 3, 10])
def test_a_hook_is_due_every_k_steps_from_step_zero(every):
    hook = analyzer(every=every)(lambda ctx: None)
    assert [s for s in range(25) if hook.due(s)] == list(range(0, 25, every))


def test_an_exact_analyzer_is_declared_in_code_or_in_a_spec_and_checked(raises_one_line):
    from pipelines.hooks import load_hooks

    assert analyzer(every=5, exact=True)(lambda ctx: None).exact
    assert not analyzer(lambda ctx: None).exact
    (hook,) = load_hooks([{"hook": "builtin:noise_scale", "every": 4, "exact": True}])
    assert (hook.every, hook.exact) == (4, True)
    with raises_one_line(HookError, match="exact must be True or False, got 'yes'"):
        analyzer(exact="yes")(lambda ctx: None)
    with raises_one_line(HookError, match="transforms run at every step already"):
        transform(lambda ctx: None).replace(exact=True)
