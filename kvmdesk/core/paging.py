"""Paging and the contract's generic search (``searchtype=all|contain|single`` plus field filters)."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Optional, Sequence, Union
from typing import Collection as Collection_

import attrs

from kvmdesk.core import errors
from kvmdesk.core.errors import RECORD, ApiError, Resource
from kvmdesk.core.store import Collection, Filter, Sort

if TYPE_CHECKING:  # pragma: no cover
    from kvmdesk.core.routing import RequestLike

#: Query parameters that are never filters, whatever fields a collection has.
RESERVED = frozenset({"page", "page_size", "searchtype", "ordering"})
SEARCH_TYPES = ("all", "contain", "single")

Decorate = Callable[[list[dict]], Awaitable[list[dict]]]


@attrs.frozen
class Choice:
    """A filter field that takes one of a few values (the OpenAPI document lists them as an ``enum``).

    :param kind: ``int`` or ``str``.
    :param values: the values accepted.
    """

    kind: type
    values: tuple

    def coerce(self, field: str, raw: str) -> Any:
        value = _coerce(field, raw, self.kind)
        if value not in self.values:
            raise ApiError(errors.INVALID_PARAM, field=field,
                           reason="expected one of " + ", ".join(str(v) for v in self.values))
        return value


def _coerce(field: str, raw: str, kind: type) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
        raise ApiError(errors.INVALID_PARAM, field=field, reason="expected true/false or 1/0")
    if kind is int:
        try:
            value = int(raw)
        except ValueError:
            raise ApiError(errors.INVALID_PARAM, field=field, reason="expected an integer") from None
        # Stores hold 64-bit integers; a larger value reached SQLite as an OverflowError (a 500).
        if not -(2**63) <= value < 2**63:
            raise ApiError(errors.INVALID_PARAM, field=field, reason="integer out of range")
        return value
    return raw


def _positive_int(args: Mapping[str, str], name: str, default: int, limit: Optional[int] = None) -> int:
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(errors.INVALID_PARAM, field=name, reason="expected a positive integer") from None
    if value < 1:
        raise ApiError(errors.INVALID_PARAM, field=name, reason="expected a positive integer")
    if limit is not None and value > limit:
        raise ApiError(errors.INVALID_PARAM, field=name, reason=f"at most {limit}")
    return value


def search_filter(args: Mapping[str, str], fields: Mapping[str, type], fixed: Optional[Filter] = None,
                  substring: Collection_[str] = ()) -> tuple[str, dict]:
    """Build the store filter of a generic search.

    :param args: the query parameters.
    :param fields: the filterable fields and their types (``str``, ``int``, ``bool``).
    :param fixed: conditions the endpoint itself imposes (e.g. the pool of the path).
    :param substring: text fields the contract always matches by substring (e.g. the ISO list's ``name``).
    :returns: ``(searchtype, filter)``.
    :raises ApiError: unknown searchtype, unknown field, bad value, or no filter where one is needed.
    """
    searchtype = args.get("searchtype") or "all"
    if searchtype not in SEARCH_TYPES:
        raise ApiError(errors.INVALID_PARAM, field="searchtype", reason="expected all, contain or single")
    conditions: dict[str, Any] = {}
    for name, raw in args.items():
        if name in RESERVED:
            continue
        if name not in fields:
            raise ApiError(errors.UNKNOWN_FILTER, data={"fields": sorted(fields)}, field=name)
        kind = fields[name]
        value = kind.coerce(name, raw) if isinstance(kind, Choice) else _coerce(name, raw, kind)
        if (searchtype == "contain" or name in substring) and isinstance(value, str):
            conditions[name] = {"$regex": re.escape(value), "$options": "i"}
        else:
            conditions[name] = value
    if searchtype in ("contain", "single") and not conditions:
        raise ApiError(errors.SEARCH_NEEDS_FILTER, searchtype=searchtype)
    if fixed:
        conditions = {"$and": [dict(fixed), conditions]} if conditions else dict(fixed)
    return searchtype, conditions


async def paged_search(
    req: "RequestLike",
    source: Union[Collection, Sequence[Mapping[str, Any]], Callable[[], Awaitable[Sequence[Mapping[str, Any]]]]],
    fields: Mapping[str, type],
    *,
    fixed: Optional[Filter] = None,
    sort: Sort = (("id", -1),),
    decorate: Optional[Decorate] = None,
    resource: Resource = RECORD,
    substring: Collection_[str] = (),
) -> Any:
    """Answer a list endpoint: a page (``count/next/previous/results``) or, for ``single``, one record.

    Every list endpoint answers through here, so every one takes the generic search the same way.

    :param source: a store collection, or records in memory (their order is kept, ``sort`` is not used),
        or an async function that fetches them (e.g. from an agent): called once the query is known to
        be valid, so bad parameters are refused without asking anyone.
    :param fields: the filterable fields and their types; any other query parameter is refused.
    :param decorate: adds derived fields (counts, names) to the records of the page, in one go.
    :param substring: see :func:`search_filter`.
    """
    searchtype, filter = search_filter(req.args, fields, fixed, substring)
    if callable(source):
        source = list(await source())
    if isinstance(source, (list, tuple)):
        found = [record for record in source if matches(record, filter)]
        if searchtype == "single":
            if not found:
                raise ApiError(errors.NOT_FOUND, resource=resource, key=_describe(req.args))
            return (await decorate(found[:1]))[0] if decorate else found[0]
        page = page_of(req, found)
        if decorate and page["results"]:
            page["results"] = await decorate(page["results"])
        return page
    if searchtype == "single":
        found = await source.find(filter, sort=sort, limit=1)
        if not found:
            raise ApiError(errors.NOT_FOUND, resource=resource, key=_describe(req.args))
        return (await decorate(found))[0] if decorate else found[0]
    return await paginate(req, source, filter, sort=sort, decorate=decorate)


def matches(record: Mapping[str, Any], filter: Mapping[str, Any]) -> bool:
    """Whether an in-memory record matches a filter made by :func:`search_filter` (equality, ``$regex``
    with ``$options``, ``$in``, ``$and``)."""
    for key, condition in filter.items():
        if key == "$and":
            if not all(matches(record, sub) for sub in condition):
                return False
            continue
        value = record.get(key)
        if isinstance(condition, Mapping):
            if "$regex" in condition:
                flags = re.IGNORECASE if "i" in condition.get("$options", "") else 0
                if not isinstance(value, str) or re.search(condition["$regex"], value, flags) is None:
                    return False
            if "$in" in condition and value not in condition["$in"]:
                return False
        elif value != condition or isinstance(value, bool) != isinstance(condition, bool):
            return False
    return True


async def paginate(
    req: "RequestLike",
    collection: Collection,
    filter: Filter,
    *,
    sort: Sort = (("id", -1),),
    decorate: Optional[Decorate] = None,
) -> dict:
    """One page of ``collection`` matching ``filter``, with full-URL ``next``/``previous`` links."""
    config = req.core.config
    page = _positive_int(req.args, "page", 1)
    size = _positive_int(req.args, "page_size", config.get("api.default_page_size", 10),
                         config.get("api.max_page_size", 1000))
    # A page past the last record reads nothing, so a huge page number never reaches SQL (SQLite
    # refuses offsets beyond 64 bits: that was a 500).
    count, results = await collection.find_page(filter, sort=sort, skip=(page - 1) * size, limit=size)
    if decorate and results:
        results = await decorate(results)
    return page_envelope(req, count, page, size, results)


def page_envelope(req: "RequestLike", count: int, page: int, size: int, results: Sequence[Any]) -> dict:
    """The contract's page object for results computed elsewhere."""
    has_next = page * size < count
    has_previous = page > 1
    return {
        "count": count,
        "next": req.url_with(page=page + 1, page_size=size) if has_next else None,
        "previous": req.url_with(page=page - 1, page_size=size) if has_previous else None,
        "results": list(results),
    }


def page_of(req: "RequestLike", items: Sequence[Any]) -> dict:
    """Page a list already in memory (e.g. facts an agent returned)."""
    config = req.core.config
    page = _positive_int(req.args, "page", 1)
    size = _positive_int(req.args, "page_size", config.get("api.default_page_size", 10),
                         config.get("api.max_page_size", 1000))
    return page_envelope(req, len(items), page, size, items[(page - 1) * size : page * size])


def _describe(args: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in args.items() if k not in RESERVED)
