"""Build the compiled core ``mds._core``; all metadata lives in pyproject.toml."""

import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# One place for compiler directives. MDS_CYTHON_DEBUG=1 turns the safety checks back on for a
# debug test run (bounds, negative indices, division by zero, initialised memoryviews).
DEBUG = os.environ.get("MDS_CYTHON_DEBUG") == "1"
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": not DEBUG,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}

# The shipped extension carries no debug information: Python's own CFLAGS usually hold -g, which
# made the module 2.4 MB where 0.4 MB is code. -g0 comes after those CFLAGS and so wins; on Linux
# the linker also drops the symbol table (-s; the exported PyInit__core lives in .dynsym and stays).
# The debug-directives build keeps it all (and asks for -g outright), since that build exists to
# be stepped through and to give readable backtraces. MSVC writes no debug info unless asked.
if os.name == "nt":
    COMPILE_ARGS: list[str] = []
    LINK_ARGS: list[str] = []
elif DEBUG:
    COMPILE_ARGS = ["-O3", "-g"]
    LINK_ARGS = []
else:
    COMPILE_ARGS = ["-O3", "-g0"]
    LINK_ARGS = ["-s"] if sys.platform.startswith("linux") else []

extensions = [
    Extension(
        "mds._core",
        ["mds/_core.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=LINK_ARGS,
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES, annotate=False))
