"""Fixtures of the integration tests: the small simulated target shared by the pipeline
engine's tests (:mod:`tests.integration.pipeline_kit`)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_target(tmp_path_factory):
    """``(pristine, done)``: the small target before any run (inside an OASIS root), and a
    copy of it after a full run with the defaults. Copy them before changing anything."""
    from tests.conftest import built_once

    def build(root):
        from oasis_core.engine.pipeline import pipeline
        from tests.integration.pipeline_kit import copy_target, make_target

        pristine = make_target(root / "pristine")
        pipeline(copy_target(pristine, root / "done"), jobs=1)

    root = built_once(tmp_path_factory, "small", build)  # once per session, workers included
    return root / "pristine" / "OASIS" / "targets" / "t", root / "done" / "t"
