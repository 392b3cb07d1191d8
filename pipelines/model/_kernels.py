"""Kernel backends: which implementation of each kernel a model calls.

Two backends, chosen once per model (`build_model(..., backend=...)`):

- ``"cython"`` (the default, and the only one to train with): the compiled
  ``cykernels.<module>`` extensions, float32 only, GIL released in the hot loops.
- ``"numpy"``: the plain-numpy twins ``cykernels.<module>_ref`` — same names, same argument
  order, any float dtype. For float64 finite-difference checks of whole models; slow.

A missing compiled module is an ImportError that says how to build it; the cython backend
never falls back to a twin silently (a model that trains at twin speed is a bug, not a
degraded mode).
"""

import importlib
import threading
from types import SimpleNamespace

# The kernel table: module -> the functions the model core calls from it.
KERNELS = {
    "activations": (
        "relu_forward",
        "relu_backward",
        "gelu_forward",
        "gelu_backward",
        "silu_forward",
        "silu_backward",
        "tanh_forward",
        "tanh_backward",
        "swiglu_forward",
        "swiglu_backward",
        "residual_forward",
    ),
    "linear": ("linear_forward", "linear_backward"),
    "norms": ("layernorm_forward", "layernorm_backward", "rmsnorm_forward", "rmsnorm_backward"),
    "embedding": ("embedding_forward", "embedding_backward"),
    "attention": ("attention_forward", "attention_backward"),
    "dropout": ("dropout_forward", "dropout_backward"),
    "losses": (
        "softmax_cross_entropy_forward",
        "softmax_cross_entropy_forward_backward",
        "mse_forward",
        "mse_forward_backward",
        "kl_div_forward",
        "kl_div_forward_backward",
        "triplet_margin_forward",
        "triplet_margin_forward_backward",
    ),
}

BACKENDS = ("cython", "numpy")

_cache: dict[str, SimpleNamespace] = {}
_lock = threading.Lock()


def check_backend(backend):
    """Return `backend` if it names a backend, else raise a one-line ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def _import(module, backend):
    name = f"cykernels.{module}" if backend == "cython" else f"cykernels.{module}_ref"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        hint = " (build the kernels: pip install -e .)" if backend == "cython" else ""
        raise ImportError(f"{name} is not importable{hint}: {exc}") from exc


def kernels(backend="cython"):
    """The kernel namespace of `backend`: one attribute per function in KERNELS.

    Modules are imported on first use and the namespace is cached, so a model that never
    computes a loss does not need the loss kernels built.
    """
    check_backend(backend)
    with _lock:
        ns = _cache.get(backend)
        if ns is None:
            ns = _cache[backend] = _LazyKernels(backend)
        return ns


class _LazyKernels(SimpleNamespace):
    """Attribute access imports the owning module once, then the attribute is plain."""

    def __init__(self, backend):
        super().__init__()
        self.__dict__["_backend"] = backend
        self.__dict__["_owner"] = {f: m for m, fs in KERNELS.items() for f in fs}

    def __getattr__(self, name):
        module = self.__dict__["_owner"].get(name)
        if module is None:
            raise AttributeError(f"no kernel named {name!r} in the kernel table")
        mod = _import(module, self.__dict__["_backend"])
        for function in KERNELS[module]:
            if hasattr(mod, function):
                self.__dict__[function] = getattr(mod, function)
        if name not in self.__dict__:
            raise AttributeError(f"{mod.__name__} has no function {name!r}")
        return self.__dict__[name]
