"""``oasis plugins``: the listing's rows, and ``--check NAME``, which runs a plugin's backends
on a simulated pair.

:func:`plugin_rows` gives one row per backend (stage, name, plugin, distribution, version,
status, description), then the simulators, the plugins that failed to load and the hooks
that failed. With ``--check NAME`` (:func:`run_check`), each backend the plugin provides is
run once by :func:`oasis_core.testing.check_backend` on
:func:`oasis_core.testing.synthetic_pair`, and reported in one line: Q and the normalised
noise for residuals (subtract, mr), the figure that matters for the other stages. A backend
that cannot run here (a missing program) is reported as unavailable, not as a failure; a
breach of the contract is a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["COLUMNS", "CheckLine", "check_plugin", "plugin_records", "plugin_rows", "run_check"]

#: The columns of ``oasis plugins``.
COLUMNS = ("stage", "name", "plugin", "distribution", "version", "status", "description")


def plugin_rows(registry: Any) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The columns and rows of ``oasis plugins`` (status: ``available`` or why not)."""
    rows = [
        (r.stage, r.name, r.plugin, r.dist, r.version, registry.status(r), r.backend.description)
        for r in registry.all_records()
    ]
    for name, r in sorted(registry.simulators.items()):
        rows.append(
            ("simulator", name, r.plugin, r.dist, r.version, "available", r.backend.description)
        )
    for b in registry.pm.oasis_broken:
        rows.append(("?", "?", b.name, b.dist, b.version, f"failed to load: {b.error}", ""))
    for error in registry.errors:
        rows.append(("?", "?", "", "", "", error, ""))
    return COLUMNS, rows


@attrs.frozen
class CheckLine:
    """One backend's outcome: ``status`` is ``"ok"``, ``"unavailable"`` or ``"failed"``."""

    stage: str
    backend: str
    provider: str
    status: str
    text: str

    def render(self) -> str:
        """``<stage> <backend> (<dist>==<version>): <status>: <what was found>``."""
        return f"{self.stage} {self.backend} ({self.provider}): {self.status}: {self.text}"


def plugin_records(registry: Any, name: str) -> list[Any]:
    """The backend records of plugin ``name``: an entry-point (plugin) name, a
    distribution name, or else a backend name (of any stage).

    Raises
    ------
    UnknownBackend
        When nothing matches; the message lists the installed plugins.
    """
    from oasis_core.contracts.errors import UnknownBackend

    records = registry.all_records()
    for match in (
        lambda r: r.plugin == name,
        lambda r: r.dist == name,
        lambda r: r.name == name,
    ):
        found = [r for r in records if match(r)]
        if found:
            return found
    plugins = sorted({r.plugin for r in records})
    raise UnknownBackend(
        f"oasis plugins --check: no plugin, distribution or backend named {name!r}; "
        f"plugins: {', '.join(plugins)}"
    )


def check_plugin(name: str, registry: Any = None, *, seed: int = 0) -> list[CheckLine]:
    """Check every backend of plugin ``name`` on one simulated pair.

    Parameters
    ----------
    name : str
        A plugin (entry-point) name, a distribution name or a backend name.
    registry : Registry, optional
    seed : int
        Seed of the simulated pair.

    Returns
    -------
    list of CheckLine
        One per backend, in stage order.
    """
    from oasis_core.contracts.errors import BackendUnavailable
    from oasis_core.engine.plugins import BackendHandle, Registry
    from oasis_core.testing import ContractError, check_backend, synthetic_pair

    registry = registry or Registry()
    records = plugin_records(registry, name)
    pair = synthetic_pair(seed=seed)
    lines = []
    for record in records:
        backend = record.backend
        if hasattr(backend, "bind"):  # a selector (auto): its candidates are checked alone
            lines.append(
                CheckLine(
                    record.stage,
                    record.name,
                    record.provider,
                    "skipped",
                    "a selector over the other subtract backends",
                )
            )
            continue
        handle = BackendHandle(backend, record.provider)
        try:
            report = check_backend(handle, record.stage, pair=pair)
        except BackendUnavailable as err:
            lines.append(
                CheckLine(record.stage, record.name, record.provider, "unavailable", str(err))
            )
            continue
        except ContractError as err:
            lines.append(CheckLine(record.stage, record.name, record.provider, "failed", str(err)))
            continue
        except Exception as err:  # the plugin's fault, named by its handle: a failure
            text = " ".join(str(err).split())
            lines.append(
                CheckLine(
                    record.stage,
                    record.name,
                    record.provider,
                    "failed",
                    f"{type(err).__name__}: {text}",
                )
            )
            continue
        text = report.line().split(": ", 1)[1]
        lines.append(CheckLine(record.stage, record.name, record.provider, "ok", text))
    return lines


def run_check(
    name: str,
    registry: Any = None,
    *,
    say: Callable[[str], None] = print,
    emit_json: Callable[[dict[str, Any]], None] | None = None,
) -> list[CheckLine]:
    """``oasis plugins --check NAME``: check, print one line per backend (or one JSON
    object through ``emit_json``), and fail when a backend breaks the contract.

    Raises
    ------
    OasisError
        When any backend failed; the message names them (the CLI exits with status 1).
    """
    from oasis_core.contracts.errors import OasisError

    lines = check_plugin(name, registry)
    if emit_json is not None:
        emit_json({"checks": [attrs.asdict(line) for line in lines]})
    else:
        for line in lines:
            say(line.render())
    failed = [f"{line.stage} {line.backend}" for line in lines if line.status == "failed"]
    if failed:
        raise OasisError(
            f"oasis plugins --check {name}: {len(failed)} backend(s) break the contract: "
            f"{', '.join(failed)} (see above); oasis_core.testing.check_backend reproduces it"
        )
    return lines
