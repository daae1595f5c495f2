"""Every probe of a hostile user, through the real CLI: the exit code, one error line and no
traceback, no input byte changed, nothing written outside the target or the named outputs.

The rows live in ``tests/integration/probes_*.py`` (each a ``PROBES`` list of
:class:`~tests.integration.probe_kit.Probe`); this module runs them all.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

from tests.integration.probe_kit import Probe, make_base, run_probe


def _all_probes() -> list[Probe]:
    here = Path(__file__).parent
    probes: list[Probe] = []
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
        if info.name.startswith("probes_"):
            module = importlib.import_module(f"tests.integration.{info.name}")
            probes.extend(module.PROBES)
    ids = [p.id for p in probes]
    assert len(ids) == len(set(ids)), f"duplicate probe ids: {ids}"
    return probes


PROBES = _all_probes()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("probebase"))


@pytest.mark.parametrize("probe", PROBES, ids=[p.id for p in PROBES])
def test_probe(probe, base, tmp_path):
    run_probe(probe, base, tmp_path / "ws")
