"""Calling the Layer 1, which is foreign code: every call in a child task, bounded in time.

Whatever the Layer 1 raises or does to its own task ends that one call as an exception the
connector can turn into :class:`~mds.errors.Layer1Error`; only the caller's own cancellation
propagates as such.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from mds.errors import Layer1Error


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done callback of an abandoned child task: read its outcome so asyncio logs no
    "exception was never retrieved" for a call whose caller has gone (timeout, cancellation)."""
    if not task.cancelled():
        task.exception()


def foreign_abort(what: str, exc: BaseException) -> Layer1Error:
    """The Layer1Error for a BaseException (not an Exception) raised by the Layer 1 itself."""
    detail = str(exc)
    return Layer1Error(f"Layer 1 {what} raised {type(exc).__name__}" + (f": {detail}" if detail else ""))


async def call_foreign(what: str, timeout_s: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` of the Layer 1 (awaiting its result if awaitable) in a child
    task, and wait at most ``timeout_s`` for it.

    The Layer 1 is foreign code, and what it raises must end this one call, not the thread that
    runs Layer 1 calls: ``asyncio.CancelledError`` it raises on its own, ``SystemExit``,
    ``KeyboardInterrupt``, ``GeneratorExit`` and any other ``BaseException`` become a
    :class:`Layer1Error` (asyncio would otherwise re-raise SystemExit and KeyboardInterrupt out of
    the event loop, and a stray CancelledError would pass for a cancellation of the caller).

    Only the cancellation of the CALLER's task propagates as ``CancelledError``. Which
    cancellation is which is decided by construction, so it works alike on Python 3.10 (no
    ``Task.cancelling()``) and later: the call runs in a child task that only this function
    cancels (on a timeout, or passing on the caller's cancellation), and it marks when it does;
    a CancelledError that the child sees unmarked was raised by the Layer 1.

    Raises
    ------
    asyncio.TimeoutError
        No answer within ``timeout_s`` (the child is cancelled and left to finish on its own).
    Layer1Error
        The Layer 1 raised a BaseException that is not an Exception, or cancelled its own call.
    Exception
        Whatever Exception the Layer 1 raised, unchanged (callers wrap it).
    """
    ours = False  # set before this function cancels the child: its CancelledError is ours then
    me: list[asyncio.Task[Any]] = []

    async def call() -> Any:
        try:
            return await _maybe_await(fn(*args, **kwargs))
        except Exception:
            raise
        except asyncio.CancelledError as exc:
            if ours:
                raise
            raise foreign_abort(what, exc) from None
        except GeneratorExit as exc:
            try:
                stepping = asyncio.current_task() is me[0]
            except RuntimeError:  # no running loop: the coroutine is being closed
                stepping = False
            if not stepping:
                raise  # this coroutine is being closed (the loop is going away): let it close
            raise foreign_abort(what, exc) from exc
        except BaseException as exc:
            raise foreign_abort(what, exc) from exc

    child = asyncio.ensure_future(call())
    me.append(child)
    child.add_done_callback(_retrieve)
    try:
        done, _ = await asyncio.wait((child,), timeout=timeout_s)
    except BaseException:  # our own task was cancelled while waiting: pass it on to the child
        ours = True
        child.cancel()
        raise
    if not done:
        ours = True
        child.cancel()
        raise asyncio.TimeoutError
    if child.cancelled():  # the Layer 1 cancelled its own task and returned
        raise Layer1Error(f"Layer 1 {what} cancelled its own call")
    return child.result()
