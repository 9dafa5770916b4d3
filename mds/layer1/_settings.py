"""Public settings whose one home is a collaborator's attribute.

``UpbitRouter.max_retries`` lives on its transport, ``UpbitRouter.candle_ttl_s`` on its cache,
``SmartRouterConnector.timeout_s`` on its cache peek: :class:`Forwarded` reads and writes the
collaborator's attribute at each use, so a setting changed after construction takes effect
everywhere (as it did when the router and the connector were single classes).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class Forwarded(Generic[T]):
    """A class attribute forwarding to the attribute of the same name of ``obj.<home>``.

    Parameters
    ----------
    home : str
        Name of the instance attribute holding the collaborator (e.g. ``"_transport"``).
    """

    def __init__(self, home: str) -> None:
        self._home = home
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> Forwarded[T]: ...

    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> T: ...

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self._home), self._name)

    def __set__(self, obj: object, value: T) -> None:
        setattr(getattr(obj, self._home), self._name, value)
