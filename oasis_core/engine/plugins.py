"""Finding plugins and choosing backends.

:func:`make_plugin_manager` returns a fresh :class:`pluggy.PluginManager` every time (there
is no import-time global). It loads every entry point of the ``oasis.plugins`` group
(built-in plugins included) unless ``OASIS_DISABLE_PLUGIN_AUTOLOAD`` is set, in which case
only plugins registered explicitly are used; the core's own backends (the subtract
selector ``auto``) are registered either way, as plugin :data:`CORE_PLUGIN`. A plugin that
fails to import is recorded and shown by ``oasis plugins``; it is an error only if one of
its backends is selected.

:class:`Registry` collects the backends every plugin yields, per stage, and resolves a
name to a backend: an unknown name lists the installed choices, a duplicate name names both
providers, and :meth:`Registry.select` runs the backend's :meth:`~Backend.check`.

:meth:`Registry.select` hands out a :class:`BackendHandle`: the backend itself for every
attribute, but its stage methods turn a plain exception (a plugin's bug, a library's
error) into one :class:`~oasis_core.contracts.errors.BackendError` naming the stage, the backend,
its distribution and version, the unit of work and the fault, chained to the original.
This is the one place where a backend's faults are named; the pipeline, ``subtract-pair``,
``compare`` and every other caller get it by selecting backends here.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import pluggy

from oasis_core.contracts import hookspecs
from oasis_core.contracts.backends import BASES, NAME_RE, STAGES, Backend
from oasis_core.contracts.errors import BackendError, BackendUnavailable, OasisError, UnknownBackend
from oasis_core.contracts.stages import get_stage, resolve, stages

__all__ = [
    "CORE_PLUGIN",
    "ENTRY_POINT_GROUP",
    "STAGE_METHODS",
    "BackendHandle",
    "BackendRecord",
    "BrokenPlugin",
    "Registry",
    "make_plugin_manager",
]

ENTRY_POINT_GROUP = "oasis.plugins"
log = logging.getLogger("oasis")


@attrs.frozen
class BrokenPlugin:
    """An entry point that could not be loaded."""

    name: str
    dist: str
    version: str
    error: str


@attrs.frozen
class BackendRecord:
    """One backend and where it comes from."""

    backend: Backend
    plugin: str
    dist: str
    version: str

    @property
    def stage(self) -> str:
        return self.backend.stage

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def provider(self) -> str:
        """``dist==version`` (the distribution alone when it has no version)."""
        return f"{self.dist}=={self.version}" if self.version else self.dist


#: The stage methods of the backend contract (:mod:`oasis_core.contracts.backends`), which a
#: :class:`BackendHandle` guards.
STAGE_METHODS = frozenset(
    ("mask", "psf", "align", "combine", "subtract", "candidates", "master", "extract")
)


def _unit(args: tuple[Any, ...]) -> str:
    """The unit of work a stage method was given: its first argument, by name."""
    if not args:
        return "?"
    first = args[0]
    if isinstance(first, Sequence) and not isinstance(first, (str, bytes)):
        # a lazy series (residuals read when asked for) names its items without reading
        names = list(getattr(first, "names", None) or [getattr(x, "name", "?") for x in first])
        names = [str(n) for n in names]
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        kind = type(first[0]).__name__.lower() + "s" if first else "inputs"
        return f"{len(names)} {kind} ({shown})"
    kind = type(first).__name__.lower()
    name = getattr(first, "name", None) or "?"
    path = getattr(first, "path", None)
    return f"{kind} {name}" + (f" ({path})" if path else "")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class BackendHandle:
    """A selected backend as the core uses it.

    Every attribute is the backend's own (``name``, ``Options``, ``needs_psf``,
    ``user_files``...) and ``isinstance`` sees the backend's class; only the stage methods
    (:data:`STAGE_METHODS`) are guarded: an exception that is not an
    :class:`~oasis_core.contracts.errors.OasisError` becomes a
    :class:`~oasis_core.contracts.errors.BackendError` whose one-line message names the stage, the
    backend, its distribution, the unit of work (frame, residual or list of inputs) and the
    fault, raised ``from`` the original. A handle pickles as its backend and provider, so
    it crosses to worker processes like the backend itself.

    Parameters
    ----------
    backend : Backend
        The plugin's object.
    provider : str
        Its distribution, ``dist==version``.
    """

    __slots__ = ("_backend", "_provider")

    def __init__(self, backend: Backend, provider: str) -> None:
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_provider", provider)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(handle, SubtractBackend) holds
        return type(self._backend)

    @property
    def __wrapped__(self) -> Backend:
        """The plugin's own backend object."""
        return self._backend

    @property
    def provider(self) -> str:
        """The backend's distribution, ``dist==version``."""
        return self._provider

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._backend, name)
        if name in STAGE_METHODS and callable(value):
            return self._guard(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._backend, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (BackendHandle, (self._backend, self._provider))

    def __repr__(self) -> str:
        return repr(self._backend)

    def __eq__(self, other: object) -> bool:
        return self._backend == getattr(other, "__wrapped__", other)

    def __hash__(self) -> int:
        return hash(self._backend)

    def _fault(self, method: str, args: tuple[Any, ...], err: Exception) -> BackendError:
        backend = self._backend
        return BackendError(
            f"{backend.stage} backend {backend.name!r} ({self._provider}) failed in "
            f"{method}() on {_unit(args)}: {_one_line(err)}",
            metadata={"backend": backend.name, "provider": self._provider, "method": method},
        )

    def _guard(self, method: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                result = function(*args, **kwargs)
            except OasisError:
                raise
            except Exception as err:  # a plugin's plain exception: name the plugin
                raise self._fault(method, args, err) from err
            if method == "candidates":  # may be a generator: guard every step too
                return self._guard_iter(method, args, result)
            return result

        return guarded

    def _guard_iter(self, method: str, args: tuple[Any, ...], items: Any) -> Iterator[Any]:
        try:
            iterator = iter(items)
        except TypeError as err:
            raise self._fault(method, args, err) from err
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except OasisError:
                raise
            except Exception as err:
                raise self._fault(method, args, err) from err
            yield item


def make_plugin_manager(*, autoload: bool | None = None) -> pluggy.PluginManager:
    """Return a new plugin manager with the OASIS hook specifications.

    Parameters
    ----------
    autoload : bool, optional
        Load the ``oasis.plugins`` entry points. Defaults to True unless the environment
        variable ``OASIS_DISABLE_PLUGIN_AUTOLOAD`` is set to a non-empty value.

    Returns
    -------
    pluggy.PluginManager
        ``pm.oasis_broken`` lists the :class:`BrokenPlugin` entries that failed to load and
        ``pm.oasis_dists`` maps each registered plugin name to ``(dist, version)``.
    """
    pm = _PluginManager("oasis")
    pm.add_hookspecs(hookspecs)
    for module in {s.hookspecs for s in stages()} - {hookspecs.__name__}:
        pm.add_hookspecs(importlib.import_module(module))  # a third-party stage's hook
    pm.oasis_broken = []  # type: ignore[attr-defined]
    pm.oasis_dists = {}  # type: ignore[attr-defined]
    _register_core(pm)
    if autoload is None:
        autoload = not os.environ.get("OASIS_DISABLE_PLUGIN_AUTOLOAD")
    if autoload:
        _load_entry_points(pm)
    return pm


class _PluginManager(pluggy.PluginManager):
    """pluggy's manager, tolerant of a plugin registered explicitly that is also installed
    (a test's or a notebook's ``pm.register(module, name=...)``): registering the object
    an entry point already loaded returns its name, and an object registered under the
    name of a plugin loaded from an entry point replaces that installed copy."""

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        if plugin in self.get_plugins():
            return self.get_name(plugin)
        installed = getattr(self, "oasis_dists", {})
        if name is not None and name != CORE_PLUGIN and name in installed and self.has_plugin(name):
            self.unregister(name=name)
        return super().register(plugin, name)


#: The name under which the core registers its own backends (the selector ``auto``).
CORE_PLUGIN = "oasis-core"

#: The core's own backends, by stage, as ``"module:attr"`` paths resolved when the hook is
#: called (like a stage record's, :func:`oasis_core.contracts.stages.resolve`): the
#: selector ``auto`` sits above the registry that lists it.
CORE_BACKENDS = {"subtract": ("oasis_core.engine.auto:AutoBackend",)}


class _CorePlugin:
    """The core's own backends, registered like any plugin's (autoload or not)."""

    @hookspecs.hookimpl
    def oasis_subtract_backends(self) -> list[Any]:
        return [resolve(path)() for path in CORE_BACKENDS["subtract"]]


def _register_core(pm: pluggy.PluginManager) -> None:
    from oasis_core import __version__

    pm.register(_CorePlugin(), name=CORE_PLUGIN)
    pm.oasis_dists[CORE_PLUGIN] = ("oasis-dia", __version__)  # type: ignore[attr-defined]


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as err:  # a broken third-party plugin must not stop OASIS
            pm.oasis_broken.append(  # type: ignore[attr-defined]
                BrokenPlugin(ep.name, dist, version, f"{type(err).__name__}: {err}")
            )
            log.debug("plugin %s failed to load", ep.name, exc_info=True)
            continue
        pm.oasis_dists[ep.name] = (dist, version)  # type: ignore[attr-defined]


class Registry:
    """The backends of every registered plugin, by stage and name.

    Parameters
    ----------
    pm : pluggy.PluginManager, optional
        Defaults to :func:`make_plugin_manager`.
    """

    def __init__(self, pm: pluggy.PluginManager | None = None) -> None:
        self.pm = pm if pm is not None else make_plugin_manager()
        self.records: dict[str, dict[str, BackendRecord]] = {s: {} for s in STAGES}
        self.duplicates: dict[tuple[str, str], list[BackendRecord]] = {}
        self.errors: list[str] = []
        self.simulators: dict[str, BackendRecord] = {}
        for stage in STAGES:
            self._collect(stage)
        self._collect_simulators()

    def _produce(self, hook_name: str) -> Iterator[tuple[Any, str, str, str]]:
        """Call every implementation of ``hook_name``; yield (object, plugin, dist,
        version) for each object yielded. A hook that raises is recorded, not raised."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
            dist, version = getattr(self.pm, "oasis_dists", {}).get(
                plugin_name, (_module_dist(impl.plugin), "")
            )
            try:
                produced = list(impl.function() or [])
            except Exception as err:  # a plugin's hook raising must name the plugin
                self.errors.append(
                    f"plugin {plugin_name!r} ({dist}): {hook_name} failed: "
                    f"{type(err).__name__}: {err}"
                )
                continue
            for item in produced:
                yield item, plugin_name, dist, version

    def _collect_simulators(self) -> None:
        from oasis_core.contracts.backends import Simulator

        for sim, plugin, dist, version in self._produce("oasis_simulators"):
            if isinstance(sim, Simulator) and NAME_RE.match(sim.name or ""):
                record = BackendRecord(sim, plugin, dist, version)  # type: ignore[arg-type]
                self.simulators.setdefault(sim.name, record)

    def simulator(self, name: str) -> Any:
        """The simulator called ``name``."""
        if name not in self.simulators:
            raise UnknownBackend(
                f"simulator {name!r} is not installed; installed: "
                f"{', '.join(sorted(self.simulators)) or 'none'}"
            )
        return self.simulators[name].backend

    def _collect(self, stage: str) -> None:
        for backend, plugin, dist, version in self._produce(get_stage(stage).hookspec):
            self._add(stage, backend, plugin, dist, version)

    def _add(self, stage: str, backend: Any, plugin: str, dist: str, version: str) -> None:
        base = BASES[stage]
        if not isinstance(backend, base):
            self.errors.append(
                f"plugin {plugin!r} ({dist}): oasis_{stage}_backends yielded {backend!r}, "
                f"not a {base.__name__}"
            )
            return
        if not NAME_RE.match(backend.name or ""):
            self.errors.append(
                f"plugin {plugin!r} ({dist}): {stage} backend name {backend.name!r} must "
                "match [a-z0-9_-]+"
            )
            return
        record = BackendRecord(backend, plugin, dist, version)
        existing = self.records[stage].get(backend.name)
        if existing is not None:
            self.duplicates.setdefault((stage, backend.name), [existing]).append(record)
            return
        self.records[stage][backend.name] = record

    def names(self, stage: str) -> list[str]:
        """Installed backend names for ``stage``, sorted."""
        return sorted(self.records[stage])

    def get(self, stage: str, name: str) -> BackendRecord:
        """The record of backend ``name`` of ``stage``.

        Raises
        ------
        UnknownBackend
            When no plugin provides it (the message lists the installed ones).
        OasisError
            When two plugins provide the same name.
        """
        if stage not in self.records:
            raise UnknownBackend(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        dup = self.duplicates.get((stage, name))
        if dup:
            who = " and ".join(f"{r.plugin} ({r.dist})" for r in dup)
            raise OasisError(f"{stage} backend {name!r} is provided twice: by {who}; uninstall one")
        record = self.records[stage].get(name)
        if record is None:
            broken = list(getattr(self.pm, "oasis_broken", []))
            hint = ""
            if broken:
                hint = "; plugins that failed to load: " + ", ".join(
                    f"{b.name} ({b.error})" for b in broken
                )
            installed = ", ".join(self.names(stage)) or "none"
            raise UnknownBackend(
                f"{stage} backend {name!r} is not installed; installed: {installed}{hint}"
            )
        return record

    def select(self, stage: str, name: str, options: Any) -> Backend:
        """Return backend ``name`` of ``stage`` after checking that it can run.

        Returns
        -------
        BackendHandle
            The backend, whose stage methods name it and its plugin when they fail
            (see :class:`BackendHandle`).
        """
        record = self.get(stage, name)
        try:
            record.backend.check(options)
        except BackendUnavailable:
            raise
        except OasisError as err:
            raise BackendUnavailable(f"{stage} backend {name!r}: {err}") from err
        except Exception as err:  # a plugin's check() bug: name the plugin
            raise BackendUnavailable(
                f"{stage} backend {name!r} ({record.provider}): check() failed: {_one_line(err)}"
            ) from err
        return BackendHandle(record.backend, record.provider)  # type: ignore[return-value]

    def status(self, record: BackendRecord) -> str:
        """``"available"`` or why the backend cannot run with its default options."""
        try:
            record.backend.check(record.backend.Options())
        except OasisError as err:
            return f"unavailable: {err}"
        except Exception as err:  # a plugin's own check() bug is shown, not raised
            return f"unavailable: {type(err).__name__}: {err}"
        return "available"

    def all_records(self) -> list[BackendRecord]:
        """Every backend, in stage order then by name."""
        return [self.records[s][n] for s in STAGES for n in self.names(s)]


def _module_dist(plugin: Any) -> str:
    module = getattr(plugin, "__module__", None) or getattr(plugin, "__name__", "")
    return str(module).split(".")[0] or "?"
