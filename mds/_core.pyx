# cython: language_level=3
"""Compiled kernels of mds (the twin of ``mds/_pycore.py``: same names, same results).

Each ``def`` entry point checks dtypes and shapes and allocates its outputs with the GIL held,
then releases the GIL for its loops over typed ``const`` memoryviews, calling small
``cdef ... noexcept nogil`` helpers. Rows move as raw 56-byte records (``memcpy``), never field
by field. Directives (boundscheck, wraparound, cdivision) come from setup.py; every division by
a value that may be negative goes through the floor helpers below, so the results do not depend
on ``cdivision``.

Import kernels through :mod:`mds._kernels`; see docs/ARCHITECTURE.md, "Kernel interface".
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_SetFromErrno
from cpython.object cimport PyObject, PyObject_GenericSetAttr, PyTypeObject
from cpython.ref cimport Py_INCREF, Py_REFCNT
from libc.stdint cimport int64_t, uint32_t, uint64_t, uint8_t, INT64_MAX, INT64_MIN
from libc.math cimport INFINITY
from libc.string cimport memcpy, memcmp, memmove
from libc.stdlib cimport calloc, malloc, realloc, free

cimport cython
cimport numpy as cnp
import numpy as np
import time

from mds._dtypes import CANDLE_DTYPE as _CANDLE
from mds.errors import InvalidRequestError

IMPLEMENTATION = "cython"

# Reason codes are defined once, by the twin; the loops below use the same numbers.
from mds._pycore import CHUNK_KEY_MAX, REASONS, ChunkCorrupt

cdef struct Candle:
    int64_t ts
    double open
    double high
    double low
    double close
    double volume
    double value

cdef int64_t DAY_MS = 86_400_000
# Day numbers whose midnight is representable in int64 ms: ceil(MIN / DAY) .. floor(MAX / DAY).
cdef int64_t MIN_DAY = -106751991167
cdef int64_t MAX_DAY = 106751991167
cdef uint64_t EXP_MASK = 0x7FF0000000000000ULL

_EMPTY_RANGES = np.zeros((0, 2), dtype=np.int64)
_EMPTY_RANGES.flags.writeable = False


cdef tuple _struct_layout():
    cdef Candle c
    cdef char* base = <char*>&c
    return (
        sizeof(Candle),
        {
            "ts": <char*>&c.ts - base,
            "open": <char*>&c.open - base,
            "high": <char*>&c.high - base,
            "low": <char*>&c.low - base,
            "close": <char*>&c.close - base,
            "volume": <char*>&c.volume - base,
            "value": <char*>&c.value - base,
        },
    )


def _check_layout():
    """Raise ImportError unless the Candle struct matches CANDLE_DTYPE (size and offsets)."""
    size, offsets = _struct_layout()
    expected = {name: _CANDLE.fields[name][1] for name in _CANDLE.names}
    if size != _CANDLE.itemsize or offsets != expected or sizeof(mds_row) != size:
        raise ImportError(f"mds._core: Candle struct {size} {offsets} does not match CANDLE_DTYPE")


_check_layout()
cnp.import_array()


# ---------------------------------------------------------------------------------------------
# argument checks (GIL held)
# ---------------------------------------------------------------------------------------------
cdef object _candles(object arr, str name):
    """``arr`` as a C-contiguous 1-D CANDLE_DTYPE array (itself when it is one already); read
    through numpy's C API: this check runs on every kernel call, a live-edge write's included."""
    if type(arr) is not np.ndarray and not isinstance(arr, np.ndarray):
        raise InvalidRequestError(f"{name} must be a 1-D CANDLE_DTYPE array, got {type(arr).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>arr
    cdef cnp.dtype dt = a.descr
    if (dt is not _CANDLE and dt != _CANDLE) or cnp.PyArray_NDIM(a) != 1:
        raise InvalidRequestError(f"{name} must be a 1-D CANDLE_DTYPE array, got {dt}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        return np.ascontiguousarray(arr)
    return arr


cdef Candle* _ptr(object arr) except? NULL:
    """Data pointer of a writeable C-contiguous CANDLE_DTYPE array (NULL when empty)."""
    cdef Candle[::1] mv = arr
    if mv.shape[0] == 0:
        return NULL
    return &mv[0]


cdef inline const Candle* _rows(const Candle[::1] mv) noexcept nogil:
    if mv.shape[0] == 0:
        return NULL
    return &mv[0]


cdef tuple _grid(object interval_ms, object origin_ms, object is_month):
    cdef bint month = bool(is_month)
    cdef int64_t iv = interval_ms
    cdef int64_t org = origin_ms
    if not month and iv <= 0:
        raise InvalidRequestError(f"interval_ms must be positive, got {iv}")
    return iv, org, month


# Interval-set arguments are checked by the twin's helper: not a hot path, one definition.
from mds._pycore import _ranges


# ---------------------------------------------------------------------------------------------
# integer helpers (nogil)
# ---------------------------------------------------------------------------------------------
cdef inline int64_t _fdiv(int64_t a, int64_t b) noexcept nogil:
    """Floor division for b > 0."""
    cdef int64_t q = a // b
    if (a % b) < 0:
        q -= 1
    return q


cdef inline int64_t _fmod(int64_t a, int64_t b) noexcept nogil:
    """Floor modulo for b > 0."""
    cdef int64_t r = a % b
    if r < 0:
        r += b
    return r


cdef inline int64_t _day_of_month(int64_t days) noexcept nogil:
    cdef int64_t z = days + 719468
    cdef int64_t era = _fdiv(z, 146097)
    cdef int64_t doe = z - era * 146097
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64_t mp = (5 * doy + 2) // 153
    return doy - (153 * mp + 2) // 5 + 1


cdef inline int64_t _month_index(int64_t ts) noexcept nogil:
    """Months since 1970-01 of the month containing ``ts``."""
    cdef int64_t z = _fdiv(ts, DAY_MS) + 719468
    cdef int64_t era = _fdiv(z, 146097)
    cdef int64_t doe = z - era * 146097
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64_t mp = (5 * doy + 2) // 153
    cdef int64_t m = mp + 3 if mp < 10 else mp - 9
    cdef int64_t y = yoe + era * 400 + (1 if m <= 2 else 0)
    return (y - 1970) * 12 + (m - 1)


cdef inline int64_t _month_start(int64_t mi) noexcept nogil:
    """Epoch ms of month index ``mi`` (days-from-civil), saturated to the int64 range."""
    cdef int64_t y = 1970 + _fdiv(mi, 12)
    cdef int64_t m = _fmod(mi, 12) + 1
    if m <= 2:
        y -= 1
    cdef int64_t era = _fdiv(y, 400)
    cdef int64_t yoe = y - era * 400
    cdef int64_t doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    cdef int64_t days = era * 146097 + doe - 719468
    if days > MAX_DAY:
        return INT64_MAX
    if days < MIN_DAY:
        return INT64_MIN
    return days * DAY_MS


cdef inline bint _month_aligned(int64_t ts) noexcept nogil:
    return _fmod(ts, DAY_MS) == 0 and _day_of_month(_fdiv(ts, DAY_MS)) == 1


cdef inline int64_t _ceil_slot(int64_t t, int64_t iv, int64_t org, bint month) noexcept nogil:
    """First aligned slot ``>= t``, saturated at INT64_MAX."""
    cdef int64_t off
    if month:
        return t if _month_aligned(t) else _month_start(_month_index(t) + 1)
    off = _fmod(_fmod(t, iv) - _fmod(org, iv), iv)
    if off == 0:
        return t
    if t > INT64_MAX - (iv - off):
        return INT64_MAX
    return t + (iv - off)


cdef inline bint _is_finite(double x) noexcept nogil:
    cdef uint64_t bits
    memcpy(&bits, &x, 8)
    return (bits & EXP_MASK) != EXP_MASK


cdef inline bint _strict(const Candle* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(1, n):
        if p[i].ts <= p[i - 1].ts:
            return False
    return True


cdef inline Py_ssize_t _lower_bound(const Candle* p, Py_ssize_t lo, Py_ssize_t hi, int64_t t) noexcept nogil:
    cdef Py_ssize_t mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if p[mid].ts < t:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef inline Py_ssize_t _lower_bound_ts(const int64_t[:] ts, Py_ssize_t lo, Py_ssize_t hi, int64_t t) noexcept nogil:
    cdef Py_ssize_t mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if ts[mid] < t:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef Py_ssize_t _classify(const Candle* s, Py_ssize_t n, const Candle* b, Py_ssize_t k,
                          int64_t* pos, uint8_t* flag, Py_ssize_t* counts) noexcept nogil:
    """Locate sorted unique batch rows in sorted unique series rows.

    ``flag[j]``: 0 new, 1 exists and differs, 2 byte-identical. ``counts``: inserted, updated,
    unchanged. Returns the first insertion position (``n`` when nothing is inserted).
    """
    cdef Py_ssize_t j, p = 0, first = n, step
    cdef int64_t t
    counts[0] = 0
    counts[1] = 0
    counts[2] = 0
    for j in range(k):
        # Galloping search from the previous position: a batch is sorted and usually local.
        t = b[j].ts
        if p < n and s[p].ts < t:
            step = 1
            while p + step < n and s[p + step].ts < t:
                p += step
                step <<= 1
            p = _lower_bound(s, p + 1, p + step if p + step < n else n, t)
        pos[j] = p
        if p < n and s[p].ts == b[j].ts:
            if memcmp(&s[p], &b[j], sizeof(Candle)) == 0:
                flag[j] = 2
                counts[2] += 1
            else:
                flag[j] = 1
                counts[1] += 1
        else:
            flag[j] = 0
            counts[0] += 1
            if p < first:
                first = p
    return first


cdef void _merge_rows(const Candle* s, Py_ssize_t n, const Candle* b, Py_ssize_t k,
                      const int64_t* pos, const uint8_t* flag, Candle* out) noexcept nogil:
    """Write the merge of ``s`` and ``b`` to ``out`` (classified by ``_classify``)."""
    cdef Py_ssize_t j, i = 0, w = 0, p, run
    for j in range(k):
        p = pos[j]
        run = p - i
        if run > 0:
            memcpy(&out[w], &s[i], run * sizeof(Candle))
            w += run
            i = p
        memcpy(&out[w], &b[j], sizeof(Candle))
        w += 1
        if flag[j] != 0:
            i += 1
    if n > i:
        memcpy(&out[w], &s[i], (n - i) * sizeof(Candle))


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------
cdef inline uint8_t _reason(const Candle* r, int64_t iv, int64_t om, bint month, bint has_now,
                            int64_t now, int64_t* ref, bint* has_ref) noexcept nogil:
    cdef double lo_body, hi_body
    cdef int64_t t = r.ts
    # The common case in one branch-free expression: 0 < low <= open, close <= high < inf and a
    # finite volume and value >= 0 rule out reasons 1-5 and 8 (a NaN fails every comparison it
    # is in; the bounds catch an infinity). Only a row that fails it pays for the checks in order.
    cdef bint plain = ((r.low > 0) & (r.low <= r.open) & (r.low <= r.close) & (r.high >= r.open)
                       & (r.high >= r.close) & (r.high < INFINITY) & (r.volume >= 0) & (r.volume < INFINITY)
                       & (r.value >= 0) & (r.value < INFINITY))
    if not plain:
        if not (_is_finite(r.open) and _is_finite(r.high) and _is_finite(r.low)
                and _is_finite(r.close) and _is_finite(r.volume) and _is_finite(r.value)):
            return 1
        lo_body = r.open if r.open < r.close else r.close
        hi_body = r.open if r.open > r.close else r.close
        if r.low > lo_body:
            return 2
        if r.high < hi_body:
            return 3
        if r.volume < 0:
            return 4
        if r.value < 0:
            return 5
    if month:
        if not _month_aligned(t):
            return 6
    elif not (has_ref[0] and (t == ref[0] or (t > ref[0] and <uint64_t>t - <uint64_t>ref[0] == <uint64_t>iv))):
        # Sorted series step by exactly one interval: the division is only paid off that path.
        if _fmod(t, iv) != om:
            return 6
        ref[0] = t
        has_ref[0] = True
    else:
        ref[0] = t
    if has_now and t > now:
        return 7
    # `not (x > 0)` would also catch NaN, but NaN already returned 1 above; -0.0 <= 0 holds
    if not plain and (r.open <= 0 or r.high <= 0 or r.low <= 0 or r.close <= 0):
        return 8
    return 0


cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #if defined(__SSE2__) || defined(_M_X64)
    #include <emmintrin.h>
    #define MDS_SSE2 1
    #endif

    /* Candle for the C below (the Cython struct's C name is Cython's business): the same
       members in the same order, so the same layout; _check_layout compares the sizes. */
    typedef struct { int64_t ts; double open, high, low, close, volume, value; } mds_row;

    /* How many leading rows pass the `plain` test of _reason with each ts the one before plus iv,
       modulo 2**64 (the caller rules out a wrap past INT64_MAX): all n, or the start of the first
       block of MDS_RUN_BLOCK rows where some row does not. No branch per row. On x86 (SSE2 is part
       of x86-64) each compare tests two fields: one field at a time (comisd + setcc), this pass
       was no faster than _reason's loop. */
    #define MDS_RUN_BLOCK 32
    static Py_ssize_t mds_plain_run(const mds_row* r, Py_ssize_t n, int64_t iv) {
        uint64_t step = (uint64_t)iv, prev = (uint64_t)r[0].ts - step, off = 0;
        Py_ssize_t start, end, i;
    #ifdef MDS_SSE2
        const __m128d zero = _mm_setzero_pd(), inf = _mm_set1_pd(INFINITY);
        __m128d ok = _mm_cmpeq_pd(zero, zero);
    #else
        int ok = 1;
    #endif
        for (start = 0; start < n; start = end) {
            end = n - start > MDS_RUN_BLOCK ? start + MDS_RUN_BLOCK : n;
            for (i = start; i < end; i++) {
    #ifdef MDS_SSE2
                __m128d oh = _mm_loadu_pd(&r[i].open);    /* (open, high) */
                __m128d lc = _mm_loadu_pd(&r[i].low);     /* (low, close) */
                __m128d vv = _mm_loadu_pd(&r[i].volume);  /* (volume, value) */
                /* The plain test (with close > 0 and open < inf, which follow from it) in ordered
                   compares, false on a NaN. ANDed as a tree: one AND a row on the chain through ok. */
                __m128d order = _mm_and_pd(_mm_cmple_pd(lc, oh),  /* low <= open, close <= high */
                                           _mm_cmple_pd(_mm_unpacklo_pd(lc, oh), _mm_unpackhi_pd(lc, oh)));
                __m128d range = _mm_and_pd(_mm_cmplt_pd(zero, lc), _mm_cmplt_pd(oh, inf));  /* low > 0, high < inf */
                __m128d amounts = _mm_and_pd(_mm_cmple_pd(zero, vv), _mm_cmplt_pd(vv, inf));  /* both in [0, inf) */
                ok = _mm_and_pd(ok, _mm_and_pd(order, _mm_and_pd(range, amounts)));
    #else
                ok &= (r[i].low > 0) & (r[i].low <= r[i].open) & (r[i].low <= r[i].close)
                      & (r[i].high >= r[i].open) & (r[i].high >= r[i].close) & (r[i].high < INFINITY)
                      & (r[i].volume >= 0) & (r[i].volume < INFINITY)
                      & (r[i].value >= 0) & (r[i].value < INFINITY);
    #endif
                off |= ((uint64_t)r[i].ts - prev) ^ step;
                prev = (uint64_t)r[i].ts;
            }
    #ifdef MDS_SSE2
            if (_mm_movemask_pd(ok) != 3 || off != 0) return start;
    #else
            if (!ok || off != 0) return start;
    #endif
        }
        return n;
    }
    """
    ctypedef struct mds_row:
        pass
    Py_ssize_t mds_plain_run(const mds_row* rows, Py_ssize_t n, int64_t iv) nogil


cdef inline Py_ssize_t _plain_prefix(const Candle* p, Py_ssize_t n, int64_t iv, int64_t om, bint has_now,
                                     int64_t now) noexcept nogil:
    """How many leading rows of a non-month batch (``n >= 1``) surely pass :func:`_reason` and
    strictly rise: all of them in the common batch, found in one branch-free pass.

    Those rows pass the ``plain`` test of :func:`_reason` (which rules out reasons 1-5 and 8),
    the first ts is on the grid and each later one exactly one interval after the one before,
    without wrapping past INT64_MAX (so it is on the grid too, and they are strictly sorted),
    and the last, hence each, is not in the future. Rows from there on (from the block with a
    gap, a bad row, ...; or all, when 0) are left to the exact row-by-row path.
    """
    cdef int64_t t0 = p[0].ts
    if _fmod(t0, iv) != om:
        return 0
    cdef Py_ssize_t k = mds_plain_run(<const mds_row*>p, n, iv)
    # (k - 1) steps of iv from t0 stay <= INT64_MAX (unsigned: INT64_MAX - t0 may exceed it)
    if k > 1 and <uint64_t>(k - 1) > (<uint64_t>INT64_MAX - <uint64_t>t0) // <uint64_t>iv:
        return 0
    if k and has_now and p[k - 1].ts > now:
        return 0
    return k


def validate(candles, interval_ms, origin_ms, is_month, now_ms=None):
    """Find the invalid rows of a candle array (see ``mds._pycore.validate``).

    Returns ``(idx int64[k], reason uint8[k])``: invalid rows in order with their first failing
    reason code (:data:`REASONS`).
    """
    arr = _candles(candles, "candles")
    cdef int64_t iv, org
    cdef bint month
    iv, org, month = _grid(interval_ms, origin_ms, is_month)
    cdef bint has_now = now_ms is not None
    cdef int64_t now = now_ms if has_now else 0
    cdef const Candle[::1] mv = arr
    cdef Py_ssize_t n = mv.shape[0], i, k = 0
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    idx = np.empty(n, np.int64)
    reason = np.empty(n, np.uint8)
    cdef int64_t[::1] idx_mv = idx
    cdef uint8_t[::1] reason_mv = reason
    cdef const Candle* p = &mv[0]
    cdef int64_t om = 0 if month else _fmod(org, iv)
    cdef int64_t ref = 0
    cdef bint has_ref = False
    cdef uint8_t code
    with nogil:
        for i in range(n):
            code = _reason(&p[i], iv, om, month, has_now, now, &ref, &has_ref)
            if code:
                idx_mv[k] = i
                reason_mv[k] = code
                k += 1
    return idx[:k].copy(), reason[:k].copy()


_NO_ROWS = np.zeros(0, np.int64)
_NO_ROWS.flags.writeable = False
_NO_REASONS = np.zeros(0, np.uint8)
_NO_REASONS.flags.writeable = False


def prepare(candles, interval_ms, origin_ms, is_month, now_ms=None):
    """Check a batch and make the private copy a store keeps: ``(rows, idx, reason)``.

    See ``mds._pycore.prepare``. One call where a write used three (copy, validate, sort): the
    rows are copied first and the copy is checked, in one pass that also sees whether it is
    already sorted; only an unsorted batch pays for :func:`sort_dedup`.
    """
    arr = _candles(candles, "candles")
    cdef int64_t iv, org
    cdef bint month
    iv, org, month = _grid(interval_ms, origin_ms, is_month)
    cdef bint has_now = now_ms is not None
    cdef int64_t now = now_ms if has_now else 0
    cdef Py_ssize_t n = arr.shape[0], i, k, bad = 0
    out = _new_rows(n)
    if n == 0:
        return out, _NO_ROWS, _NO_REASONS
    cdef Candle* dst = <Candle*>cnp.PyArray_DATA(out)
    cdef const Candle* src = <const Candle*>cnp.PyArray_DATA(arr)
    cdef int64_t om = 0 if month else _fmod(org, iv)
    cdef int64_t ref = 0
    cdef bint has_ref = False, strict = True
    with nogil:
        memcpy(dst, src, n * sizeof(Candle))
        # The quick pass vouches for the common batch whole; row by row from where it stops, in
        # the state the loop would have reached (every row before valid, sorted, the last on the grid)
        k = 0 if month else _plain_prefix(dst, n, iv, om, has_now, now)
        if k:
            ref = dst[k - 1].ts
            has_ref = True
        for i in range(k, n):
            if _reason(&dst[i], iv, om, month, has_now, now, &ref, &has_ref):
                bad += 1
            if i and dst[i].ts <= dst[i - 1].ts:
                strict = False
    if bad:
        idx, reason = validate(out, interval_ms, origin_ms, is_month, now_ms)
        return None, idx, reason
    return (out if strict else sort_dedup(out)), _NO_ROWS, _NO_REASONS


# ---------------------------------------------------------------------------------------------
# sort / dedup / merge
# ---------------------------------------------------------------------------------------------
def sort_dedup(batch):
    """Sort by ``ts``, drop duplicate timestamps (last occurrence wins); a new array."""
    arr = _candles(batch, "batch")
    cdef const Candle[::1] mv = arr
    cdef Py_ssize_t n = mv.shape[0], i, k = 0
    cdef const Candle* p = _rows(mv)
    cdef bint strict
    with nogil:
        strict = _strict(p, n)
    if strict:
        out = np.empty(n, _CANDLE)
        if n:
            _copy_into(out, p, n)
        return out
    order = np.argsort(arr["ts"], kind="stable")
    cdef const int64_t[::1] o = order
    with nogil:
        for i in range(n):
            if i == n - 1 or p[o[i + 1]].ts != p[o[i]].ts:
                k += 1
    out = np.empty(k, _CANDLE)
    cdef Candle[::1] w = out
    k = 0
    with nogil:
        for i in range(n):
            if i == n - 1 or p[o[i + 1]].ts != p[o[i]].ts:
                memcpy(&w[k], &p[o[i]], sizeof(Candle))
                k += 1
    return out


cdef void _copy_into(object out, const Candle* src, Py_ssize_t n):
    cdef Candle[::1] w = out
    with nogil:
        memcpy(&w[0], src, n * sizeof(Candle))


cdef object _sorted_batch(object batch):
    # _candles makes ``b`` a C-contiguous CANDLE_DTYPE array: its data pointer is the rows
    # (no typed memoryview: acquiring one parses the struct format, about 0.7 us a call)
    b = _candles(batch, "batch")
    cdef bint strict
    cdef const Candle* p = <const Candle*>cnp.PyArray_DATA(b)
    cdef Py_ssize_t n = cnp.PyArray_DIM(b, 0)
    with nogil:
        strict = _strict(p, n)
    return b if strict else sort_dedup(b)


def merge(series, batch):
    """Merge a batch (any order, last duplicate wins) into a sorted unique series.

    Returns ``(merged, inserted, updated, unchanged)``; ``merged`` is a new array.
    """
    s = _candles(series, "series")
    b = _sorted_batch(batch)
    cdef const Candle[::1] smv = s
    cdef const Candle[::1] bmv = b
    cdef Py_ssize_t n = smv.shape[0], k = bmv.shape[0]
    cdef Py_ssize_t counts[3]
    cdef const Candle* sp = _rows(smv)
    cdef const Candle* bp = _rows(bmv)
    pos = np.empty(k, np.int64)
    flag = np.empty(k, np.uint8)
    cdef int64_t[::1] pos_mv = pos
    cdef uint8_t[::1] flag_mv = flag
    cdef int64_t* pp = &pos_mv[0] if k else NULL
    cdef uint8_t* fp = &flag_mv[0] if k else NULL
    with nogil:
        _classify(sp, n, bp, k, pp, fp, counts)
    out = np.empty(n + counts[0], _CANDLE)
    cdef Candle[::1] omv = out
    if n + counts[0]:
        with nogil:
            _merge_rows(sp, n, bp, k, pp, fp, &omv[0])
    return out, counts[0], counts[1], counts[2]


cdef void _merge_in_place(Candle* s, Py_ssize_t n, const Candle* b, Py_ssize_t k,
                          const int64_t* pos, const uint8_t* flag, Py_ssize_t inserted) noexcept nogil:
    """Backward merge into ``s`` (room for ``n + inserted`` rows): moves only rows after the
    first insertion point, each block once."""
    cdef Py_ssize_t j, p, hi_src = n, shift = inserted
    j = k - 1
    while j >= 0:
        p = pos[j]
        if flag[j] == 0:
            if shift and hi_src > p:
                memmove(&s[p + shift], &s[p], (hi_src - p) * sizeof(Candle))
            shift -= 1
            memcpy(&s[p + shift], &b[j], sizeof(Candle))
            hi_src = p
        else:
            if shift and hi_src > p + 1:
                memmove(&s[p + 1 + shift], &s[p + 1], (hi_src - p - 1) * sizeof(Candle))
            if flag[j] == 1 or shift:  # an unchanged row still moves when rows go in before it
                memcpy(&s[p + shift], &b[j], sizeof(Candle))
            hi_src = p
        j -= 1


def merge_into(buf, n, batch):
    """Merge a batch into ``buf[:n]`` in place; returns ``(n_new, inserted, updated, unchanged)``.

    See ``mds._pycore.merge_into``. Appending after the last row costs O(batch).
    """
    if not isinstance(buf, np.ndarray) or buf.dtype != _CANDLE or buf.ndim != 1:
        raise InvalidRequestError("buf must be a 1-D CANDLE_DTYPE array")
    if not (buf.flags.c_contiguous and buf.flags.writeable):
        raise InvalidRequestError("buf must be C-contiguous and writeable")
    cdef Candle[::1] smv = buf
    cdef Py_ssize_t size = smv.shape[0]
    cdef Py_ssize_t used = n
    if used < 0 or used > size:
        raise InvalidRequestError(f"n={used} outside 0..{size}")
    b = _sorted_batch(batch)
    cdef const Candle[::1] bmv = b
    cdef Py_ssize_t k = bmv.shape[0]
    if k == 0:
        return used, 0, 0, 0
    cdef Candle* sp = &smv[0] if size else NULL
    cdef const Candle* bp = &bmv[0]
    if used == 0 or bp[0].ts > sp[used - 1].ts:
        if used + k > size:
            raise InvalidRequestError(f"merge_into needs {used + k} rows, buf holds {size}")
        with nogil:
            memcpy(&sp[used], bp, k * sizeof(Candle))
        return used + k, k, 0, 0
    cdef Py_ssize_t counts[3]
    cdef int64_t small_pos[256]
    cdef uint8_t small_flag[256]
    cdef int64_t* pp = small_pos
    cdef uint8_t* fp = small_flag
    if k > 256:
        pp = <int64_t*>malloc(k * sizeof(int64_t))
        fp = <uint8_t*>malloc(k)
        if pp == NULL or fp == NULL:
            free(pp)
            free(fp)
            raise MemoryError()
    try:
        with nogil:
            _classify(sp, used, bp, k, pp, fp, counts)
        if used + counts[0] > size:
            raise InvalidRequestError(f"merge_into needs {used + counts[0]} rows, buf holds {size}")
        with nogil:
            _merge_in_place(sp, used, bp, k, pp, fp, counts[0])
    finally:
        if k > 256:
            free(pp)
            free(fp)
    return used + counts[0], counts[0], counts[1], counts[2]


# ---------------------------------------------------------------------------------------------
# gaps
# ---------------------------------------------------------------------------------------------
cdef Py_ssize_t _gaps(const int64_t[:] ts, Py_ssize_t i, int64_t c, int64_t end, int64_t iv,
                      bint month, int64_t[:, ::1] out) noexcept nogil:
    cdef Py_ssize_t n = ts.shape[0], g = 0
    cdef int64_t t, cursor = c
    if month:
        while i < n:
            t = ts[i]
            if t >= end:
                break
            if t == cursor:
                cursor = _month_start(_month_index(t) + 1)
            elif t > cursor and _month_aligned(t):
                out[g, 0] = cursor
                out[g, 1] = t
                g += 1
                cursor = _month_start(_month_index(t) + 1)
            i += 1
    else:
        while i < n:
            t = ts[i]
            if t >= end:
                break
            if t == cursor:
                cursor = t + iv if t <= INT64_MAX - iv else INT64_MAX
            elif t > cursor and (<uint64_t>t - <uint64_t>cursor) % <uint64_t>iv == 0:
                out[g, 0] = cursor
                out[g, 1] = t
                g += 1
                cursor = t + iv if t <= INT64_MAX - iv else INT64_MAX
            i += 1
    if cursor < end:
        out[g, 0] = cursor
        out[g, 1] = end
        g += 1
    return g


def find_gaps(ts, interval_ms, origin_ms, is_month, start, end):
    """Missing aligned slots in ``[start, end)`` as ``int64[k, 2]`` half-open ranges.

    ``ts`` is sorted int64 (a strided field view is fine). See ``mds._pycore.find_gaps``.
    """
    cdef int64_t iv, org
    cdef bint month
    iv, org, month = _grid(interval_ms, origin_ms, is_month)
    t = ts if isinstance(ts, np.ndarray) else np.asarray(ts)
    if t.dtype != np.int64 or t.ndim != 1:
        raise InvalidRequestError(f"ts must be a 1-D int64 array, got {t.dtype} {t.shape}")
    cdef int64_t s = start
    cdef int64_t e = end
    cdef int64_t c = _ceil_slot(s, iv, org, month)
    if c >= e:
        return _EMPTY_RANGES.copy()
    cdef const int64_t[:] tv = t
    cdef Py_ssize_t lo, hi
    with nogil:
        lo = _lower_bound_ts(tv, 0, tv.shape[0], c)
        hi = _lower_bound_ts(tv, lo, tv.shape[0], e)
    out = np.empty((hi - lo + 1, 2), np.int64)
    cdef int64_t[:, ::1] ov = out
    cdef Py_ssize_t g
    with nogil:
        g = _gaps(tv, lo, c, e, iv, month, ov)
    if g == hi - lo + 1:
        return out
    return out[:g].copy()


# ---------------------------------------------------------------------------------------------
# interval sets
# ---------------------------------------------------------------------------------------------
cdef Py_ssize_t _coalesce(const int64_t[:, ::1] r, int64_t[:, ::1] out) noexcept nogil:
    """Merge sorted non-empty ranges (overlapping or adjacent) into ``out``."""
    cdef Py_ssize_t i, g = 0, n = r.shape[0]
    cdef int64_t cs = r[0, 0], ce = r[0, 1]
    for i in range(1, n):
        if r[i, 0] <= ce:
            if r[i, 1] > ce:
                ce = r[i, 1]
        else:
            out[g, 0] = cs
            out[g, 1] = ce
            g += 1
            cs = r[i, 0]
            ce = r[i, 1]
    out[g, 0] = cs
    out[g, 1] = ce
    return g + 1


cdef bint _is_normal(const int64_t[:, :] r) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(r.shape[0]):
        if r[i, 1] <= r[i, 0]:
            return False
        if i and r[i, 0] <= r[i - 1, 1]:
            return False
    return True


def interval_normalize(a):
    """Sort ranges, merge overlapping and adjacent ones, drop empty ones; a new ``int64[m, 2]``."""
    r = _ranges(a, "ranges")
    if r.shape[0] == 0:
        return _EMPTY_RANGES.copy()
    cdef const int64_t[:, :] rv = r
    cdef bint normal
    with nogil:
        normal = _is_normal(rv)
    if normal:
        return np.array(r, dtype=np.int64, order="C", copy=True)
    r = r[r[:, 1] > r[:, 0]]
    if r.shape[0] == 0:
        return _EMPTY_RANGES.copy()
    r = np.ascontiguousarray(r[np.lexsort((r[:, 1], r[:, 0]))])
    out = np.empty_like(r)
    cdef const int64_t[:, ::1] sv = r
    cdef int64_t[:, ::1] ov = out
    cdef Py_ssize_t g
    with nogil:
        g = _coalesce(sv, ov)
    return out[:g].copy() if g < out.shape[0] else out


def interval_union(a, b):
    """Union of two range sets, normalised."""
    return interval_normalize(np.concatenate((_ranges(a, "a"), _ranges(b, "b"))))


cdef Py_ssize_t _cut(const int64_t[:, ::1] av, const int64_t[:, ::1] bv, int64_t[:, ::1] ov,
                     uint8_t* inside) noexcept nogil:
    """Cut normalised ranges ``av`` at the edges of normalised ``bv``, in one merge pass, into
    ``ov``: the pieces outside ``bv`` only (``inside`` NULL), or every piece with ``inside[g]``
    saying whether it lies in ``bv``. ``ov`` holds ``2 * (len(av) + len(bv))`` rows."""
    cdef Py_ssize_t i, j = 0, jj, g = 0, nA = av.shape[0], nB = bv.shape[0]
    cdef int64_t s, e, cur, lo, hi
    for i in range(nA):
        s = av[i, 0]
        e = av[i, 1]
        while j < nB and bv[j, 1] <= s:
            j += 1
        cur = s
        jj = j
        while jj < nB and bv[jj, 0] < e:
            lo = bv[jj, 0] if bv[jj, 0] > s else s
            hi = bv[jj, 1] if bv[jj, 1] < e else e
            if lo > cur:
                ov[g, 0] = cur
                ov[g, 1] = lo
                if inside != NULL:
                    inside[g] = 0
                g += 1
            if inside != NULL:
                ov[g, 0] = lo
                ov[g, 1] = hi
                inside[g] = 1
                g += 1
            cur = hi
            jj += 1
        if cur < e:
            ov[g, 0] = cur
            ov[g, 1] = e
            if inside != NULL:
                inside[g] = 0
            g += 1
    return g


def interval_subtract(a, b):
    """The parts of range set ``a`` not covered by ``b``, normalised."""
    na = interval_normalize(a)
    nb = interval_normalize(b)
    out = np.empty((2 * (na.shape[0] + nb.shape[0]), 2), np.int64)
    cdef const int64_t[:, ::1] av = na
    cdef const int64_t[:, ::1] bv = nb
    cdef int64_t[:, ::1] ov = out
    cdef Py_ssize_t g
    with nogil:
        g = _cut(av, bv, ov, NULL)
    return out[:g].copy()


def interval_contains(a, start, end):
    """Whether ``[start, end)`` lies inside the union of ranges ``a`` (an empty range always does)."""
    cdef int64_t s = start
    cdef int64_t e = end
    if e <= s:
        return True
    r = _ranges(a, "ranges")
    if r.shape[0] == 0:
        return False
    cdef const int64_t[:, :] rv = r
    cdef bint normal
    with nogil:
        normal = _is_normal(rv)
    if not normal:
        r = interval_normalize(r)
        rv = r
    cdef Py_ssize_t lo = 0, hi = rv.shape[0], mid
    with nogil:
        while lo < hi:  # first range with start > s
            mid = (lo + hi) >> 1
            if rv[mid, 0] <= s:
                lo = mid + 1
            else:
                hi = mid
    return lo > 0 and rv[lo - 1, 1] >= e


cdef str _MISSING = "missing"
cdef str _NO_TRADES = "no_trades"
cdef str _START = "start"
cdef str _END = "end"
cdef str _KIND = "kind"


cdef extern from "Python.h":
    void PyObject_GC_UnTrack(void* op)


cdef inline object _labelled(object new, object cls, int64_t s, int64_t e, str kind):
    # What a frozen dataclass's own __init__ does (object.__setattr__ per field), without the
    # Python-level call: a list of 10,000 gaps costs about a third of calling the class.
    g = new(cls)
    PyObject_GenericSetAttr(g, _START, s)
    PyObject_GenericSetAttr(g, _END, e)
    PyObject_GenericSetAttr(g, _KIND, kind)
    # It holds two ints and a str and has no __dict__, so it can never be part of a cycle: the
    # cycle collector need not walk it (10,000 tracked gaps made each gaps() call pay for
    # collections of the whole heap, about as much as building them).
    PyObject_GC_UnTrack(<void*>g)
    return g


def label_gaps(holes, cov, cls):
    """``holes`` cut at the edges of ``cov``, as ``cls(start, end, kind)`` in ascending order.

    One pass over both range sets (the walk of :func:`interval_subtract`, keeping the pieces
    inside too): pieces inside ``cov`` are ``"no_trades"``, the rest ``"missing"``. See
    ``mds._pycore.label_gaps``.
    """
    h = interval_normalize(holes)
    c = interval_normalize(cov)
    cdef Py_ssize_t n = 2 * (h.shape[0] + c.shape[0]), g, i
    pieces = np.empty((n, 2), np.int64)
    kinds = np.empty(n, np.uint8)
    if n == 0:
        return []
    cdef const int64_t[:, ::1] hv = h
    cdef const int64_t[:, ::1] cv = c
    cdef int64_t[:, ::1] pv = pieces
    cdef uint8_t[::1] kv = kinds
    with nogil:
        g = _cut(hv, cv, pv, &kv[0])
    out = []
    new = cls.__new__
    for i in range(g):
        out.append(_labelled(new, cls, pv[i, 0], pv[i, 1], _NO_TRADES if kv[i] else _MISSING))
    return out


# ---------------------------------------------------------------------------------------------
# SeriesBuffer
# ---------------------------------------------------------------------------------------------
cdef inline Py_ssize_t _spare(Py_ssize_t k) noexcept nogil:
    return k // 4 if k >= 16 else 4


cdef class SeriesBuffer:
    """The newest ``capacity`` candles of one series, handing out read-only views.

    See ``mds._pycore.SeriesBuffer``: appends fill a small spare room (a quarter of the rows,
    at least 4); when it runs out the newest rows move to a fresh array and the old one lives
    on as long as views of it do; a correction of a row a live view may hold copies first.
    """

    cdef readonly Py_ssize_t capacity
    cdef object _buf
    cdef object _ro
    cdef Candle* _data
    cdef Py_ssize_t _size, _lo, _hi, _exported_hi, _refs

    def __init__(self, capacity):
        cdef Py_ssize_t cap = capacity
        if cap <= 0:
            raise InvalidRequestError(f"capacity must be positive, got {cap}")
        self.capacity = cap
        self._alloc(0)

    cdef void _alloc(self, Py_ssize_t rows) except *:
        cdef Py_ssize_t size = rows + _spare(rows) if rows else 0
        self._buf = np.empty(size, _CANDLE)
        self._data = _ptr(self._buf)
        self._buf.flags.writeable = False
        self._ro = self._buf[:]
        self._size = size
        self._lo = 0
        self._hi = 0
        self._exported_hi = 0
        self._refs = Py_REFCNT(self._buf)

    cdef object _view(self, Py_ssize_t first, Py_ssize_t m):
        """A new read-only view of ``m`` rows from row ``first``, its base the buffer's array (so
        that _views_alive counts it), made through numpy's C API: a third of slicing's cost.
        Every call makes its own object: what one caller does to its array's shape, dtype or
        strides is never seen by another."""
        if m <= 0:
            return self._ro[first:first]
        cdef cnp.npy_intp dims[1]
        dims[0] = m
        Py_INCREF(_CANDLE_DESCR)  # PyArray_NewFromDescr steals it
        out = _array_new(&PyArray_Type, <_Descr*>_CANDLE_DESCR, 1, dims, NULL, <void*>(self._data + first),
                         cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED, NULL)
        Py_INCREF(self._buf)  # PyArray_SetBaseObject steals it
        cnp.PyArray_SetBaseObject(<cnp.ndarray>out, self._buf)
        return out

    cdef inline bint _views_alive(self):
        return Py_REFCNT(self._buf) > self._refs

    cdef void _replace2(self, const Candle* a, Py_ssize_t na, const Candle* b, Py_ssize_t nb) except *:
        """Move rows ``a`` then ``b`` (sorted unique, at most capacity) into a fresh array.

        The caller keeps the array ``a`` points into alive (``old = self._buf``) until this returns.
        """
        self._alloc(na + nb)
        if na:
            memcpy(self._data, a, na * sizeof(Candle))
        if nb:
            memcpy(self._data + na, b, nb * sizeof(Candle))
        self._hi = na + nb

    def write(self, batch):
        """Merge a sorted unique batch; returns ``(inserted, updated, unchanged)``.

        Counts as ``merge`` of the current rows with the batch; then only the newest ``capacity``
        rows are kept.
        """
        b = _sorted_batch(batch)  # C-contiguous CANDLE_DTYPE: its data pointer is the rows
        cdef Py_ssize_t k = cnp.PyArray_DIM(b, 0)
        if k == 0:
            return 0, 0, 0
        cdef const Candle* bp = <const Candle*>cnp.PyArray_DATA(b)
        cdef Py_ssize_t cap = self.capacity, count = self._hi - self._lo, keep, j, first
        if count == 0 or bp[0].ts > self._data[self._hi - 1].ts:
            if k >= cap:
                self._replace2(NULL, 0, bp + (k - cap), cap)
            elif self._hi + k <= self._size:
                memcpy(self._data + self._hi, bp, k * sizeof(Candle))
                self._hi += k
                if self._hi - self._lo > cap:
                    self._lo = self._hi - cap
            else:
                keep = min(count, cap - k)
                old = self._buf  # keep the old rows alive while copying
                self._replace2(self._data + (self._hi - keep), keep, bp, k)
            return k, 0, 0
        cdef Py_ssize_t counts[3]
        pos = np.empty(k, np.int64)
        flag = np.empty(k, np.uint8)
        cdef int64_t[::1] pos_mv = pos
        cdef uint8_t[::1] flag_mv = flag
        cdef Candle* live = self._data + self._lo
        with nogil:
            _classify(live, count, bp, k, &pos_mv[0], &flag_mv[0], counts)
        if counts[0] == 0:
            if counts[1]:
                first = count
                for j in range(k):
                    if flag_mv[j] == 1:
                        first = pos_mv[j]
                        break
                if self._lo + first < self._exported_hi and self._views_alive():
                    old = self._buf
                    self._replace2(live, count, NULL, 0)
                    live = self._data
                for j in range(k):
                    if flag_mv[j] == 1:
                        memcpy(&live[pos_mv[j]], &bp[j], sizeof(Candle))
            return 0, counts[1], counts[2]
        merged = np.empty(count + counts[0], _CANDLE)
        cdef Candle[::1] mmv = merged
        with nogil:
            _merge_rows(live, count, bp, k, &pos_mv[0], &flag_mv[0], &mmv[0])
        keep = count + counts[0]
        first = keep - cap if keep > cap else 0
        self._replace2(&mmv[first], keep - first, NULL, 0)
        return counts[0], counts[1], counts[2]

    def latest(self, n):
        """The newest ``n`` rows (all when fewer are held): a read-only view, no copy, never changing."""
        cdef Py_ssize_t m = n
        cdef Py_ssize_t count = self._hi - self._lo
        if m > count:
            m = count
        if m < 0:
            m = 0
        if self._hi > self._exported_hi:
            self._exported_hi = self._hi
        return self._view(self._hi - m, m)

    def range(self, start, end):
        """Rows with ``start <= ts < end``: a read-only view, no copy, never changing."""
        cdef int64_t s = start
        cdef int64_t e = end
        cdef Py_ssize_t a = _lower_bound(self._data, self._lo, self._hi, s)
        cdef Py_ssize_t b = _lower_bound(self._data, self._lo, self._hi, e)
        if b < a:
            b = a
        if b > self._exported_hi:
            self._exported_hi = b
        return self._view(a, b - a)

    def __len__(self):
        return self._hi - self._lo

    @property
    def first_ts(self):
        """``ts`` of the oldest row held, None when empty."""
        return self._data[self._lo].ts if self._hi > self._lo else None

    @property
    def last_ts(self):
        """``ts`` of the newest row held, None when empty."""
        return self._data[self._hi - 1].ts if self._hi > self._lo else None

    @property
    def nbytes(self):
        """Bytes of the array currently allocated."""
        return self._size * sizeof(Candle)

    def clear(self):
        """Drop every row and the array (views already handed out stay valid)."""
        self._alloc(0)


# ---------------------------------------------------------------------------------------------
# chunk codec 2
# ---------------------------------------------------------------------------------------------
def undelta_rows(rows):
    """Undo codec 2's delta in place and return the rows' checksum: each row of the
    C-contiguous int64 array ``rows`` of shape ``(n, 7)`` (candle rows as 8-byte words) becomes
    the wrapping sum of itself and every row above it (a cumulative sum down each column, as
    ``np.cumsum(rows, axis=0)`` gives), and the result is the weighted sum of its 4-byte
    half-words that ``mds._checksum.row_checksum`` computes, taken in the same pass.

    Half-word ``2 base + l`` (``base``: the row's first half-word, ``l``: its index within the
    row) weighs ``2 (base + l) + 3``; per row that is ``(2 base + 3) s + 2 w``, with ``s`` the
    row's plain sum and ``w`` its sum weighted by ``l``: no multiplication in the inner loop but
    by small constants. The running sums live in a local array (registers), not in memory that
    could alias the rows."""
    if not isinstance(rows, np.ndarray) or rows.dtype != np.int64 or rows.ndim != 2 or rows.shape[1] != 7:
        raise TypeError("rows must be an int64 array of shape (n, 7)")
    if not rows.flags.c_contiguous or not rows.flags.writeable:
        raise ValueError("rows must be C-contiguous and writeable")
    cdef int64_t[:, ::1] mv = rows
    cdef Py_ssize_t n = mv.shape[0], i, j
    cdef uint64_t run[7]
    cdef uint64_t* r
    cdef uint64_t acc = 0, base = 0, s, w, v, lo, hi
    if n == 0:
        return 0
    with nogil:
        r = <uint64_t*>&mv[0, 0]
        for j in range(7):
            run[j] = 0
        for i in range(n):
            s = 0
            w = 0
            for j in range(7):  # unsigned: wraps on overflow as numpy's int64 sum does
                v = run[j] + r[j]
                run[j] = v
                r[j] = v
                lo = v & 0xFFFFFFFFULL
                hi = v >> 32
                s += lo + hi
                w += <uint64_t>(2 * j) * lo + <uint64_t>(2 * j + 1) * hi
            acc += (2 * base + 3) * s + 2 * w
            base += 14
            r += 7
    return acc


def ts_bounds(candles):
    """``(first ts, last ts)`` of a CANDLE_DTYPE array, None when it is empty (see ``mds._pycore``)."""
    arr = _candles(candles, "candles")
    cdef Py_ssize_t n = cnp.PyArray_DIM(<cnp.ndarray>arr, 0)
    if n == 0:
        return None
    cdef const Candle* p = <const Candle*>cnp.PyArray_DATA(<cnp.ndarray>arr)
    return p[0].ts, p[n - 1].ts


def row_checksum(buf, Py_ssize_t offset, Py_ssize_t n):
    """The checksum of ``n`` candle rows starting at byte ``offset`` of ``buf`` (any object with a
    contiguous buffer): the sum of their 4-byte half-words, the j-th weighted by ``2j + 3``,
    modulo 2**64 (see ``mds._checksum.row_checksum``, which calls it). Per row it is computed
    as in :func:`undelta_rows`; the half-words are read with memcpy (the rows of a ``bytes``
    value or a sliced buffer need not be aligned). ValueError when ``buf`` is shorter than
    ``offset + 56 n`` bytes or ``offset``/``n`` is negative."""
    cdef Py_buffer view
    cdef const char* r
    cdef Py_ssize_t i, j
    cdef uint32_t h[14]
    cdef uint64_t acc = 0, base = 0, s, w
    if offset < 0 or n < 0:
        raise ValueError(f"offset and n must be >= 0, got {offset} and {n}")
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if offset > view.len or n > (view.len - offset) // _ROW_BYTES:
            raise ValueError(f"{n} rows from byte {offset} do not fit a buffer of {view.len} bytes")
        with nogil:
            r = <const char*>view.buf + offset
            for i in range(n):
                memcpy(h, r, 56)
                s = 0
                w = 0
                for j in range(14):
                    s += h[j]
                    w += <uint64_t>j * h[j]
                acc += (2 * base + 3) * s + 2 * w
                base += 14
                r += 56
    finally:
        PyBuffer_Release(&view)
    return acc


# ---------------------------------------------------------------------------------------------
# chunk walk (the LMDB disk tier's read loop)
# ---------------------------------------------------------------------------------------------
cdef inline int64_t _ts_at(const char* row) noexcept nogil:
    cdef int64_t v
    memcpy(&v, row, 8)
    return v


cdef Py_ssize_t _chunk_search(const char* rows, Py_ssize_t n, int64_t first, int64_t t, int64_t step) noexcept nogil:
    """First row with ``ts >= t``, given ``ts[0] == first < t <= ts[n - 1]`` (the twin's _search).

    Not ``_lower_bound``: that one reads through an aligned ``Candle*``, and a small chunk stored
    inside an LMDB leaf page starts only 2-byte aligned, so timestamps are read with ``memcpy``.
    """
    cdef uint64_t i
    cdef Py_ssize_t lo = 0, hi = n, mid
    if step > 0:
        i = (<uint64_t>t - <uint64_t>first - 1) // <uint64_t>step + 1  # ceil((t - first) / step)
        if i < <uint64_t>n and _ts_at(rows + i * sizeof(Candle)) >= t and _ts_at(rows + (i - 1) * sizeof(Candle)) < t:
            return <Py_ssize_t>i
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if _ts_at(rows + mid * sizeof(Candle)) < t:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef extern from "numpy/arrayobject.h":
    # Declared here because numpy's pxd leaves it out: it steals a reference to the descr.
    PyTypeObject PyArray_Type
    ctypedef struct _Descr "PyArray_Descr"
    object _array_new "PyArray_NewFromDescr"(PyTypeObject* subtype, _Descr* descr, int nd, cnp.npy_intp* dims,
                                             cnp.npy_intp* strides, void* data, int flags, PyObject* obj)

cdef Py_ssize_t _ROW_BYTES = sizeof(Candle)
cdef cnp.dtype _CANDLE_DESCR = _CANDLE


cdef object _new_rows(Py_ssize_t n):
    """``np.empty(n, CANDLE_DTYPE)`` without the Python call (a third of :func:`prepare` on a row)."""
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    Py_INCREF(_CANDLE_DESCR)  # PyArray_NewFromDescr steals it
    return _array_new(&PyArray_Type, <_Descr*>_CANDLE_DESCR, 1, dims, NULL, NULL, 0, NULL)


cdef struct _Piece:
    Py_buffer buf
    Py_ssize_t offset
    Py_ssize_t nbytes


cdef inline int _keycmp(const char* a, Py_ssize_t alen, const char* b, Py_ssize_t blen) noexcept nogil:
    """Byte-wise comparison of two keys, like ``bytes`` ordering (-1, 0, 1)."""
    cdef int c = memcmp(a, b, alen if alen < blen else blen)
    if c:
        return -1 if c < 0 else 1
    return (alen > blen) - (alen < blen)


cdef bytes _chunk_key(bytes prefix, int64_t period_start):
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(prefix), i
    cdef uint64_t u = <uint64_t>period_start ^ (1ULL << 63)
    cdef bytes key = PyBytes_FromStringAndSize(NULL, plen + 8)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(key)
    memcpy(p, PyBytes_AS_STRING(prefix), plen)
    for i in range(8):
        p[plen + i] = (u >> (56 - 8 * i)) & 0xFF
    return key


def walk_chunks(cur, bytes prefix not None, int64_t period, int64_t start, int64_t end, limit, int64_t step,
                int64_t stale_before, dict memo not None, view):
    """Read the rows with ``start <= ts < end`` of one series from its chunks.

    The twin's docstring holds the contract. Here the loop runs in C: keys are built and
    compared in place, the memo check is one ``memcmp``, the row bounds a step guess or a binary
    search on the mapped rows, and the rows are copied once, straight from the map into the
    result.
    """
    if period <= 0 or not (-(1LL << 62) <= start < end <= (1LL << 62)):
        raise ValueError("walk_chunks: period must be positive and start < end within +-2**62")
    cdef bint back = limit >= 0
    cdef int64_t lim = (limit if limit < INT64_MAX else INT64_MAX) if back else -1
    cdef Py_ssize_t klen = PyBytes_GET_SIZE(prefix) + 8
    cdef bytes lo_key = _chunk_key(prefix, start - _fmod(start, period))
    cdef bytes hi_key = _chunk_key(prefix, end - 1 - _fmod(end - 1, period))
    cdef const char* lo = PyBytes_AS_STRING(lo_key)
    cdef const char* hi = PyBytes_AS_STRING(hi_key)
    cdef list stale = []
    cdef _Piece* pieces = NULL
    cdef _Piece* grown
    cdef _Piece* piece
    cdef Py_ssize_t npieces = 0, cap = 0, i
    cdef int64_t got = 0, written, n, hl, i0, i1, first, last
    cdef Py_buffer vb, kb
    cdef bint held_vb = False, hit
    cdef bytes key, head
    cdef const char* kp
    cdef const char* rows
    cdef uint64_t u
    cdef char* dst
    cdef cnp.npy_intp dims[1]
    nxt = cur.prev if back else cur.next
    item = cur.item
    try:
        if not back:
            ok = cur.set_range(lo_key)
        elif cur.set_range(hi_key):
            k = cur.key()
            ok = (len(k) <= CHUNK_KEY_MAX and bytes(k) == hi_key) or cur.prev()
        else:
            ok = cur.last()
        while ok:
            k, val = item()
            PyObject_GetBuffer(k, &kb, PyBUF_SIMPLE)
            if kb.len > CHUNK_KEY_MAX:
                PyBuffer_Release(&kb)
                raise ChunkCorrupt("key longer than any key the disk tier writes")
            key = PyBytes_FromStringAndSize(<const char*>kb.buf, kb.len)
            PyBuffer_Release(&kb)
            kp = PyBytes_AS_STRING(key)
            if back:
                if _keycmp(kp, PyBytes_GET_SIZE(key), lo, klen) < 0:
                    break
            elif _keycmp(kp, PyBytes_GET_SIZE(key), hi, klen) > 0:
                break
            if PyBytes_GET_SIZE(key) != klen:
                raise ChunkCorrupt("key in a series' range that is not a chunk key")
            PyObject_GetBuffer(val, &vb, PyBUF_SIMPLE)
            held_vb = True
            hit = False
            seen = memo.get(key)
            if seen is not None:
                head, hl, n, written = seen
                hit = (vb.len == hl + n * _ROW_BYTES and PyBytes_GET_SIZE(head) == hl
                       and memcmp(vb.buf, PyBytes_AS_STRING(head), hl) == 0)
            if not hit:
                hl, n, written = view(val, key, memo)
                if n <= 0 or hl < 0 or vb.len != hl + n * _ROW_BYTES:
                    raise ChunkCorrupt("chunk view does not match the value's size")
            if written < stale_before:
                u = 0
                for i in range(8):
                    u = (u << 8) | <unsigned char>kp[klen - 8 + i]
                stale.append(<int64_t>(u ^ (1ULL << 63)))
            elif not stale:
                rows = <const char*>vb.buf + hl
                first = _ts_at(rows)
                last = _ts_at(rows + (n - 1) * _ROW_BYTES)
                i0 = 0 if start <= first else n if start > last else _chunk_search(rows, n, first, start, step)
                i1 = 0 if end <= first else n if end > last else _chunk_search(rows, n, first, end, step)
                if back and i0 < i1 - (lim - got):
                    i0 = i1 - (lim - got)
                if i1 > i0:
                    if npieces == cap:
                        cap = 8 if cap == 0 else 2 * cap
                        grown = <_Piece*>realloc(pieces, cap * sizeof(_Piece))
                        if grown == NULL:
                            raise MemoryError()
                        pieces = grown
                    pieces[npieces].buf = vb
                    pieces[npieces].offset = hl + i0 * _ROW_BYTES
                    pieces[npieces].nbytes = (i1 - i0) * _ROW_BYTES
                    npieces += 1
                    held_vb = False  # the piece owns the buffer now
                    got += i1 - i0
            if held_vb:
                PyBuffer_Release(&vb)
                held_vb = False
            if back and not stale and got >= lim:
                break
            ok = (back or _keycmp(kp, klen, hi, klen) != 0) and nxt()
        if stale:
            return stale
        if back and got < lim:
            return None
        # A new array that owns its rows, read-only like the twin's view of immutable bytes.
        dims[0] = got
        Py_INCREF(_CANDLE_DESCR)  # PyArray_NewFromDescr steals it
        out = _array_new(&PyArray_Type, <_Descr*>_CANDLE_DESCR, 1, dims, NULL, NULL, 0, NULL)
        dst = <char*>cnp.PyArray_DATA(out)
        for i in range(npieces):
            piece = &pieces[npieces - 1 - i] if back else &pieces[i]
            memcpy(dst, <const char*>piece.buf.buf + piece.offset, piece.nbytes)
            dst += piece.nbytes
        cnp.PyArray_CLEARFLAGS(out, cnp.NPY_ARRAY_WRITEABLE)
        return out
    finally:
        if held_vb:
            PyBuffer_Release(&vb)
        for i in range(npieces):
            PyBuffer_Release(&pieces[i].buf)
        free(pieces)

cdef extern from *:
    """
    #include <sys/types.h>
    #include <sys/stat.h>
    #ifdef _WIN32
    static int mds_file_state(int fd, long long* links, long long* size) {
        struct _stat64 st;
        if (_fstat64(fd, &st) != 0) return -1;
        *links = st.st_nlink; *size = st.st_size; return 0;
    }
    #else
    static int mds_file_state(int fd, long long* links, long long* size) {
        struct stat st;
        if (fstat(fd, &st) != 0) return -1;
        *links = (long long)st.st_nlink; *size = (long long)st.st_size; return 0;
    }
    #endif
    """
    int mds_file_state(int fd, long long* links, long long* size) nogil


def file_state(int fd):
    """``(link count, size in bytes)`` of an open file: ``fstat`` without building
    ``os.stat_result`` (a third of the cost of ``os.fstat`` here). Raises OSError."""
    cdef long long links = 0, size = 0
    if mds_file_state(fd, &links, &size) != 0:
        PyErr_SetFromErrno(OSError)
    return links, size


# ---------------------------------------------------------------------------------------------
# LRU
# ---------------------------------------------------------------------------------------------
cdef class LRU:
    """Recency order over integer keys: O(1) touch, remove and pop-oldest.

    A doubly linked list over arrays (slot 0 is the sentinel) and a dict key -> slot.
    """

    cdef dict _slot
    cdef int64_t* _key
    cdef Py_ssize_t* _prev
    cdef Py_ssize_t* _next
    cdef Py_ssize_t _cap, _used, _free

    def __cinit__(self):
        self._slot = {}
        self._cap = 0
        self._used = 1
        self._free = 0
        self._key = NULL
        self._prev = NULL
        self._next = NULL
        self._grow(16)
        self._prev[0] = 0
        self._next[0] = 0

    def __dealloc__(self):
        free(self._key)
        free(self._prev)
        free(self._next)

    cdef void _grow(self, Py_ssize_t cap) except *:
        cdef int64_t* k = <int64_t*>realloc(self._key, cap * sizeof(int64_t))
        if k == NULL:
            raise MemoryError()
        self._key = k
        cdef Py_ssize_t* p = <Py_ssize_t*>realloc(self._prev, cap * sizeof(Py_ssize_t))
        if p == NULL:
            raise MemoryError()
        self._prev = p
        p = <Py_ssize_t*>realloc(self._next, cap * sizeof(Py_ssize_t))
        if p == NULL:
            raise MemoryError()
        self._next = p
        self._cap = cap

    cdef inline void _unlink(self, Py_ssize_t s) noexcept:
        self._next[self._prev[s]] = self._next[s]
        self._prev[self._next[s]] = self._prev[s]

    cdef inline void _append(self, Py_ssize_t s) noexcept:
        cdef Py_ssize_t tail = self._prev[0]
        self._prev[s] = tail
        self._next[s] = 0
        self._next[tail] = s
        self._prev[0] = s

    def touch(self, key):
        """Mark ``key`` as most recently used (adding it when absent)."""
        cdef int64_t k = key
        slot = self._slot.get(k)
        cdef Py_ssize_t s
        if slot is not None:
            s = slot
            self._unlink(s)
            self._append(s)
            return
        if self._free:
            s = self._free
            self._free = self._next[s]
        else:
            if self._used == self._cap:
                self._grow(self._cap * 2)
            s = self._used
            self._used += 1
        self._key[s] = k
        self._slot[k] = s
        self._append(s)

    def remove(self, key):
        """Forget ``key``; a missing key is ignored."""
        cdef int64_t k = key
        slot = self._slot.pop(k, None)
        if slot is not None:
            self._release(slot)

    cdef void _release(self, Py_ssize_t s) noexcept:
        self._unlink(s)
        self._next[s] = self._free
        self._free = s

    def pop_oldest(self):
        """Remove and return the least recently used key (KeyError when empty)."""
        cdef Py_ssize_t s = self._next[0]
        if s == 0:
            raise KeyError("pop_oldest from an empty LRU")
        cdef int64_t k = self._key[s]
        del self._slot[k]
        self._release(s)
        return k

    def oldest(self):
        """The least recently used key, None when empty."""
        cdef Py_ssize_t s = self._next[0]
        return self._key[s] if s else None

    def __len__(self):
        return len(self._slot)

    def __contains__(self, key):
        return key in self._slot


# ---------------------------------------------------------------------------------------------
# Latency ring
# ---------------------------------------------------------------------------------------------
cdef object _perf_counter = time.perf_counter


cdef class LatencyRing:
    """The latest ``size`` latency samples (ms), for percentiles, and the count of all added.

    See ``mds._pycore.LatencyRing``. ``add_since`` takes the end time itself: the store's memory
    hit records its latency in one call.
    """

    cdef double* _buf
    cdef readonly Py_ssize_t size
    cdef readonly int64_t count

    def __init__(self, Py_ssize_t size=4096):
        if size <= 0:
            raise InvalidRequestError(f"size must be positive, got {size}")
        cdef double* buf = <double*>calloc(size, sizeof(double))  # calloc refuses a size*8 that overflows
        if buf == NULL:
            raise MemoryError()
        free(self._buf)
        self._buf = buf
        self.size = size
        self.count = 0

    def __dealloc__(self):
        free(self._buf)

    cdef inline void _add(self, double ms) noexcept:
        if self._buf == NULL:  # never initialised (made by __new__ alone): holds nothing
            return
        self._buf[self.count % self.size] = ms
        self.count += 1

    def add(self, double ms):
        """Add one sample."""
        self._add(ms)

    def add_since(self, double t0, LatencyRing other=None):
        """Add ``(time.perf_counter() - t0) * 1000`` to this ring and to ``other``."""
        cdef double ms = (<double>_perf_counter() - t0) * 1000.0
        self._add(ms)
        if other is not None:
            other._add(ms)

    def samples(self):
        """The samples held (the latest ``size``; in ring order, not time order), a new array."""
        cdef Py_ssize_t k = self.count if self.count < self.size else self.size
        out = np.empty(k, np.float64)
        if k:
            memcpy(cnp.PyArray_DATA(out), self._buf, k * sizeof(double))
        return out


@cython.auto_pickle(False)  # a meter of one store: nothing to carry to another process
cdef class HitMeter:
    """Counts one kind of read and adds each one's latency to two rings, in one call.

    See ``mds._pycore.HitMeter``: the store's memory hit (its most frequent read).
    """

    cdef readonly int64_t count
    cdef LatencyRing _a, _b

    def __init__(self, LatencyRing a not None, LatencyRing b not None):
        self._a = a
        self._b = b
        self.count = 0

    def hit(self, double t0):
        """One read that began at ``t0`` (``time.perf_counter()``) and ends now."""
        if self._a is None or self._b is None:
            raise InvalidRequestError("HitMeter was not initialised with its two rings")
        cdef double ms = (<double>_perf_counter() - t0) * 1000.0
        self.count += 1
        self._a._add(ms)
        self._b._add(ms)
