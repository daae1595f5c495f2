"""A test plugin: a ``flaky`` backend for every stage that raises on chosen units of work.

Each ``flaky`` backend is the built-in one (``native``; ``ois`` for subtract) plus the option
``fail_on``: ``"*"`` fails every unit, ``"a,b"`` the frames named, ``""`` none. It raises a
plain :class:`RuntimeError`, as a plugin's bug would. The module is importable
(``tests.integration.flaky_backends``) so that worker processes can unpickle its backends.

Register it with :func:`registry`.
"""

from __future__ import annotations

from typing import Any

import attrs
from oasis_native.align import NativeAlign, NativeAlignOptions
from oasis_native.combine import NativeCombine, NativeCombineOptions
from oasis_native.extract import NativeExtract, NativeExtractOptions
from oasis_native.mask import NativeMask, NativeMaskOptions
from oasis_native.mr import NativeMr, NativeMrOptions
from oasis_native.psf import NativePsf, NativePsfOptions
from oasis_ois.backend import OisSubtract
from oasis_ois.ois import OisOptions

from oasis_core.contracts.backends import option
from oasis_core.contracts.hookspecs import hookimpl

__all__ = ["registry"]

FAIL_HELP = "'*' fails every unit, 'a,b' the frames named (test plugin)"


def _fails(name: str, fail_on: str) -> bool:
    wanted = {n.strip() for n in fail_on.split(",") if n.strip()}
    return "*" in wanted or name.removesuffix("_residual") in wanted


def _boom(stage: str, name: str) -> RuntimeError:
    return RuntimeError(f"flaky {stage} backend broke on {name}")


@attrs.frozen(kw_only=True)
class MaskOptions(NativeMaskOptions):
    fail_on: str = option("", FAIL_HELP)


class FlakyMask(NativeMask):
    name = "flaky"
    Options = MaskOptions

    def mask(self, frame: Any, *, options: Any, workdir: Any) -> Any:
        if _fails(frame.name, options.fail_on):
            raise _boom("mask", frame.name)
        return super().mask(frame, options=options, workdir=workdir)


@attrs.frozen(kw_only=True)
class PsfOptions(NativePsfOptions):
    fail_on: str = option("", FAIL_HELP)


class FlakyPsf(NativePsf):
    name = "flaky"
    Options = PsfOptions

    def psf(self, frame: Any, *, options: Any, workdir: Any) -> Any:
        if _fails(frame.name, options.fail_on):
            raise _boom("psf", frame.name)
        return super().psf(frame, options=options, workdir=workdir)


@attrs.frozen(kw_only=True)
class AlignOptions(NativeAlignOptions):
    fail_on: str = option("", FAIL_HELP)


class FlakyAlign(NativeAlign):
    name = "flaky"
    Options = AlignOptions

    def align(self, frame: Any, reference: Any, *, options: Any, workdir: Any) -> Any:
        if _fails(frame.name, options.fail_on):
            raise _boom("align", frame.name)
        return super().align(frame, reference, options=options, workdir=workdir)


@attrs.frozen(kw_only=True)
class CombineOptions(NativeCombineOptions):
    fail_on: str = option("", FAIL_HELP)


class FlakyCombine(NativeCombine):
    name = "flaky"
    Options = CombineOptions

    def combine(self, frames: Any, *, options: Any, workdir: Any) -> Any:
        if _fails("template", options.fail_on):
            raise _boom("combine", "template")
        return super().combine(frames, options=options, workdir=workdir)


@attrs.frozen(kw_only=True)
class SubtractOptions(OisOptions):
    fail_on: str = option("", FAIL_HELP)


class FlakySubtract(OisSubtract):
    name = "flaky"
    auto_priority = 1000
    Options = SubtractOptions

    def subtract(self, science: Any, template: Any, *, options: Any, workdir: Any) -> Any:
        if _fails(science.name, options.fail_on):
            raise _boom("subtract", science.name)
        return super().subtract(science, template, options=options, workdir=workdir)


@attrs.frozen(kw_only=True)
class MrOptions(NativeMrOptions):
    fail_on: str = option("", FAIL_HELP)


class FlakyMr(NativeMr):
    name = "flaky"
    Options = MrOptions

    def master(self, residuals: Any, *, options: Any, workdir: Any) -> Any:
        if _fails("MR", options.fail_on):
            raise _boom("mr", "MR")
        return super().master(residuals, options=options, workdir=workdir)


@attrs.frozen(kw_only=True)
class ExtractOptions(NativeExtractOptions):
    fail_on: str = option("", FAIL_HELP)


class FlakyExtract(NativeExtract):
    name = "flaky"
    Options = ExtractOptions

    def extract(self, residual: Any, *, options: Any, workdir: Any) -> Any:
        if _fails(residual.name, options.fail_on):
            raise _boom("extract", residual.name)
        return super().extract(residual, options=options, workdir=workdir)


class FlakyPlugin:
    """The hooks yielding the ``flaky`` backends."""

    @hookimpl
    def oasis_mask_backends(self) -> Any:
        yield FlakyMask()

    @hookimpl
    def oasis_psf_backends(self) -> Any:
        yield FlakyPsf()

    @hookimpl
    def oasis_align_backends(self) -> Any:
        yield FlakyAlign()

    @hookimpl
    def oasis_combine_backends(self) -> Any:
        yield FlakyCombine()

    @hookimpl
    def oasis_subtract_backends(self) -> Any:
        yield FlakySubtract()

    @hookimpl
    def oasis_mr_backends(self) -> Any:
        yield FlakyMr()

    @hookimpl
    def oasis_extract_backends(self) -> Any:
        yield FlakyExtract()


def registry() -> Any:
    """A :class:`~oasis_core.engine.plugins.Registry` of the installed plugins plus ``flaky``."""
    from oasis_core.engine.plugins import Registry, make_plugin_manager

    pm = make_plugin_manager()
    pm.register(FlakyPlugin(), name="flaky")
    return Registry(pm)
