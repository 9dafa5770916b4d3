"""The chunk codec of old history (issue 20): how codec 2 was chosen, and its gate.

(a) Per chunk (1,024 rows of generated KRW-BTC 1m candles): encode and decode time of codec 1
(int64 delta of every word, byte shuffle in numpy, zlib 6) and codec 2 (the same delta row by
row, padded to 8 rows with the row count last, in a python-blosc chunk of 56-byte items with bit
shuffle and LZ4HC 9, then a CRC-32); ``extra_info`` carries the stored bytes and the size ratio
to codec 1 over a realistic set (generated KRW-, BTC- and USDT-quoted markets, liquid and
illiquid, 1m and 1d, and the recorded KRW-BTC 1m page of shared/data/upbit): in total, per data
set and for the worst data set and chunk.

(b) The candidates measured before choosing: python-blosc (c-blosc 1.x, what mds depends on)
over the delta laid out row by row (56-byte items) or column by column (8-byte items), byte or
bit shuffle, Zstandard 1/3/5/7, LZ4HC 5/9, LZ4 5; the column layout without its padding; and,
where their libraries are installed (mds does not depend on them; each skips otherwise),
python-blosc2, ``zstandard`` and ``lz4``. Decode time per chunk, once for one chunk decoded
again and again and once for every chunk of the realistic set in turn (as a backtest walks
history); encode time and the size ratios in ``extra_info``. The rule: the fastest to decode
among those at least as small as codec 1 in total and on every data set. Five runs on a loaded
2-core machine (medians; sizes over codec 1: total / worst data set):

- codec 1: 1.000, 194 us one chunk, 127 us in turn, encode 1.3 ms.
- rows, bit shuffle, LZ4HC 9 (chosen): 0.904 / 0.963, 31 us, 24 us, encode 0.21 ms; LZ4HC 5
  decodes alike and is larger (0.906). Codec 2 itself, with its CRC and checks: 38 us, 29 us.
- columns, bit shuffle, Zstandard 3/5/7: 0.90 / 0.96, 33-34 us, 29 us; in the gate below a read
  of Zstandard chunks took 1.85-1.89x the raw read against 1.64-1.68x for LZ4HC (no CRC either).
- rows, bit shuffle, Zstandard 3/5/7: 0.89-0.90 / 0.95-0.97, 42 us, 34-36 us.
- byte shuffle: only Zstandard 7 qualifies (0.97-0.98 / 0.99), 54-59 us, 34-39 us.
- LZ4HC or LZ4 over 8-byte columns: 1.06-1.29 in total, 1.36-1.79 on a data set (c-blosc 1.x
  splits items of up to 16 bytes into byte streams for LZ4, and no setting of python-blosc turns
  it off); LZ4 over rows: 0.975 / 1.055.
- columns without padding, bit shuffle, Zstandard 5: 0.931 / 1.040 (c-blosc 1.x copies a block
  that is not whole groups of 8 items unshuffled: most short chunks).
- python-blosc2 over columns without split, LZ4HC 9: 0.910 / 0.972, 22 us, 18 us; not chosen
  because python-blosc2 brings about 15 packages into every install.

(c) The gate: a backtest's walk, 50 consecutive 1,000-candle ranges each read through the public
API (``store.candles(sym, "1m", start=, end=)``, a store with the SQLite tier only, so SQLite
answers) from compressed history against the same walk over uncompressed history, timed in
interleaved rounds of the same run; asserts that both the ratio of the lower quartiles
(``_gate.ratio_gate``, like every gate) and ``median(compressed) / median(uncompressed)`` are at
most 2.0 (issue 20's "within 2x"). The walk covers about 50 chunks, more than a process keeps
decoded (``_chunks._DECODED_MAX``), so each round decodes every chunk once.

Until 2026-12-02 the gate read one range crossing two chunks again and again: 1.69-1.82 on the
first machine, 2.36-2.55 with the numpy delta sum, 1.41-1.56 with the compiled ``undelta_rows``;
on the machines of 2026-12-02 2.15-2.21 (decompressing a chunk takes 21 us there, the whole read
of raw chunks 53 us), so CI failed it. Since decoded chunks are kept for the next read of the
same bytes, that read decodes nothing and measures the cache, so the gate walks instead, as the
issue's backtest does (pinned, 2026-12-02): 1.33-1.36 (quartiles and medians, three runs);
without the kept chunks, the same walk: 1.64-1.66.
Under ``--benchmark-disable`` it runs both walks once and asserts no ratio. Run::

    python -m pytest benches/bench_codec.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _gate import gate, ratio_gate

import mds
from mds import Config
from mds._dtypes import CANDLE_DTYPE
from mds.convert import candles_from_upbit
from mds.testing import generate_market
from mds.tiers._chunks import (
    CHUNK_SLOTS,
    CODEC_BLOSC_DELTA_BITSHUFFLE_LZ4HC as CODEC_2,
    CODEC_ZLIB_DELTA_SHUFFLE as CODEC_1,
    ROW,
    _blosc,
    _padded_rows,
    decode,
    encode,
    sum_rows,
)
from mds.tiers.sqlite import SqliteStore
from mds.timeframes import DAY_MS, MINUTE_MS, parse_timeframe

SYM = "KRW-BTC"
T0 = 1_700_000_000_000 - 1_700_000_000_000 % (CHUNK_SLOTS * MINUTE_MS)
REAL_1M = Path(__file__).resolve().parents[2] / "shared" / "data" / "upbit" / "krw-btc_1m_smtm_raw200.json"
GATE_LIMIT = 2.0

Codec = tuple[Callable[[np.ndarray], bytes], Callable[[bytes], Any]]


def _chunks_of(a: np.ndarray, tf_name: str) -> list[np.ndarray]:
    tf = parse_timeframe(tf_name)
    k = (a["ts"] - tf.origin_ms) // (tf.interval_ms * CHUNK_SLOTS)
    return [np.ascontiguousarray(a[k == u]) for u in np.unique(k)]


def _realistic() -> dict[str, list[np.ndarray]]:
    """Data sets of chunks, by name: three days of 1m candles for each market and liquidity,
    2,000 days of 1d candles, the recorded page."""
    sets: dict[str, list[np.ndarray]] = {}
    for i, sym in enumerate(("KRW-BTC", "KRW-XRP", "BTC-ETH", "BTC-XRP", "USDT-BTC")):
        for liquidity in ("liquid", "illiquid"):
            a = generate_market(sym, "1m", T0 - 3 * DAY_MS, T0, liquidity=liquidity, seed=i)
            sets[f"1m {sym} {liquidity}"] = _chunks_of(a, "1m")
    sets["1d KRW-ETH"] = _chunks_of(generate_market("KRW-ETH", "1d", T0 - 2000 * DAY_MS, T0, seed=4), "1d")
    if REAL_1M.exists():
        sets["recorded KRW-BTC 1m"] = [np.sort(candles_from_upbit(json.loads(REAL_1M.read_text())), order="ts")]
    return sets


@pytest.fixture(scope="module")
def realistic() -> dict[str, list[np.ndarray]]:
    return _realistic()


@pytest.fixture(scope="module")
def chunk() -> np.ndarray:
    a = generate_market(SYM, "1m", T0, T0 + CHUNK_SLOTS * MINUTE_MS, seed=1)
    assert len(a) == CHUNK_SLOTS
    return a


def _size_ratios(enc: Callable[[np.ndarray], bytes], sets: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """Stored bytes of ``enc`` over codec 1's: in total, per data set, the worst data set and
    the worst single chunk."""
    mine = {k: [len(enc(c)) for c in v] for k, v in sets.items()}
    base = {k: [len(encode(c, CODEC_1)) for c in v] for k, v in sets.items()}
    per_set = {k: round(sum(mine[k]) / sum(base[k]), 4) for k in sets}
    return {
        "size_ratio_to_codec_1": round(sum(map(sum, mine.values())) / sum(map(sum, base.values())), 4),
        "worst_set_ratio": max(per_set.values()),
        "worst_chunk_ratio": round(max(m / b for k in sets for m, b in zip(mine[k], base[k])), 4),
        "raw_over_stored": round(sum(c.nbytes for v in sets.values() for c in v) / sum(map(sum, mine.values())), 3),
        "set_ratios": per_set,
    }


# ---------------------------------------------------------------------------------- (a) per chunk
@pytest.mark.benchmark(group="codec-chunk-encode")
@pytest.mark.parametrize("codec", [CODEC_1, CODEC_2])
def test_encode_one_chunk(
    benchmark: Any, chunk: np.ndarray, realistic: dict[str, list[np.ndarray]], codec: int
) -> None:
    data = benchmark(encode, chunk, codec)
    assert decode(codec, data).tobytes() == chunk.tobytes()
    benchmark.extra_info.update(codec=codec, rows=len(chunk), stored_bytes=len(data))
    benchmark.extra_info.update(_size_ratios(lambda c: encode(c, codec), realistic))


@pytest.mark.benchmark(group="codec-chunk-decode")
@pytest.mark.parametrize("codec", [CODEC_1, CODEC_2])
def test_decode_one_chunk(benchmark: Any, chunk: np.ndarray, codec: int) -> None:
    data = encode(chunk, codec)
    got = benchmark(decode, codec, data)
    assert got.tobytes() == chunk.tobytes()
    benchmark.extra_info.update(codec=codec, rows=len(chunk), stored_bytes=len(data))


def test_codec_2_is_smaller_than_codec_1_in_total_and_on_every_data_set(
    realistic: dict[str, list[np.ndarray]],
) -> None:
    ratios = _size_ratios(lambda c: encode(c, CODEC_2), realistic)
    assert ratios["size_ratio_to_codec_1"] < 1.0
    assert ratios["worst_set_ratio"] <= 1.0, ratios["set_ratios"]


# ------------------------------------------------------------------------------- (b) candidates
def _delta(a: np.ndarray) -> np.ndarray:
    w = a.view("<i8").reshape(-1, 7)
    d = w.copy()
    d[1:] -= w[:-1]
    return d


def _planes(a: np.ndarray) -> bytes:
    """Codec 1's filter (delta of every word, byte shuffle in numpy) without its zlib."""
    return np.ascontiguousarray(_delta(a).view(np.uint8).reshape(len(a), ROW).T).tobytes()


def _unplanes(raw: bytes) -> np.ndarray:
    planes = np.frombuffer(raw, dtype=np.uint8)
    n = len(planes) // ROW
    words = np.ascontiguousarray(planes.reshape(ROW, n).T).view(np.int64)
    return np.cumsum(words, axis=0).view(CANDLE_DTYPE).reshape(n)


def _layout(a: np.ndarray, layout: str) -> np.ndarray:
    """The words compressed by a python-blosc candidate: ``rows`` (codec 2's: the delta row by
    row, padded to 8 rows with the count last), ``columns`` (the same words column by column,
    then the count, padded to 8 words), ``columns unpadded``."""
    n = len(a)
    if layout == "rows":
        buf = np.zeros((_padded_rows(n), 7), "<i8")
        buf[:n] = _delta(a)
        buf[-1, 0] = n
        return buf.reshape(-1)
    if layout == "columns unpadded":
        return np.ascontiguousarray(_delta(a).T).reshape(-1)
    buf = np.zeros(7 * n // 8 * 8 + 8, "<i8")
    buf[: 7 * n] = _delta(a).T.reshape(-1)
    buf[-1] = n
    return buf


def _unlayout(words: np.ndarray, layout: str) -> np.ndarray:
    """The rows (n x 7 words) of a decompressed ``layout``, the delta undone as codec 2 does."""
    if layout == "rows":
        rows = words.reshape(-1, 7)[: int(words[-7])]
        sum_rows(rows)
        return rows
    n = len(words) // 7 if layout == "columns unpadded" else int(words[-1])
    cols = words[: 7 * n].reshape(7, n)
    np.cumsum(cols, axis=1, out=cols)
    return np.ascontiguousarray(cols.T)


def _blosc_variant(layout: str, shuffle: str, cname: str, level: int) -> Codec:
    """python-blosc (c-blosc 1.x) over a ``layout`` of the delta: 56-byte items (one row) for
    ``rows``, else 8-byte items (one word)."""
    b = _blosc()
    sh = getattr(b, shuffle)
    typesize = ROW if layout == "rows" else 8

    def dec(data: bytes) -> np.ndarray:  # into a buffer of its own, as codec 2 does
        words = np.empty(b.get_cbuffer_sizes(data)[0] // 8, "<i8")
        b.decompress_ptr(data, words.ctypes.data)
        return _unlayout(words, layout)

    return (lambda a: bytes(b.compress(_layout(a, layout).tobytes(), typesize, level, sh, cname))), dec


def _blosc2_variant(codec: str, level: int) -> Codec:
    """python-blosc2 over the bare delta columns: bit shuffle, no stream split (if installed)."""
    b2 = pytest.importorskip("blosc2")
    args = {
        "typesize": 8,
        "clevel": level,
        "codec": getattr(b2.Codec, codec),
        "filters": [b2.Filter.BITSHUFFLE],
        "splitmode": b2.SplitMode.NEVER_SPLIT,
        "nthreads": 1,
    }

    def dec(data: bytes) -> np.ndarray:
        words = np.empty(int.from_bytes(data[4:8], "little") // 8, "<i8")
        b2.decompress2(data, dst=words, nthreads=1)
        return _unlayout(words, "columns unpadded")

    return (lambda a: bytes(b2.compress2(_layout(a, "columns unpadded"), **args))), dec


def _candidate(name: str) -> Codec:
    if name == "codec 1: numpy delta + byte shuffle + zlib 6":
        return (lambda a: encode(a, CODEC_1)), (lambda b: decode(CODEC_1, b))
    if name.startswith("codec 2: "):
        return (lambda a: encode(a, CODEC_2)), (lambda b: decode(CODEC_2, b))
    if name.startswith("blosc "):  # "blosc LAYOUT SHUFFLE CNAME LEVEL"
        *layout, shuffle, cname, level = name.split()[1:]
        return _blosc_variant(" ".join(layout), shuffle, cname, int(level))
    if name.startswith("blosc2 columns unpadded BITSHUFFLE "):
        return _blosc2_variant(name.split()[-2].upper(), int(name.split()[-1]))
    if name == "numpy delta + byte shuffle + zstandard 3":
        zstd = pytest.importorskip("zstandard")
        c, d = zstd.ZstdCompressor(level=3), zstd.ZstdDecompressor()
        return (lambda a: c.compress(_planes(a))), (lambda b: _unplanes(d.decompress(b)))
    if name == "numpy delta + byte shuffle + lz4":
        block = pytest.importorskip("lz4.block")
        return (lambda a: block.compress(_planes(a))), (lambda b: _unplanes(block.decompress(b)))
    raise ValueError(name)


_SETTINGS = ("zstd 1", "zstd 3", "zstd 5", "zstd 7", "lz4hc 5", "lz4hc 9", "lz4 5")
CANDIDATES = [
    "codec 1: numpy delta + byte shuffle + zlib 6",
    "codec 2: blosc rows BITSHUFFLE lz4hc 9, then a CRC-32",  # the chosen setting
    *[f"blosc {lay} {s} {c}" for lay in ("rows", "columns") for s in ("SHUFFLE", "BITSHUFFLE") for c in _SETTINGS],
    "blosc columns unpadded BITSHUFFLE zstd 5",  # c-blosc 1.x leaves most short chunks unshuffled
    "blosc2 columns unpadded BITSHUFFLE lz4hc 9",  # the earlier codec 2 (python-blosc2)
    "blosc2 columns unpadded BITSHUFFLE zstd 5",
    "numpy delta + byte shuffle + zstandard 3",
    "numpy delta + byte shuffle + lz4",
]


@pytest.mark.benchmark(group="codec-candidates-decode")
@pytest.mark.parametrize("name", CANDIDATES)
def test_candidate_decode_one_chunk(
    benchmark: Any, chunk: np.ndarray, realistic: dict[str, list[np.ndarray]], name: str
) -> None:
    enc, dec = _candidate(name)
    data = enc(chunk)
    got = benchmark(dec, data)
    assert np.asarray(got).view(np.uint8).tobytes() == chunk.tobytes()
    for c in realistic["1m KRW-BTC illiquid"]:  # short chunks too
        assert np.asarray(dec(enc(c))).view(np.uint8).tobytes() == c.tobytes()
    if not benchmark.disabled:
        t: list[float] = []
        for _ in range(30):
            t0 = time.perf_counter()
            enc(chunk)
            t.append(time.perf_counter() - t0)
        benchmark.extra_info["encode_us"] = round(statistics.median(t) * 1e6, 1)
        benchmark.extra_info.update(_size_ratios(enc, realistic))
        # decoding each chunk of the realistic set in turn, as a backtest walks history: caches
        # no longer hold one chunk's stream and the decompressor's state (costly for Zstandard)
        datas = [enc(c) for v in realistic.values() for c in v]
        passes: list[float] = []
        for _ in range(9):
            t0 = time.perf_counter()
            for d in datas:
                dec(d)
            passes.append((time.perf_counter() - t0) / len(datas))
        benchmark.extra_info["decode_us_each_chunk_in_turn"] = round(statistics.median(passes) * 1e6, 1)


# --------------------------------------------------------------------------------------- (c) gate
RANGE_ROWS = 1_000
#: The gate walks WALK_RANGES consecutive ranges, as a backtest does: about 49 chunks, far more
#: than the decoded chunks a process keeps (``_chunks._DECODED_MAX``), so every round decodes
#: each chunk once, as a walk over a long history does.
WALK_RANGES = 50
HISTORY_DAYS = 40


def _chunk_figures(path: Path) -> tuple[int, int, int]:
    """(raw, compressed, in an older codec) chunk counts: the tier's own figures (the store does
    not report codecs)."""
    s = SqliteStore(path / "candles.sqlite3", readonly=True, maintenance_interval_s=None)
    try:
        st = s.stats()
        return st["chunks_raw"], st["chunks_compressed"], st["chunks_older_codec"]
    finally:
        s.close()


def _sqlite_hits(st: mds.Store) -> int:
    return int(st.stats()["hits"]["sqlite_db"])


@pytest.fixture(scope="module")
def range_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[mds.Store, mds.Store, int, int]]:
    """Two stores holding the same KRW-BTC 1m history, SQLite tier only: one as written (raw
    chunks), one whose clock stands a year later and that ran ``maintain()`` (codec-2 chunks)."""
    a = generate_market(SYM, "1m", T0, T0 + HISTORY_DAYS * DAY_MS, seed=1)
    start = int(a["ts"][2_000])
    end = start + WALK_RANGES * RANGE_ROWS * MINUTE_MS
    assert len(a) >= 2_000 + WALK_RANGES * RANGE_ROWS
    want = a[(a["ts"] >= start) & (a["ts"] < end)]
    stores = []
    for name, later in (("raw", 0), ("compressed", 365 * DAY_MS)):
        path = tmp_path_factory.mktemp(f"range_{name}")
        now = [int(a["ts"][-1]) + 30_000]
        keep_raw = {} if later else {"compress_after_days": 10 * HISTORY_DAYS}
        st = mds.open(path, config=Config(tiers=("sqlite",), **keep_raw), clock=lambda now=now: now[0])
        st.write_candles(SYM, "1m", a)
        now[0] += later
        st.maintain()
        raw, packed, older = _chunk_figures(path)
        assert older == 0 and (raw == 0 < packed if later else packed == 0 < raw), (name, raw, packed)
        for _ in range(2):
            hits = _sqlite_hits(st)
            got = _walk(st, start)
            assert got.tobytes() == want.tobytes() and _sqlite_hits(st) == hits + WALK_RANGES  # SQLite answered
        stores.append(st)
    yield stores[0], stores[1], start, end
    for st in stores:
        st.close()


def _walk(st: mds.Store, start: int) -> np.ndarray:
    """WALK_RANGES consecutive 1,000-candle ranges from ``start``, each one ``candles()`` call."""
    step = RANGE_ROWS * MINUTE_MS
    return np.concatenate(
        [st.candles(SYM, "1m", start=start + k * step, end=start + (k + 1) * step) for k in range(WALK_RANGES)]
    )


@gate
@pytest.mark.benchmark(group="codec-range-1000")
def test_gate_range_1000_from_compressed_history(
    benchmark: Any, range_stores: tuple[mds.Store, mds.Store, int, int]
) -> None:
    raw, packed, start, end = range_stores
    chunks = len({(t - T0) // (CHUNK_SLOTS * MINUTE_MS) for t in range(start, end, MINUTE_MS)})
    benchmark.extra_info.update(rows=RANGE_ROWS, ranges=WALK_RANGES, chunks_touched=chunks, codec=CODEC_2)
    ratio_gate(
        benchmark,
        lambda: _walk(packed, start),
        lambda: _walk(raw, start),
        limit=GATE_LIMIT,
        rounds=41,
        number=1,
        what=f"{WALK_RANGES} consecutive 1,000-candle ranges from codec-2 history vs from raw chunks "
        "(SQLite tier, public API)",
    )
    if not benchmark.disabled:  # ratio_gate holds the lower quartiles; the target is on the medians too
        median_ratio = benchmark.extra_info["median_ratio"]
        assert median_ratio <= GATE_LIMIT, f"median(compressed) / median(raw) {median_ratio} > {GATE_LIMIT}"
