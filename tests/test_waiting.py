"""The one wait loop (segsweep.waiting.poll), on a fake clock: no test here sleeps."""

from __future__ import annotations

import pytest

from segsweep import waiting


class FakeClock:
    """``time.monotonic`` and ``time.sleep`` for the module under test: sleeping moves it."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(waiting, "time", fake)
    return fake


def test_ready_at_once_never_sleeps(clock: FakeClock) -> None:
    assert waiting.poll(lambda: None, 10.0) is None
    assert clock.sleeps == []


def test_backs_off_doubling_to_the_cap_and_stops_when_ready(clock: FakeClock) -> None:
    answers = iter(["down", "down", "down", "down", None])
    told: list[tuple[str, float, int]] = []
    result = waiting.poll(
        lambda: next(answers), 100.0, delay_s=1.0, max_delay_s=4.0, on_wait=lambda *a: told.append(a)
    )
    assert result is None
    assert clock.sleeps == [1.0, 2.0, 4.0, 4.0]
    assert told == [("down", 1.0, 0), ("down", 2.0, 1), ("down", 4.0, 2), ("down", 4.0, 3)]


def test_gives_up_with_the_last_reason_before_sleeping_past_the_budget(clock: FakeClock) -> None:
    calls = iter(range(100))
    result = waiting.poll(lambda: f"refused {next(calls)}", 5.0, delay_s=1.0)
    # sleeps 1 and 2 fit in 5 s; the next (4) would end at 7, so it stops at 3 s, never past 5
    assert clock.sleeps == [1.0, 2.0]
    assert result == "refused 2"
    assert clock.now <= 5.0


def test_an_exception_from_the_probe_ends_the_wait(clock: FakeClock) -> None:
    def probe() -> str | None:
        raise RuntimeError("not worth retrying")

    with pytest.raises(RuntimeError, match="not worth retrying"):
        waiting.poll(probe, 100.0)
    assert clock.sleeps == []
