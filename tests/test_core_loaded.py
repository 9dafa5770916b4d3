"""CI and the wheel tests set MDS_REQUIRE_CORE=1: the suite must then run on the compiled core."""

import os

import mds._kernels as kernels


def test_compiled_core_is_loaded_when_required() -> None:
    required = os.environ.get("MDS_REQUIRE_CORE", "") not in ("", "0")
    if required and os.environ.get("MDS_PUREPYTHON", "") in ("", "0"):
        assert kernels.IMPLEMENTATION == "cython"
    else:
        assert kernels.IMPLEMENTATION in ("cython", "numpy")
