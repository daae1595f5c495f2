"""Tests of :mod:`oasis_core.engine.executor` beyond the pipeline's own use of it."""

from __future__ import annotations

import pytest

from oasis_core.engine import executor


def test_a_task_hands_its_memory_back_when_done(monkeypatch):
    real = executor.release_memory
    calls = []
    monkeypatch.setattr(executor, "release_memory", lambda: calls.append(1))
    assert executor._call(lambda x: x + 1, 1) == 2
    with pytest.raises(ZeroDivisionError):
        executor._call(lambda x: 1 / x, 0)
    assert calls == [1, 1]  # after a failure too
    assert real() is None  # glibc's malloc_trim here; nothing where there is none
    assert real() is None


def test_outcomes_are_let_go_once_yielded_whatever_the_number_of_tasks():
    """The caller of a stage whose tasks return images (the variability image's terms,
    48 MB per 2048^2 residual) holds one at a time: every future with its result stayed
    referenced until the last task ended, 1.4 GB for 30 residuals."""
    import gc
    import weakref

    import numpy as np

    refs = []
    with executor.LocalExecutor(2) as ex:
        for outcome in ex.run(np.ones, [(str(i), 50_000) for i in range(12)]):
            assert outcome.ok and outcome.value.shape == (50_000,)
            refs.append(weakref.ref(outcome.value))
            del outcome
            gc.collect()
            # only the outcome being handed over may still be held by the executor
            assert sum(r() is not None for r in refs[:-1]) == 0
    assert len(refs) == 12
