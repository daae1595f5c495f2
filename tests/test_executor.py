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
