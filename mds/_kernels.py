"""The one place that chooses the kernel implementation.

``mds._core`` (compiled Cython) is used when it imports; otherwise the pure-numpy twin
``mds._pycore`` is used and a warning is logged. Environment switches, read at import:

- ``MDS_PUREPYTHON=1`` forces the twin (for debugging and for the cross-check tests).
- ``MDS_REQUIRE_CORE=1`` turns a missing or broken compiled core into an ImportError, so a wheel
  test cannot pass on the slow path.

Everything else in mds imports kernels from here. ``IMPLEMENTATION`` says which one is live:
``"cython"`` or ``"numpy"``.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import TYPE_CHECKING

# The same surface as the twin (and the compiled core): one list, kept in mds/_pycore.py.
from mds._pycore import __all__

logger = logging.getLogger(__name__)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _load() -> ModuleType:
    """The implementation module: the compiled core unless told otherwise or unavailable."""
    from mds import _pycore

    if _flag("MDS_PUREPYTHON"):
        return _pycore
    try:
        from mds import _core
    except ImportError as exc:
        if _flag("MDS_REQUIRE_CORE"):
            raise ImportError(
                f"MDS_REQUIRE_CORE=1 but the compiled core mds._core failed to import ({exc}); "
                "build it with `python setup.py build_ext --inplace`"
            ) from exc
        logger.warning("compiled core mds._core unavailable (%s); using the numpy twin", exc)
        return _pycore
    return _core


if TYPE_CHECKING:
    # Both implementations have the same surface (tests hold them equal); type against the twin.
    from mds._pycore import (
        CHUNK_KEY_MAX as CHUNK_KEY_MAX,
        IMPLEMENTATION as IMPLEMENTATION,
        LRU as LRU,
        REASONS as REASONS,
        ChunkCorrupt as ChunkCorrupt,
        HitMeter as HitMeter,
        LatencyRing as LatencyRing,
        SeriesBuffer as SeriesBuffer,
        file_state as file_state,
        find_gaps as find_gaps,
        interval_contains as interval_contains,
        interval_normalize as interval_normalize,
        interval_subtract as interval_subtract,
        interval_union as interval_union,
        label_gaps as label_gaps,
        merge as merge,
        merge_into as merge_into,
        prepare as prepare,
        row_checksum as row_checksum,
        sort_dedup as sort_dedup,
        ts_bounds as ts_bounds,
        undelta_rows as undelta_rows,
        validate as validate,
        walk_chunks as walk_chunks,
    )
else:
    _impl = _load()
    globals().update({name: getattr(_impl, name) for name in __all__})
