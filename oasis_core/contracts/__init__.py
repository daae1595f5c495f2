"""The contracts between OASIS and its plugins: what a plugin author reads.

- :mod:`~oasis_core.contracts.stages`: a stage is one :class:`Stage` record (its hook, backend
  base, settings, output folder, runner); third-party stages come through ``oasis.stages``.
- :mod:`~oasis_core.contracts.hookspecs`: one pluggy hook specification per stage.
- :mod:`~oasis_core.contracts.backends`: the backend base class of each stage and
  :func:`~oasis_core.contracts.backends.option`, how a backend declares its settings.
- :mod:`~oasis_core.contracts.model`: the typed objects the stages pass (Frame, PsfModel,
  Template, Residual, KernelSolution).
- :mod:`~oasis_core.contracts.validators`: the checks an option may carry.
- :mod:`~oasis_core.contracts.errors`: the exceptions a backend raises.

This package imports nothing else of OASIS (a test keeps it so).
"""
