"""FakeUpbit enforces Upbit's request limits as Upbit does (issue 18): per group and window, 429
over the limit; after repeated 429s the IP is blocked, every request answered 418 with a message
naming the duration, until the block ends."""

from __future__ import annotations

import time

import httpx
import pytest

from mds.errors import InvalidRequestError
from mds.testing import FakeUpbit, generate_market
from mds.timeutil import to_ms

T0 = to_ms("2025-01-01T00:00:00Z")
BTC = generate_market("KRW-BTC", "1m", T0, T0 + 86_400_000, seed=5)
CANDLES = "/v1/candles/minutes/1"


def get(c: httpx.Client, up: FakeUpbit, path: str = CANDLES) -> httpx.Response:
    return c.get(up.base_url + path, params={"market": "KRW-BTC"} if "candles" in path else {"markets": "KRW-BTC"})


def test_repeated_429s_block_every_group_with_418_naming_the_duration_until_it_ends() -> None:
    with FakeUpbit({("KRW-BTC", "1m"): BTC}, rate_window_s=30.0, ban_after=3, ban_s=0.5) as up, httpx.Client() as c:
        assert [get(c, up).status_code for _ in range(13)] == [200] * 10 + [429] * 3
        blocked = [get(c, up), get(c, up, "/v1/ticker")]  # the block is the IP's, not the group's
        assert [r.status_code for r in blocked] == [418, 418]
        assert all("blocked for 1 seconds" in r.json()["error"]["message"] for r in blocked)
        time.sleep(0.6)  # past the block
        assert get(c, up, "/v1/ticker").status_code == 200
        assert get(c, up).status_code == 429  # the candle window (30 s) is still full
        assert up.status_counts() == {200: 11, 429: 4, 418: 2}


def test_without_ban_after_a_client_only_ever_gets_429() -> None:
    with FakeUpbit({("KRW-BTC", "1m"): BTC}, rate_window_s=30.0, ban_after=None) as up, httpx.Client() as c:
        assert [get(c, up).status_code for _ in range(40)] == [200] * 10 + [429] * 30


def test_429s_spread_wider_than_ban_window_do_not_block() -> None:
    with FakeUpbit({("KRW-BTC", "1m"): BTC}, rate_window_s=30.0, ban_after=2, ban_window_s=0.1) as up:
        with httpx.Client() as c:
            codes = [get(c, up).status_code for _ in range(11)]
            for _ in range(2):  # each 429 alone in its ban window: no block (else the last is 418)
                time.sleep(0.15)
                codes.append(get(c, up).status_code)
        assert codes == [200] * 10 + [429] * 3


def test_injected_429s_do_not_count_towards_a_block() -> None:
    with FakeUpbit({("KRW-BTC", "1m"): BTC}, ban_after=2) as up, httpx.Client() as c:
        up.inject("rate_limit", times=5)
        assert [get(c, up).status_code for _ in range(6)] == [429] * 5 + [200]


def test_ban_after_must_be_positive() -> None:
    with pytest.raises(InvalidRequestError, match="ban_after"):
        FakeUpbit({("KRW-BTC", "1m"): BTC}, ban_after=0)
