"""What the core knows of the HTTP layer: interfaces, not the router.

The core sits below :mod:`kvmdesk.api`: it never imports it.  Where core code handles a request (the
operation log, batches, paging) or hands the router to plugins (the ``kvmdesk_routes`` hook), it only
needs the few attributes typed here; :class:`kvmdesk.api.router.Router`, ``ApiRequest`` and
``Endpoint`` provide them.  The router itself is made by a factory that whoever assembles the process
passes to :func:`kvmdesk.core.app.build_core` (``make_router=kvmdesk.api.app.make_router``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Optional, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.app import Core


class OperationLike(Protocol):
    """An endpoint or one action of an ``actions`` endpoint: how the operation log names it."""

    @property
    def summary(self) -> str: ...

    @property
    def oplog(self) -> Optional[str]: ...


class EndpointLike(OperationLike, Protocol):
    """A registered endpoint (:class:`kvmdesk.api.router.Endpoint`)."""

    @property
    def tags(self) -> tuple[str, ...]: ...


class RequestLike(Protocol):
    """A request being served (:class:`kvmdesk.api.router.ApiRequest`)."""

    @property
    def core(self) -> "Core": ...

    @property
    def path(self) -> dict[str, str]: ...

    @property
    def args(self) -> dict[str, str]: ...

    @property
    def lang(self) -> str: ...

    @property
    def request_id(self) -> str: ...

    @property
    def body(self) -> Any: ...

    @property
    def admin(self) -> Optional[dict]: ...

    @property
    def oplog_detail(self) -> Optional[str]: ...

    @property
    def action(self) -> Optional[OperationLike]: ...

    @property
    def client_ip(self) -> str: ...

    def url_with(self, **params: Any) -> str:
        """The full URL of this request with some query parameters replaced."""


Handler = Callable[[Any], Awaitable[Any]]


class RouterLike(Protocol):
    """The API router as plugins see it in ``kvmdesk_routes`` (:class:`kvmdesk.api.router.Router`)."""

    def endpoint(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        body: Optional[type] = None,
        query: Optional[type] = None,
        auth: bool = True,
        tags: tuple[str, ...] = (),
        oplog: Optional[str] = None,
        raw_body: bool = False,
        search_fields: Optional[Mapping[str, type]] = None,
        paged: bool = False,
        stream: Optional[Callable[..., Any]] = None,
    ) -> Callable[[Handler], Handler]:
        """Register a handler for ``method path``; see :meth:`kvmdesk.api.router.Router.endpoint`."""

    def actions(
        self, path: str, table: Mapping[str, Any], *, tags: tuple[str, ...] = (), summary: str = "", auth: bool = True
    ) -> None:
        """Register a ``POST path`` dispatching on the body's ``action``; see the router's ``actions``."""


#: Builds the router of a core once its plugins are loaded (:func:`kvmdesk.api.app.make_router`).
MakeRouter = Callable[["Core"], RouterLike]
