"""The engine: configuration, target tree, pipeline, executors, provenance, input/output.

It runs the stages the contracts (:mod:`oasis_core.contracts`) describe through the backends
plugins provide. It imports no plugin and no application; applications (:mod:`oasis_apps`)
use its public names only (tests keep both so). The public entry points are
:func:`oasis_core.engine.api.subtract_pair`, :func:`oasis_core.engine.api.run`,
:func:`oasis_core.engine.pipeline.pipeline` and :func:`oasis_core.engine.pipeline.run_stage`.
"""
