import json
import math

import numpy as np
import pytest

from pipelines.hooks import MAX_ARRAY_SIZE, Histogram, HookError, validate_metrics
from pipelines.hooks._metrics import to_json_value


def test_none_means_no_metrics():
    assert validate_metrics("h", None) == {}


def test_scalars_and_small_arrays_become_plain_json_values():
    out = validate_metrics(
        "h",
        {
            "f": np.float32(1.5),
            "i": np.int64(3),
            "b": True,
            "nb": np.bool_(True),
            "nan": math.nan,
            "arr": np.array([[1.0, np.nan], [2.0, 3.0]], dtype=np.float32),
            "zero_d": np.array(2.5),
        },
    )
    assert out["f"] == 1.5 and type(out["f"]) is float
    assert out["i"] == 3 and type(out["i"]) is int
    assert out["b"] == out["nb"] == 1 and type(out["b"]) is type(out["nb"]) is int
    assert math.isnan(out["nan"])
    assert out["arr"] == [[1.0, None], [2.0, 3.0]]
    assert out["zero_d"] == 2.5
    json.dumps({k: to_json_value(v) for k, v in out.items()}, allow_nan=False)


def test_nested_dicts_are_flattened_with_slashes():
    out = validate_metrics("h", {"norm": {"fc.weight": 1.0, "deep": {"x": 2}}, "g": 3.0})
    assert out == {"norm/fc.weight": 1.0, "norm/deep/x": 2, "g": 3.0}


def test_a_histogram_stays_a_histogram_and_serialises_as_edges_and_counts():
    out = validate_metrics("h", {"hist": Histogram(np.array([0.0, 1, 2]), np.array([3, 4]))})
    assert to_json_value(out["hist"]) == {"edges": [0.0, 1.0, 2.0], "counts": [3, 4]}


@pytest.mark.parametrize(
    "metrics, message",
    [
        ([1.0], "must return a dict of metrics or None, got list"),
        ({1: 1.0}, "metric names must be non-empty str, got 1"),
        ({"x": math.inf}, "metric 'x': got inf; metrics must be finite or nan"),
        ({"x": np.array([1.0, -np.inf])}, "metric 'x': contains inf"),
        ({"x": "text"}, "metric 'x': expected int, float, numpy scalar, array of at most"),
        ({"x": np.zeros(MAX_ARRAY_SIZE + 1)}, f"at most {MAX_ARRAY_SIZE} elements"),
        ({"x": [[1.0], [1.0, 2.0]]}, "metric 'x': not a rectangular array"),
        ({"x": Histogram(np.zeros(3), np.zeros(3))}, "edges one longer than 1-d counts"),
    ],
)
def test_what_is_not_a_metric_is_refused_naming_hook_and_metric(metrics, message):
    with pytest.raises(HookError, match="hook 'probe'") as info:
        validate_metrics("probe", metrics)
    assert message in str(info.value)
