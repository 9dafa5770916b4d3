"""Security: private files, no SQL built from input, nothing unpickled or evaluated, bounded parsing
of the msgpack headers stored in LMDB."""

from __future__ import annotations

import ast
import os
import stat
import sys
from pathlib import Path

import _relutil as R
import msgpack
import numpy as np
import pytest

import mds

PKG = Path(mds.__file__).parent
SOURCES = sorted(p for p in PKG.rglob("*.py"))


def _walk_modes(root: Path) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for d in [dirpath, *(os.path.join(dirpath, x) for x in dirnames)]:
            mode = stat.S_IMODE(os.stat(d).st_mode)
            if mode != 0o700:
                bad.append(f"dir {d}: {oct(mode)}")
        for f in filenames:
            p = os.path.join(dirpath, f)
            mode = stat.S_IMODE(os.stat(p).st_mode)
            if mode != 0o600:
                bad.append(f"file {p}: {oct(mode)}")
    return bad


@pytest.mark.skipif(
    sys.platform == "win32", reason="no POSIX modes on Windows: os.stat reports 0o777 for every directory"
)
def test_every_file_of_a_store_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a usual, permissive umask: the store must not rely on it
    try:
        path = tmp_path / "deep" / "store"
        with mds.open(path, clock=R.Clock()) as st:
            st.write_candles(
                "KRW-BTC", "1m", R.marked(R.T0 + R.MIN * np.arange(500), 1.0), complete=(R.T0, R.T0 + 500 * R.MIN)
            )
            with st.batch():
                st.write_candles("KRW-ETH", "1m", R.marked(R.T0 + R.MIN * np.arange(50), 2.0))
            st.candles("KRW-BTC", "1m", count=100)
            st.maintain(force=True)
            bad = _walk_modes(path)  # while open: -wal, -shm and lock files exist now
        bad += _walk_modes(path)
        R.TALLY["security_files_checked"] += sum(len(f) + len(d) for _, d, f in os.walk(path))
    finally:
        os.umask(old)
    assert not bad, bad


# --- SQL text -------------------------------------------------------------------------------------
#: f-strings passed to execute() that were reviewed: they interpolate module constants or values
#: the module itself computes, never a caller's input.
_REVIEWED_FSTRING_SQL = {
    ("feed.py", "_run"),  # LISTEN on the listener's own heartbeat channel: "mds_ping_" + uuid4 hex
    ("connection.py", "pragma_int"),  # PRAGMA name: a Literal of known names (mypy checks every call)
    ("connection.py", "connect"),  # PRAGMA synchronous = FULL/NORMAL from a bool
    ("schema.py", "open_schema"),  # PRAGMA user_version = SCHEMA_VERSION (constant)
    ("upkeep.py", "_scheduled_step"),  # incremental_vacuum(_INCREMENTAL_VACUUM_PAGES)
}


def _sql_calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("execute", "executemany", "cursor_execute")
                    and node.args
                ):
                    out.append((fn.name, node))
    return out


def test_no_sql_text_is_built_from_input() -> None:
    problems = []
    seen = 0
    for src in SOURCES:
        tree = ast.parse(src.read_text(), str(src))
        for fname, call in _sql_calls(tree):
            seen += 1
            arg = call.args[0]
            where = f"{src.name}:{call.lineno} in {fname}"
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                continue
            if isinstance(arg, ast.Name) and (
                arg.id.isupper() or arg.id.startswith("_SQL") or arg.id.startswith("_SCHEMA")
            ):
                continue
            if isinstance(arg, ast.IfExp) and all(
                isinstance(x, ast.Constant) and isinstance(x.value, str) for x in (arg.body, arg.orelse)
            ):
                continue
            if isinstance(arg, ast.JoinedStr) and (src.name, fname) in _REVIEWED_FSTRING_SQL:
                continue
            problems.append(f"{where}: SQL is {ast.unparse(arg)[:80]}")
        for node in ast.walk(tree):  # % formatting or .format() anywhere near SQL keywords
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant):
                text = str(node.left.value).upper()
                if any(k in text for k in ("SELECT ", "INSERT ", "UPDATE ", "DELETE ", "PRAGMA ")):
                    problems.append(f"{src.name}:{node.lineno}: SQL built with %")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "format"
                and isinstance(node.func.value, ast.Constant)
            ):
                text = str(node.func.value.value).upper()
                if any(k in text for k in ("SELECT ", "INSERT ", "UPDATE ", "DELETE ", "PRAGMA ")):
                    problems.append(f"{src.name}:{node.lineno}: SQL built with str.format")
    # _pragma_int interpolates its argument: every call must pass a literal
    for src in SOURCES:
        for node in ast.walk(ast.parse(src.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "_pragma_int"
                and not (node.args and isinstance(node.args[0], ast.Constant))
            ):
                problems.append(f"{src.name}:{node.lineno}: _pragma_int with a non-literal name")
    R.TALLY["security_sql_calls_checked"] += seen
    assert seen > 20
    assert not problems, problems


_FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "_pickle"}
_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def test_no_pickle_eval_or_marshal_of_stored_bytes() -> None:
    problems = []
    for src in SOURCES:
        tree = ast.parse(src.read_text(), str(src))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [
                    f"{src.name}:{node.lineno}: import {a.name}" for a in node.names if a.name in _FORBIDDEN_MODULES
                ]
            elif isinstance(node, ast.ImportFrom) and node.module in _FORBIDDEN_MODULES:
                problems.append(f"{src.name}:{node.lineno}: from {node.module} import")
            elif isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in _FORBIDDEN_CALLS:
                    problems.append(f"{src.name}:{node.lineno}: {f.id}()")
                for kw in node.keywords:  # numpy.load(allow_pickle=True), msgpack ext hooks
                    if kw.arg in ("allow_pickle", "ext_hook", "object_hook", "object_pairs_hook") and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value in (False, None)
                    ):
                        problems.append(f"{src.name}:{node.lineno}: {kw.arg}=")
                if isinstance(f, ast.Attribute) and f.attr in ("unpackb", "Unpacker"):
                    names = {kw.arg for kw in node.keywords}
                    if not {"max_array_len", "max_map_len", "max_str_len", "max_bin_len"} <= names:
                        problems.append(f"{src.name}:{node.lineno}: msgpack.{f.attr} without size limits")
    assert not problems, problems


# --- msgpack headers in LMDB -----------------------------------------------------------------------
_ARRAY32_HUGE = b"\xdd\xff\xff\xff\xff"  # msgpack array header claiming 4 billion items
_BIN32_HUGE = b"\xc6\x7f\xff\xff\xff"  # bin32 claiming 2 GiB


def _bad_chunk_values(good: bytes) -> list[bytes]:
    h = good[0]
    rows = good[h:]
    return [
        b"",
        b"\x00" * 7,
        bytes((8, 6)) + _ARRAY32_HUGE + b"\x00" + rows,  # header claims a huge array
        bytes((8, 6)) + _BIN32_HUGE + b"\x00" + rows,
        bytes((255, 200)) + good[2:],  # header length past the value
        bytes((h, 0)) + good[2:],  # empty msgpack
        bytes((h, good[1])) + msgpack.packb([1, 10**12, 0, 0])[: good[1]].ljust(good[1], b"\x00") + good[2 + good[1] :],
        good[:h] + rows[: len(rows) // 2],  # truncated rows (size no longer matches)
        good[:h] + bytes(len(rows)),  # rows zeroed (checksum)
        bytes((h, good[1])) + b"\xc1" * (h - 2) + rows,  # msgpack "never used" byte
        os.urandom(len(good)),
    ]


def _bad_held_values() -> list[bytes]:
    return [
        b"",
        _ARRAY32_HUGE,
        msgpack.packb([1, _ARRAY32_HUGE]),
        b"\x92\x01" + _ARRAY32_HUGE,  # [1, <array of 4e9 ints>] with nothing behind it
        b"\x92\x01\xdc\xff\xff" + b"\x01" * 10,  # array16 claiming 65535 ints, 10 present
        b"\x00" * (9 * 2_000_000 + 100),  # past the size limit
        msgpack.packb([1, [5, 1]]),  # not sorted
        msgpack.packb([1, [1, 2, 3]]),  # odd length
        msgpack.packb([1, ["a", "b"]]),
        msgpack.packb({"a": 1}),
        os.urandom(64),
    ]


@pytest.mark.parametrize("which", ["chunk", "held"])
def test_garbage_msgpack_headers_in_lmdb_are_handled(tmp_path: Path, which: str) -> None:
    rows = R.marked(R.T0 + 5 * R.DAY + R.MIN * np.arange(600), 3.0)
    span = (R.T0 + 5 * R.DAY, R.T0 + 5 * R.DAY + 600 * R.MIN)
    with mds.open(tmp_path / "s", clock=R.Clock()) as st:
        st.write_candles("KRW-BTC", "1m", rows, complete=span)
        disk = st._health.states["disk"].obj
        env = disk._env
        with env.lock, env.env.begin() as txn:
            chunk_key, good = next((bytes(k), bytes(v)) for k, v in txn.cursor(db=env.chunks))
            held_key = next(bytes(k) for k, _ in txn.cursor(db=env.held))
        values = _bad_chunk_values(good) if which == "chunk" else _bad_held_values()
        for i, val in enumerate(values):
            with env.lock, env.env.begin(write=True) as txn:
                txn.put(
                    chunk_key if which == "chunk" else held_key, val, db=env.chunks if which == "chunk" else env.held
                )
            st._health.states["memory"].obj.clear()
            env.verified.clear()  # as a fresh process would: no chunk checksum remembered
            try:
                got = st.candles("KRW-BTC", "1m", start=span[0], end=span[1])
            except mds.MdsError as exc:  # a typed error is acceptable, a crash or a raw error is not
                got = None
                R.TALLY["security_lmdb_typed_errors"] += 1
                print(f"value {i}: {type(exc).__name__}: {exc}")
            R.TALLY["security_garbage_lmdb_values"] += 1
            if got is not None:
                assert got.tobytes() == rows.tobytes(), f"garbage value {i} changed what is read"
            rep = st.check()  # either repaired already or reported, never an exception
            if not rep.ok:
                assert all("disk" in p for p in rep.problems), rep.problems
            # put the tier back in order for the next value
            disk.clear()
            st.write_candles("KRW-BTC", "1m", rows, complete=span)
        assert st.check().ok
