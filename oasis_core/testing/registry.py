"""A registry with a plugin object registered explicitly (a test's or a notebook's),
tolerant of the same plugin being installed too."""

from __future__ import annotations

from typing import Any

__all__ = [
    "plugin_registry",
    "register_plugin",
]


def register_plugin(pm: Any, plugin: Any, name: str | None = None) -> str:
    """Register ``plugin`` on ``pm``, tolerating the same plugin installed too.

    The object replaces any other registered plugin (an installed copy, loaded through
    its entry point) that provides a backend of the same stage and name; the core's own
    plugin is never replaced. Registering an object already registered returns its name.

    Parameters
    ----------
    pm : pluggy.PluginManager
        From :func:`oasis_core.engine.plugins.make_plugin_manager`.
    plugin : object
        A module or object with ``@hookimpl`` functions.
    name : str, optional
        The registration name; default pluggy's.

    Returns
    -------
    str
        The name it is registered under.
    """
    from oasis_core.engine.plugins import CORE_PLUGIN, Registry

    if plugin in pm.get_plugins():
        return str(pm.get_name(plugin))
    registered = pm.register(plugin, name=name)
    mine = pm.get_name(plugin) or registered
    for (_stage, _name), records in Registry(pm).duplicates.items():
        if mine in {r.plugin for r in records}:
            for record in records:
                if record.plugin not in (mine, CORE_PLUGIN) and pm.has_plugin(record.plugin):
                    pm.unregister(name=record.plugin)
    return str(mine)


def plugin_registry(*plugins: Any, autoload: bool | None = None) -> Any:
    """A :class:`~oasis_core.engine.plugins.Registry` with ``plugins`` registered explicitly.

    Parameters
    ----------
    *plugins : object or (name, object)
        Plugins (modules or objects with ``@hookimpl`` functions), each optionally with
        its registration name; registered by :func:`register_plugin`, so an installed copy
        of the same plugin is replaced rather than reported as a duplicate.
    autoload : bool, optional
        Load the installed plugins too (default: unless ``OASIS_DISABLE_PLUGIN_AUTOLOAD``
        is set).

    Returns
    -------
    Registry
        Pass it as ``registry=`` to ``pipeline``, ``subtract_pair`` or ``compare``.

    Examples
    --------
    >>> from oasis_core.contracts.hookspecs import hookimpl
    >>> class Mine:
    ...     @hookimpl
    ...     def oasis_subtract_backends(self):
    ...         return []
    >>> registry = plugin_registry(("mine", Mine()))
    >>> registry.pm.has_plugin("mine")
    True
    """
    from oasis_core.engine.plugins import Registry, make_plugin_manager

    pm = make_plugin_manager(autoload=autoload)
    for item in plugins:
        name, plugin = item if isinstance(item, tuple) else (None, item)
        register_plugin(pm, plugin, name)
    return Registry(pm)
