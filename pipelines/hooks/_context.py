"""What a hook sees: one step's gradients, parameters and update, by parameter name.

A context is built from the flat buffers a rank already has (DESIGN.md, "Flat buffers"):
each per-parameter array is a view `flat[offset:offset + size].reshape(shape)`, so
building one costs a dict of views, never a copy of the model. The layout that cuts the
buffer is a list of (name, offset, shape) — or of objects with those attributes, such as
the model core's `Parameter`s — in the model's parameter order, which is the "layer
order" of gradient-flow plots.

An analyzer's context is read-only: its arrays have `writeable=False` and its dicts are
mapping proxies, so a hook that tries to change training gets a ValueError/TypeError
instead of silently diverging the ranks. A transform's context has writable views of the
rank's own gradient and nothing else writable.
"""

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

_EMPTY = MappingProxyType({})


def normalise_layout(layout) -> tuple:
    """The layout as a tuple of (name, offset, shape) with checked types and unique names.

    Accepts (name, offset, shape) triples or objects with .name, .offset, .shape.
    """
    out, seen = [], set()
    for entry in layout:
        if isinstance(entry, tuple | list) and len(entry) == 3:
            name, offset, shape = entry
        elif all(hasattr(entry, a) for a in ("name", "offset", "shape")):
            name, offset, shape = entry.name, entry.offset, entry.shape
        else:
            raise ValueError(
                f"layout entries must be (name, offset, shape) or have .name/.offset/.shape, "
                f"got {entry!r}"
            )
        if not isinstance(name, str) or name in seen:
            raise ValueError(f"layout names must be unique str, got {name!r} (again?)")
        if int(offset) < 0:
            raise ValueError(f"layout {name!r}: offset must be >= 0, got {offset}")
        seen.add(name)
        out.append((name, int(offset), tuple(int(s) for s in shape)))
    return tuple(out)


def flat_views(flat, layout, *, readonly: bool = True) -> Mapping:
    """name -> view of the 1-d buffer `flat` for each (name, offset, shape) of `layout`."""
    flat = np.asarray(flat)
    if flat.ndim != 1:
        raise ValueError(f"a flat buffer must be 1-d, got shape {flat.shape}")
    views = {}
    for name, offset, shape in layout:
        stop = offset + math.prod(shape)
        if stop > flat.size:
            raise ValueError(
                f"layout {name!r} needs elements [{offset}, {stop}) of a buffer of {flat.size}"
            )
        view = flat[offset:stop].reshape(shape)
        if readonly:
            view.flags.writeable = False
        views[name] = view
    return MappingProxyType(views)


def _proxy(d):
    if d is None:
        return None
    return d if isinstance(d, MappingProxyType) else MappingProxyType(dict(d))


@dataclasses.dataclass(frozen=True, eq=False)
class HookContext:
    """One step as a hook sees it.

    step        the step the gradients belong to.
    loss, lr    the step's mean loss over the global batch and its learning rate (nan if
                unknown, e.g. in a transform, which runs before the loss is reduced).
    grads       name -> gradient. For an analyzer, the reduced gradient: the gradient of
                the global-batch mean loss, before clipping. For a transform, this rank's
                own gradient, writable.
    rank_grads  rank -> (name -> gradient): each rank's own gradient before reduction
                (the gradient of its micro-batch mean loss). Empty when not offered.
    params      name -> parameter values before this step's update.
    update      name -> the update about to be applied (params_after - params_before),
                or None when not known yet (in a transform).
    names       parameter names in layer order.
    batch_size  examples per rank per step (B_small of the noise scale), or None.
    world_size  number of ranks.
    rank        the rank running a transform; None in an analyzer.
    rng         a transform's numpy Generator (see `transform_rng`); None in an analyzer.
    series_start  the step this analyzer's series of samples counts from: 0 when it runs
                since the run's start; after the hook, its analyzer process or the run
                restarted (state kept in the hook is gone), the hook's due step before
                the first step of the new series, so that the first sample counts for
                one sampling period, as at the run's start (hooks.jsonl marks the
                series' records with "restarted_at").
    """

    step: int
    grads: Mapping
    loss: float = math.nan
    lr: float = math.nan
    rank_grads: Mapping = dataclasses.field(default_factory=dict)
    params: Mapping = dataclasses.field(default_factory=dict)
    update: Mapping | None = None
    names: tuple = ()
    batch_size: int | None = None
    world_size: int = 1
    rank: int | None = None
    rng: np.random.Generator | None = None
    series_start: int = 0

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "grads", _proxy(self.grads))
        set_(self, "params", _proxy(self.params))
        set_(self, "update", _proxy(self.update))
        set_(
            self, "rank_grads", MappingProxyType({r: _proxy(g) for r, g in self.rank_grads.items()})
        )
        if not self.names:
            set_(self, "names", tuple(self.grads))
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")

    @property
    def global_batch_size(self) -> int | None:
        """Examples per step over all ranks (B_big of the noise scale), or None."""
        return None if self.batch_size is None else self.batch_size * self.world_size

    @classmethod
    def from_flat(
        cls,
        step,
        layout,
        grads,
        *,
        loss=math.nan,
        lr=math.nan,
        rank_grads=None,
        params=None,
        update=None,
        batch_size=None,
        world_size=None,
        reduced_scale=1.0,
        readonly=True,
    ):
        """A context of views into flat buffers cut by `layout` — no copies.

        grads        the reduced flat gradient. If the reducer summed rather than averaged,
                     pass reduced_scale=1/world_size (that one costs a copy).
        rank_grads   rank -> flat gradient of that rank (a sequence is taken as ranks 0..).
        params, update   flat buffers or None.
        world_size   defaults to len(rank_grads), or 1.
        readonly     views are made read-only (the analyzer's case).
        """
        layout = normalise_layout(layout)
        if reduced_scale != 1.0:
            grads = np.asarray(grads) * np.asarray(reduced_scale, dtype=np.asarray(grads).dtype)
        if rank_grads is None:
            rank_grads = {}
        elif not isinstance(rank_grads, Mapping):
            rank_grads = dict(enumerate(rank_grads))

        def views(flat):
            return None if flat is None else flat_views(flat, layout, readonly=readonly)

        return cls(
            step=int(step),
            loss=float(loss),
            lr=float(lr),
            grads=views(grads),
            rank_grads={int(r): views(g) for r, g in rank_grads.items()},
            params=views(params) if params is not None else _EMPTY,
            update=views(update),
            names=tuple(name for name, _, _ in layout),
            batch_size=batch_size,
            world_size=int(world_size or len(rank_grads) or 1),
        )
