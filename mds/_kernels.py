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
from typing import TYPE_CHECKING

logger = logging.getLogger(__name__)

__all__ = [
    "IMPLEMENTATION",
    "LRU",
    "REASONS",
    "SeriesBuffer",
    "find_gaps",
    "interval_contains",
    "interval_normalize",
    "interval_subtract",
    "interval_union",
    "merge",
    "merge_into",
    "sort_dedup",
    "validate",
]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


if TYPE_CHECKING:
    # Both implementations have the same surface (tests hold them equal); type against the twin.
    from mds._pycore import (
        IMPLEMENTATION,
        LRU,
        REASONS,
        SeriesBuffer,
        find_gaps,
        interval_contains,
        interval_normalize,
        interval_subtract,
        interval_union,
        merge,
        merge_into,
        sort_dedup,
        validate,
    )
elif _flag("MDS_PUREPYTHON"):
    from mds._pycore import (
        IMPLEMENTATION,
        LRU,
        REASONS,
        SeriesBuffer,
        find_gaps,
        interval_contains,
        interval_normalize,
        interval_subtract,
        interval_union,
        merge,
        merge_into,
        sort_dedup,
        validate,
    )
else:
    try:
        from mds._core import (
            IMPLEMENTATION,
            LRU,
            REASONS,
            SeriesBuffer,
            find_gaps,
            interval_contains,
            interval_normalize,
            interval_subtract,
            interval_union,
            merge,
            merge_into,
            sort_dedup,
            validate,
        )
    except ImportError as exc:
        if _flag("MDS_REQUIRE_CORE"):
            raise ImportError(
                f"MDS_REQUIRE_CORE=1 but the compiled core mds._core failed to import ({exc}); "
                "build it with `python setup.py build_ext --inplace`"
            ) from exc
        logger.warning("compiled core mds._core unavailable (%s); using the numpy twin", exc)
        from mds._pycore import (
            IMPLEMENTATION,
            LRU,
            REASONS,
            SeriesBuffer,
            find_gaps,
            interval_contains,
            interval_normalize,
            interval_subtract,
            interval_union,
            merge,
            merge_into,
            sort_dedup,
            validate,
        )
