"""The concept-drift monitor on simulated error streams: rises found with honest change points and
estimates, falls ignored, quiet on stationary streams, cool-down."""

from __future__ import annotations

import numpy as np
import pytest

from streams.concept import ADWIN, PAGE_HINKLEY, UNIT_SPREAD, ConceptChange, ConceptMonitor


def _errors(rng: np.random.Generator, rates: list[tuple[float, int]]) -> list[float]:
    return [float(e) for rate, n in rates for e in rng.random(n) < rate]


def _run(monitor: ConceptMonitor, losses: list[float]) -> list[ConceptChange]:
    return [c for c in map(monitor.update, losses) if c is not None]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_rise_is_found_with_its_change_point_and_estimates(seed: int) -> None:
    rng = np.random.default_rng(seed)
    changes = _run(ConceptMonitor(), _errors(rng, [(0.1, 5000), (0.3, 2000)]))
    assert changes, "the rise from 10% to 30% errors was not found"
    first = changes[0]
    delay = first.seen - 5000
    assert 0 < delay < 600, first
    # the estimated change point is near the true one: delay_records counts from it to the alarm
    assert abs(first.delay_records - delay) < 150, first
    assert first.estimate_before == pytest.approx(0.1, abs=0.04)
    assert first.estimate_after == pytest.approx(0.3, abs=0.1)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_stationary_and_falling_error_streams_raise_nothing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    assert _run(ConceptMonitor(), _errors(rng, [(0.3, 30_000)])) == []
    # a model getting better is not drift
    assert _run(ConceptMonitor(), _errors(rng, [(0.4, 3000), (0.1, 3000)])) == []


def test_page_hinkley_reports_its_own_change_point() -> None:
    rng = np.random.default_rng(5)
    # ADWIN out of the way (a tiny delta): PageHinkley alone finds the slow, lasting rise
    monitor = ConceptMonitor(delta=1e-12, threshold=20.0, ph_delta=0.005)
    changes = _run(monitor, _errors(rng, [(0.1, 4000), (0.3, 3000)]))
    assert changes and changes[0].detector == PAGE_HINKLEY
    first = changes[0]
    assert abs(first.delay_records - (first.seen - 4000)) < 100, first
    assert first.estimate_before < 0.15 < 0.2 < first.estimate_after


def test_cooldown_keeps_quiet_after_an_alarm() -> None:
    rng = np.random.default_rng(7)
    losses = _errors(rng, [(0.05, 2000), (0.5, 300), (0.05, 200), (0.6, 2000)])
    quiet = ConceptMonitor(cooldown=10_000)
    changes = _run(quiet, losses)
    assert len(changes) == 1 and changes[0].detector == ADWIN
    assert len(_run(ConceptMonitor(cooldown=100), losses)) >= 2


def test_nothing_before_min_records() -> None:
    monitor = ConceptMonitor(min_records=500)
    assert _run(monitor, [0.0] * 200 + [1.0] * 250) == []


def test_a_loss_in_other_units_raises_the_same_alarms_and_a_unit_loss_is_fed_as_it_is() -> None:
    rng = np.random.default_rng(11)
    # a regressor's absolute errors (minutes): residual sd 5, then 7 from record 5,000
    errors = np.abs(np.concatenate([rng.normal(0, 5, 5000), rng.normal(0, 7, 3000)]))
    minutes, seconds = ConceptMonitor(), ConceptMonitor()
    in_minutes = [(c.seen, c.detector, c.delay_records) for c in _run(minutes, list(errors))]
    in_seconds = _run(seconds, list(errors * 60))
    assert in_minutes and in_minutes[0][0] > 5000, in_minutes
    assert [(c.seen, c.detector, c.delay_records) for c in in_seconds] == in_minutes
    assert in_seconds[0].estimate_after == pytest.approx(60 * in_minutes_after(errors), rel=0.2)
    assert seconds.scale == pytest.approx(60 * (minutes.scale or 0))
    unit = ConceptMonitor()
    _run(unit, _errors(rng, [(0.3, 200)]))
    assert unit.scale == 1.0  # a 0/1 error spreads no wider than a [0, 1] loss can


def in_minutes_after(errors: np.ndarray) -> float:
    return float(errors[5000:].mean())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_regressors_stationary_absolute_errors_raise_nothing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Unscaled, PageHinkley's threshold (100 in the loss's units) fires on errors of minutes within
    # a few hundred records.
    assert _run(ConceptMonitor(), list(np.abs(rng.normal(0, 5, 30_000)))) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_after_the_loss_fell_a_rise_is_watched_from_the_new_level(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # A regressor's absolute errors: untrained at first (minutes off by ~30), then learnt (sd 5), then a
    # new concept (sd 6.5). Watched from the untrained level (its scale, PageHinkley's mean) the rise is
    # found 460 to 650 records late on these seeds; from the learnt level, 240 to 300.
    errors = np.abs(
        np.concatenate([rng.normal(0, 30, 300), rng.normal(0, 5, 5000), rng.normal(0, 6.5, 3000)])
    )
    monitor = ConceptMonitor()
    changes = _run(monitor, list(errors))
    assert changes and 5300 < changes[0].seen < 5300 + 350, changes
    assert monitor.scale is not None and monitor.scale < 30 / UNIT_SPREAD / 2  # not the untrained spread
