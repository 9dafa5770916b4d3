import datetime as dt

import numpy as np
import pytest

from mds import InvalidRequestError, parse_timeframe
from mds.timeframes import TIMEFRAMES
from mds.timeutil import to_ms

UTC = dt.timezone.utc


def ms(*args: int) -> int:
    return to_ms(dt.datetime(*args, tzinfo=UTC))


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("1s", "1s"),
        ("second", "1s"),
        ("1m", "1m"),
        ("minute1", "1m"),
        ("3m", "3m"),
        ("minute3", "3m"),
        ("5m", "5m"),
        ("10m", "10m"),
        ("15m", "15m"),
        ("30m", "30m"),
        ("minute30", "30m"),
        ("60m", "1h"),
        ("minute60", "1h"),
        ("1h", "1h"),
        ("240m", "4h"),
        ("minute240", "4h"),
        ("4h", "4h"),
        ("1d", "1d"),
        ("day", "1d"),
        ("days", "1d"),
        ("DAY", "1d"),
        ("1w", "1w"),
        ("week", "1w"),
        ("1M", "1M"),
        ("month", "1M"),
        ("1mo", "1M"),
    ],
)
def test_aliases_normalise_to_one_canonical_name(alias: str, canonical: str) -> None:
    assert parse_timeframe(alias).name == canonical
    assert parse_timeframe(parse_timeframe(alias)) is TIMEFRAMES[canonical]


@pytest.mark.parametrize("bad", ["", "2m", "7m", "minute2", "1y", "1H", "m1", "1 m", "x" * 500, "１m"])
def test_unknown_timeframes_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_timeframe(bad)


@pytest.mark.parametrize("bad", [None, 1, 1.0, b"1m", ["1m"]])
def test_non_string_timeframes_are_rejected(bad: object) -> None:
    with pytest.raises(InvalidRequestError):
        parse_timeframe(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("1s", "seconds"),
        ("1m", "minutes/1"),
        ("1h", "minutes/60"),
        ("4h", "minutes/240"),
        ("1d", "days"),
        ("1w", "weeks"),
        ("1M", "months"),
    ],
)
def test_rest_paths(name: str, path: str) -> None:
    assert parse_timeframe(name).rest_path == path


def test_fixed_interval_floor_next_and_alignment() -> None:
    tf = parse_timeframe("15m")
    t = ms(2024, 2, 29, 23, 59, 59)
    assert tf.floor(t) == ms(2024, 2, 29, 23, 45)
    assert tf.next(t) == ms(2024, 3, 1)
    assert tf.is_aligned(ms(2024, 3, 1)) and not tf.is_aligned(ms(2024, 3, 1, 0, 1))
    assert tf.ceil(ms(2024, 3, 1, 0, 1)) == ms(2024, 3, 1, 0, 15)
    assert tf.count(ms(2024, 3, 1), ms(2024, 3, 1, 1)) == 4


def test_weeks_open_on_monday() -> None:
    tf = parse_timeframe("1w")
    # 2025-01-01 is a Wednesday; its week opened on Monday 2024-12-30 (across a year end).
    assert tf.floor(ms(2025, 1, 1, 12)) == ms(2024, 12, 30)
    assert tf.next(ms(2025, 1, 1)) == ms(2025, 1, 6)
    assert dt.datetime.fromtimestamp(tf.floor(ms(2026, 11, 26)) / 1000, UTC).weekday() == 0


@pytest.mark.parametrize(
    ("t", "floor", "nxt"),
    [
        ((2024, 2, 29, 13), (2024, 2, 1), (2024, 3, 1)),  # leap February
        ((2023, 2, 28, 23, 59), (2023, 2, 1), (2023, 3, 1)),
        ((2024, 12, 31, 23, 59, 59), (2024, 12, 1), (2025, 1, 1)),  # year end
        ((2025, 1, 31), (2025, 1, 1), (2025, 2, 1)),
        ((1969, 12, 15), (1969, 12, 1), (1970, 1, 1)),  # before the epoch
    ],
)
def test_calendar_months(t: tuple[int, ...], floor: tuple[int, ...], nxt: tuple[int, ...]) -> None:
    tf = parse_timeframe("1M")
    assert tf.floor(ms(*t)) == ms(*floor)
    assert tf.next(ms(*t)) == ms(*nxt)
    assert tf.add(ms(*floor), 12) == ms(floor[0] + 1, *floor[1:])


def test_vectorised_alignment_agrees_with_scalar() -> None:
    rng = np.random.default_rng(7)
    ts = rng.integers(ms(1990, 1, 1), ms(2030, 1, 1), 2000)
    for tf in TIMEFRAMES.values():
        grid = np.array([tf.floor(int(t)) for t in ts[:200]])
        assert tf.aligned(grid).all()
        assert (tf.aligned(ts[:200]) == np.array([tf.is_aligned(int(t)) for t in ts[:200]])).all()


def test_month_count_across_years() -> None:
    tf = parse_timeframe("1M")
    assert tf.count(ms(2023, 11, 15), ms(2024, 3, 1)) == 3  # Dec, Jan, Feb
    assert tf.count(ms(2024, 3, 1), ms(2024, 3, 1)) == 0
