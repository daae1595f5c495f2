"""The stage registry: every pipeline stage is one :class:`Stage` record.

A stage names its hook (``oasis_<name>_backends``), its backend base class, its settings
class (the ``[<name>]`` table of ``oasis.toml``), its output folder in a target, its runner
(a function of the pipeline :class:`~oasis_core.engine.pipeline.Context`), the per-unit task
function run by the executor (if it has per-unit work) and its place in the run order
(``after``: the stage it follows). Classes and functions are given as dotted
``"module:attr"`` paths, resolved on first use, so this module imports nothing heavy
(the command line reads the stage names from it for ``oasis --help``) and no cycle forms
with the pipeline.

The eight built-in stages are :data:`BUILTIN`. A third-party distribution adds a stage
with one module (its hookspec, base class, settings, runner) and one record, exposed in
the ``oasis.stages`` entry-point group::

    [project.entry-points."oasis.stages"]
    count = "oasis_count.stage:STAGE"     # Stage(name="count", after="extract", ...)

The tables other modules used to keep by hand (``backends.STAGES`` and ``BASES``,
``config.SETTINGS``, ``tree.STAGE_DIRS``, ``pipeline._RUNNERS`` and ``_STAGE_TASKS``) are
read-only views of this registry.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, overload

import attrs

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "Stage",
    "StageNames",
    "StageTable",
    "get_stage",
    "reset",
    "resolve",
    "stage_names",
    "stages",
]

log = logging.getLogger("oasis")

#: The entry-point group through which a distribution adds stages.
ENTRY_POINT_GROUP = "oasis.stages"


def resolve(path: str) -> Any:
    """The object a dotted ``"package.module:attr"`` path names (imported on first use).

    Raises
    ------
    ValueError
        When ``path`` has no ``:``.
    ImportError, AttributeError
        When the module or the attribute does not exist.
    """
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{path!r}: not a 'module:attr' path")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@attrs.frozen(kw_only=True)
class Stage:
    """One pipeline stage.

    Parameters
    ----------
    name : str
        The stage's name (``[a-z][a-z0-9_]*``): its ``oasis.toml`` table and its command.
    base : str
        ``"module:Class"`` of the backend base class; every backend of the stage is an
        instance of it.
    settings : str
        ``"module:Class"`` of the attrs class of the ``[<name>]`` table; it has a
        ``backend`` field (the backend chosen by default).
    folder : str
        The target folder its outputs go to (``masks``, ``residuals``...).
    runner : str
        ``"module:function"`` running the stage: ``f(ctx) -> result``, where ``ctx`` is
        the :class:`~oasis_core.engine.pipeline.Context`.
    task : str, optional
        ``"module:function"`` doing one unit of work in the executor:
        ``f(task) -> summary dict`` (:class:`~oasis_core.engine.pipeline.Task`).
    after : str, optional
        The stage this one runs after (None: first).
    hookspec : str
        The hook through which plugins yield the stage's backends (default
        ``oasis_<name>_backends``).
    hookspecs : str
        The module holding that hook's ``@hookspec`` (default
        :mod:`oasis_core.contracts.hookspecs`).
    description : str
        One line (``oasis --help``).
    """

    name: str
    base: str
    settings: str
    folder: str
    runner: str
    task: str | None = None
    after: str | None = None
    hookspec: str = attrs.field(
        default=attrs.Factory(lambda self: f"oasis_{self.name}_backends", takes_self=True)
    )
    hookspecs: str = "oasis_core.contracts.hookspecs"
    description: str = ""

    @property
    def base_class(self) -> type:
        """The backend base class (resolved on first use)."""
        return _cached(self.base)

    @property
    def settings_class(self) -> type:
        """The settings class (resolved on first use)."""
        return _cached(self.settings)

    @property
    def run(self) -> Callable[[Any], Any]:
        """The runner (resolved on first use)."""
        return _cached(self.runner)

    @property
    def task_function(self) -> Callable[[Any], dict[str, Any]] | None:
        """The per-unit task function, or None for a stage without per-unit work."""
        return _cached(self.task) if self.task else None

    @property
    def hookspec_module(self) -> Any:
        """The module holding the stage's hookspec."""
        return importlib.import_module(self.hookspecs)


_RESOLVED: dict[str, Any] = {}


def _cached(path: str) -> Any:
    if path not in _RESOLVED:
        _RESOLVED[path] = resolve(path)
    return _RESOLVED[path]


def _builtin(name: str, base: str, folder: str, after: str | None, task: bool) -> Stage:
    return Stage(
        name=name,
        base=f"oasis_core.contracts.backends:{base}",
        settings=f"oasis_core.engine.config:{name.capitalize()}Settings",
        folder=folder,
        runner=f"oasis_core.engine.runners:{name}",
        task=f"oasis_core.engine.tasks:{name}" if task else None,
        after=after,
        description=f"run the {name} stage on a target",
    )


#: The built-in stages, in run order.
BUILTIN: tuple[Stage, ...] = (
    _builtin("mask", "MaskBackend", "masks", None, True),
    _builtin("psf", "PsfBackend", "psf", "mask", True),
    _builtin("align", "AlignBackend", "aligned", "psf", True),
    _builtin("combine", "CombineBackend", "templates", "align", False),
    _builtin("subtract", "SubtractBackend", "residuals", "combine", True),
    _builtin("mr", "MrBackend", "residuals", "subtract", False),
    _builtin("extract", "ExtractBackend", "sources", "mr", True),
    Stage(
        name="photometry",
        base="oasis_core.contracts.backends:PhotometryBackend",
        settings="oasis_core.engine.config:PhotometrySettings",
        folder="lightcurves",
        runner="oasis_core.engine.photometry:run",
        task="oasis_core.engine.photometry:task",
        after="extract",
        description="forced photometry on every residual: light curves and variables",
    ),
)

_STAGES: tuple[Stage, ...] | None = None


def _entry_point_stages() -> list[Stage]:
    """The stages of the ``oasis.stages`` entry points (none when plugin autoload is off);
    one that fails to load, or is not a :class:`Stage`, is logged and skipped."""
    if os.environ.get("OASIS_DISABLE_PLUGIN_AUTOLOAD"):
        return []
    from importlib.metadata import entry_points

    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        try:
            stage = ep.load()
        except Exception as err:  # a broken third-party stage must not stop OASIS
            log.warning(
                "stage %s (%s) failed to load: %s: %s", ep.name, dist, type(err).__name__, err
            )
            continue
        if not isinstance(stage, Stage):
            log.warning(
                "stage %s (%s): %r is not an oasis_core.contracts.stages.Stage",
                ep.name,
                dist,
                stage,
            )
            continue
        found.append(stage)
    return found


def _ordered(candidates: Sequence[Stage]) -> tuple[Stage, ...]:
    """``candidates`` in run order: the built-ins in theirs, each added stage right after
    its ``after`` stage (several after the same stage: in the order given). A duplicate
    name or an unknown ``after`` is logged and the stage skipped."""
    order: list[Stage] = []
    pending = list(candidates)
    while pending:
        placed = False
        for stage in list(pending):
            names = [s.name for s in order]
            if stage.name in names:
                log.warning("stage %r is defined twice; the second one is ignored", stage.name)
            elif stage.after is None and not order:
                order.append(stage)
            elif stage.after in names:
                at = names.index(stage.after) + 1
                while at < len(order) and order[at].after == stage.after:
                    if order[at] in BUILTIN:  # before the built-in that followed it
                        break
                    at += 1  # after the other stages added after the same one
                order.insert(at, stage)
            else:
                continue
            pending.remove(stage)
            placed = True
        if not placed:
            for stage in pending:
                log.warning(
                    "stage %r: runs after %r, which is not a stage; ignored",
                    stage.name,
                    stage.after,
                )
            break
    return tuple(order)


def stages() -> tuple[Stage, ...]:
    """Every stage (built-in and from ``oasis.stages`` entry points), in run order.

    Read once per process (see :func:`reset`).
    """
    global _STAGES
    if _STAGES is None:
        _STAGES = _ordered([*BUILTIN, *_entry_point_stages()])
    return _STAGES


def reset() -> None:
    """Forget the stages read so far (the next :func:`stages` reads the entry points again;
    for tests that install a stage)."""
    global _STAGES
    _STAGES = None


def stage_names() -> tuple[str, ...]:
    """The names of every stage, in run order."""
    return tuple(s.name for s in stages())


def get_stage(name: str) -> Stage:
    """The stage called ``name``.

    Raises
    ------
    KeyError
        When there is none (the message lists the stages).
    """
    for stage in stages():
        if stage.name == name:
            return stage
    raise KeyError(f"unknown stage {name!r}; stages: {', '.join(stage_names())}")


class StageNames(Sequence[str]):
    """A live, read-only tuple derived from the stages (``backends.STAGES``: the names in
    run order).

    Parameters
    ----------
    values : callable, optional
        Returns the tuple (default :func:`stage_names`).
    """

    def __init__(self, values: Callable[[], tuple[str, ...]] = stage_names) -> None:
        self._values = values

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return self._values()[index]

    def __len__(self) -> int:
        return len(self._values())

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return repr(self._values())


class StageTable(Mapping[str, Any]):
    """A live, read-only mapping derived from the stages, in run order.

    Parameters
    ----------
    value : callable
        Stage to the value (e.g. ``lambda s: s.folder``); a stage for which it returns
        None is left out.
    head : callable, optional
        Returns entries that come first (``{"run": RunSettings}``).
    """

    def __init__(
        self,
        value: Callable[[Stage], Any],
        head: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._value = value
        self._head = head

    def _items(self) -> dict[str, Any]:
        items = dict(self._head() if self._head else {})
        for stage in stages():
            value = self._value(stage)
            if value is not None:
                items[stage.name] = value
        return items

    def __getitem__(self, key: str) -> Any:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"StageTable({self._items()!r})"
