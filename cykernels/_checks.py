"""Argument checks shared by every kernel wrapper.

A kernel given the wrong dtype, shape, layout or an aliasing output must fail with a
ValueError that names the argument, what was expected and what was received — never
segfault or write garbage. The Cython wrappers call these before entering `nogil` code.
"""

import numpy as np


def check_array(name, arr, dtype=np.float32, ndim=None, shape=None, writable=False):
    """Require a C-contiguous ndarray of `dtype` (and `ndim` / `shape` when given)."""
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name}: expected a numpy.ndarray, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {np.dtype(dtype).name}, got {arr.dtype.name}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array, got strides {arr.strides}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name}: expected a writable array (it is an output)")
    return arr


def check_same_shape(reference_name, reference, **others):
    """Require every array in `others` to have the shape of `reference`."""
    for name, arr in others.items():
        if arr is not None and arr.shape != reference.shape:
            raise ValueError(
                f"{name}: expected shape {reference.shape} (the shape of {reference_name}), "
                f"got {arr.shape}"
            )


def check_no_alias(outputs, inputs):
    """Require no output to share memory with any other output or any input.

    `outputs` and `inputs` are dicts name -> array (None entries are skipped).
    """
    outs = [(n, a) for n, a in outputs.items() if a is not None]
    ins = [(n, a) for n, a in inputs.items() if a is not None]
    for i, (name, arr) in enumerate(outs):
        for other_name, other in outs[i + 1 :] + ins:
            if np.shares_memory(arr, other):
                raise ValueError(f"{name}: must not share memory with {other_name}")


def check_index_range(name, ids, upper):
    """Require integer ids in [0, upper)."""
    if ids.size and (ids.min() < 0 or ids.max() >= upper):
        raise ValueError(
            f"{name}: ids must lie in [0, {upper}), got min {int(ids.min())} max {int(ids.max())}"
        )
