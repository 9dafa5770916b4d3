"""Issue 19 on a PostgreSQL history: ``Store.series()``, ``iter_candles`` and a Parquet dataset
round trip (SQLite -> dataset -> PostgreSQL) with its gap kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import mds
from mds.testing import generate_market
from mds.timeutil import to_ms

MIN = 60_000
T0 = to_ms("2024-12-31T12:00:00Z")
T1 = T0 + 86_400_000
COVERED_TO = T0 + 600 * MIN


def _clock() -> int:
    return T1 + 86_400_000


def test_series_iter_candles_and_a_dataset_round_trip_on_postgres(tmp_path: Path, pg_url: str) -> None:
    arr = generate_market("KRW-MED", "1m", T0, T1, liquidity="illiquid", seed=8)
    with mds.open(tmp_path / "sqlite", clock=_clock) as src:
        cut = int(np.searchsorted(arr["ts"], COVERED_TO))
        src.write_candles("KRW-MED", "1m", arr[:cut], complete=(T0, COVERED_TO))
        src.write_candles("KRW-MED", "1m", arr[cut + 20 :])
        src.export_dataset(tmp_path / "ds")
        want_series = src.series()
        want_gaps = src.gaps("KRW-MED", "1m")
        want_rows = src.candles("KRW-MED", "1m", start=T0, end=T1)
    assert {g.kind for g in want_gaps} == {"missing", "no_trades"}
    with mds.open(tmp_path / "pg", clock=_clock, history=pg_url) as pg:
        assert pg.series() == []
        pg.import_dataset(tmp_path / "ds")
        assert pg.series() == want_series
        assert pg.gaps("KRW-MED", "1m") == want_gaps
        chunks = list(pg.iter_candles("KRW-MED", "1m", start=T0, end=T1, chunk=97))
        assert np.concatenate(chunks).tobytes() == want_rows.tobytes()
        pg.export_dataset(tmp_path / "ds2")
    with mds.open(tmp_path / "back", clock=_clock) as back:
        back.import_dataset(tmp_path / "ds2")
        assert back.series() == want_series and back.gaps("KRW-MED", "1m") == want_gaps
