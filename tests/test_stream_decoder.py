"""UpbitStream's JSON decoder: orjson by default when it is installed (the ``fast`` extra), the
standard library's ``json`` otherwise, with the same messages and the same refusals."""

from __future__ import annotations

import ast
import builtins
import json
from pathlib import Path
from typing import Any

import pytest

from mds.layer1 import UpbitStream
from mds.layer1.stream import FrameParser, OrderbookMessage, TradeMessage

orjson = pytest.importorskip("orjson")  # in the test extra: CI runs these

DATA = Path(__file__).parent / "data"


def recorded_frames() -> list[bytes]:
    """The 449 binary frames of cryptofeed's Upbit recording (SIMPLE trades and orderbooks)."""
    lines = (DATA / "ws_trade_orderbook_simple_cryptofeed_2021.txt").read_text().splitlines()
    frames = [ast.literal_eval(ln.split(": ", 1)[1]) for ln in lines[2:] if ln]
    assert all(isinstance(f, bytes) for f in frames)
    return frames


def test_the_default_decoder_is_orjson_and_an_explicit_one_is_kept() -> None:
    assert UpbitStream(["KRW-BTC"])._parser.loads is orjson.loads
    assert UpbitStream(["KRW-BTC"], loads=json.loads)._parser.loads is json.loads


def test_without_orjson_the_default_is_the_standard_library(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_orjson(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "orjson":
            raise ImportError("No module named 'orjson'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_orjson)
    parser = UpbitStream(["KRW-BTC"])._parser
    assert parser.loads is FrameParser(lambda: 0).loads  # the parser's own json.loads
    assert parser.parse(b'{"ty":"trade","cd":"KRW-BTC","tp":NaN}') is None and parser.malformed == 1


def test_both_decoders_give_identical_messages_on_the_recorded_frames() -> None:
    frames = recorded_frames()
    with_json = FrameParser(lambda: 7)  # the json.loads fallback
    with_orjson = UpbitStream(["KRW-BTC"], clock=lambda: 7)._parser
    assert with_orjson.loads is orjson.loads
    kinds = {TradeMessage: 0, OrderbookMessage: 0}
    for frame in frames:
        a, b = with_json.parse(frame), with_orjson.parse(frame)
        assert a is not None and type(a) is type(b)
        # repr tells 1 from 1.0 and keeps the key order, which == on the fields would not
        assert repr(a) == repr(b)
        kinds[type(a)] += 1
        # the same text decoded from str (a text frame) gives the same message too
        assert repr(with_orjson.parse(frame.decode())) == repr(a)
    assert kinds == {TradeMessage: 304, OrderbookMessage: 145}
    assert with_json.malformed == with_orjson.malformed == 0
    assert with_json.unknown_fields == with_orjson.unknown_fields == 0


TRADE = {
    "ty": "trade",
    "cd": "KRW-BTC",
    "tms": 1_700_000_000_123,
    "tp": 50_000_000.0,
    "tv": 0.01,
    "ab": "BID",
    "ttms": 1_700_000_000_100,
    "sid": 17_000_000_001_000_000,
    "st": "REALTIME",
}


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["tp", "bap"])  # checked for finiteness by the parser, and not
def test_nan_and_infinity_are_refused_by_both_decoders(constant: str, field: str) -> None:
    frame = json.dumps({**TRADE, field: 1.5}).replace("1.5", constant).encode()
    assert constant in frame.decode()
    for parser in (FrameParser(lambda: 0), UpbitStream(["KRW-BTC"])._parser):
        assert parser.parse(frame) is None
        assert parser.malformed == 1
        good = parser.parse(json.dumps(TRADE).encode())
        assert isinstance(good, TradeMessage) and good.sequential_id == TRADE["sid"]


def test_both_decoders_refuse_a_number_beyond_a_double() -> None:
    """``1e400`` would be ``inf`` to a plain ``json.loads``: both decoders refuse the frame. An
    integer beyond 64 bits is a float to orjson, which the parser's type check refuses."""
    overflow = json.dumps({**TRADE, "bas": 1.5}).replace("1.5", "1e400").encode()
    slow = FrameParser(lambda: 0)
    assert slow.parse(overflow) is None and slow.malformed == 1
    fast = UpbitStream(["KRW-BTC"])._parser
    assert fast.parse(overflow) is None and fast.malformed == 1
    huge_id = json.dumps({**TRADE, "sid": 2**64}).encode()
    assert fast.parse(huge_id) is None and fast.malformed == 2
