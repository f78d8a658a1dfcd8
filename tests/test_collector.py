"""The garbage collector's schedule during a stage's steps (train/collector.py)."""
from __future__ import annotations

import gc

import pytest

from accelbench.train.collector import ScheduledCollector


@pytest.fixture
def generations():
    """The generation of every collection that runs while the test does."""
    seen: list[int] = []

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(note)
    yield seen
    gc.callbacks.remove(note)


def test_steps_collect_young_generations_on_schedule_only(generations):
    assert gc.isenabled()
    with ScheduledCollector(every=3) as collector:
        collector.start()
        assert not gc.isenabled()
        assert gc.get_freeze_count() > 0  # what existed before the first step is frozen
        generations.clear()
        for n in range(1, 7):
            collector.before_step(n)
            _ = [[i] for i in range(5000)]  # allocations that would trigger automatic collections
        assert generations == [1, 1]  # steps 3 and 6, young generations only
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_after_compile_freezes_what_the_compile_left():
    with ScheduledCollector() as collector:
        collector.start()
        before = gc.get_freeze_count()
        graphs = [[i] for i in range(1000)]  # tracked by the collector, as graphs are
        collector.after_compile()
        assert gc.get_freeze_count() >= before + len(graphs)
    assert gc.get_freeze_count() == 0


def test_collector_is_set_back_when_the_stage_fails():
    with pytest.raises(RuntimeError, match="out of memory"):
        with ScheduledCollector() as collector:
            collector.start()
            raise RuntimeError("out of memory")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_collector_left_disabled_if_it_was():
    gc.disable()
    try:
        with ScheduledCollector() as collector:
            collector.start()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="give 1 or more"):
        ScheduledCollector(every=0)
