"""Schemathesis over the OpenAPI document against a real core, for every operation.

A real core on a temporary store serves its API on a loopback port (the production site); schemathesis
generates schema-valid requests for each operation (a bounded number, derandomized) and sends them with
an administrator's token from a worker thread while the reactor serves them.  Every answer must be:

- no 5xx;
- the envelope ``{"code", "msg", "data"}`` (or, for a file download, one of the media types the
  document gives for it);
- not a refusal of the request's shape (invalid JSON, invalid parameter, unknown filter, empty list, ...):
  the request was valid by the document, so such a refusal means the document does not state a rule
  the code applies.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest_twisted
from twisted.internet import defer, reactor

from kvmdesk.core import errors
from kvmdesk.testing.agents import controller_config, free_port, running_agent
from kvmdesk.testing.api import ApiClient, listening_api, make_core

#: Examples per operation: enough to reach every field's limits, few enough for a quick run
#: (``KVMDESK_FUZZ_EXAMPLES`` asks for more, for a deeper run by hand).
EXAMPLES = int(os.environ.get("KVMDESK_FUZZ_EXAMPLES", "15"))
#: Codes that refuse the shape of a request (what a schema states), as opposed to its meaning.
SHAPE_REFUSALS = {errors.INVALID_JSON.code, errors.INVALID_PARAM.code, errors.UNKNOWN_FILTER.code,
                  errors.SEARCH_NEEDS_FILTER.code, errors.UNSUPPORTED_MEDIA.code, errors.BATCH_EMPTY.code}
#: Operations left out: they end the session the fuzzer runs with.
SKIPPED = {("POST", "/api/v1.0/auth/logout")}
#: Where a request names a node's address, it is this one (a real agent, refusing the fuzzer's
#: passwords): the fuzzer never makes the controller reach out beyond loopback.
AGENT_IP = "127.0.0.2"


def refused_for_its_shape(body: dict, query: dict) -> bool:
    """Whether an answer refuses what a schema states (types, limits, required or unknown fields),
    as opposed to what a request means (a reference to nothing, a name taken, a rule between records).

    ``INVALID_PARAM`` is both: a model's refusal (``data`` lists the problems) or a query parameter's is
    about shape; a handler's about a field's meaning (``data`` empty) is not.  The one documented rule a
    schema cannot express: ``contain``/``single`` need a field filter (the searchtype's description).
    """
    code = body["code"]
    if code == errors.SEARCH_NEEDS_FILTER.code:
        filters = set(query) - {"page", "page_size", "searchtype"}
        return bool(filters) or query.get("searchtype") not in ("contain", "single")
    if code == errors.INVALID_PARAM.code:
        field = body["msg"].partition(": ")[2].partition(":")[0]
        return isinstance(body["data"], list) or field in query
    return code in SHAPE_REFUSALS


def fuzz(document: dict, base_url: str, token: str) -> list[str]:
    """Run schemathesis over ``document`` (blocking: called in a thread); returns the problems found."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_dict(document)
    origin = base_url.removesuffix("/api/v1.0")
    headers = {"Authorization": f"Bearer {token}"}
    problems: list[str] = []
    session = requests.Session()

    for result in schema.get_all_operations():
        operation = result.ok()
        method, path = operation.method.upper(), operation.path
        if (method, path) in SKIPPED:
            continue
        # media types of answers that are not the envelope (a download, the document itself)
        files = set()
        for status in ("200", "206"):
            for media, content in operation.definition.raw["responses"].get(status, {}).get("content", {}).items():
                if content.get("schema") != {"$ref": "#/components/schemas/Envelope"}:
                    files.add(media)

        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            case.headers = {**(case.headers or {}), **headers}
            if isinstance(case.body, dict) and "ip" in case.body:
                case.body = {**case.body, "ip": AGENT_IP}
            response = case.call(base_url=origin, session=session, timeout=30)
            where = f"{method} {path} -> {response.status_code}"
            sent = f"path={case.path_parameters} query={case.query} body={str(case.body)[:300]}"
            if response.status_code >= 500:
                problems.append(f"{where}: server error {response.text[:300]} ({sent})")
                return
            content_type = response.headers.get("content-type") or [""]
            media = (content_type[0] if isinstance(content_type, list) else content_type).split(";")[0].strip()
            if response.status_code in (200, 206) and media in files:
                return
            try:
                body = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                problems.append(f"{where}: not JSON ({media}) ({sent})")
                return
            if not isinstance(body, dict) or set(body) != {"code", "msg", "data"}:
                problems.append(f"{where}: not the envelope {str(body)[:200]} ({sent})")
                return
            if refused_for_its_shape(body, case.query or {}):
                problems.append(f"{where}: a valid request refused: {body['code']} {body['msg']} ({sent})")

        run()
    session.close()
    return problems


def in_thread(function: Any, *args: Any) -> defer.Deferred:
    """Run a blocking function in its own thread (not the reactor's pool, which the core uses)."""
    done: defer.Deferred = defer.Deferred()

    def target() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the test, which fails with it
            reactor.callFromThread(done.errback, exc)
        else:
            reactor.callFromThread(done.callback, result)

    threading.Thread(target=target, name="schemathesis", daemon=True).start()
    return done


@pytest_twisted.ensureDeferred
async def test_every_operation_answers_schema_valid_requests_with_envelopes(tmp_path: Path):
    port = free_port(AGENT_IP)
    async with running_agent(tmp_path / "agent", AGENT_IP, port):
        core = await make_core(tmp_path / "controller", config=controller_config(port))
        try:
            client = ApiClient(core)
            token = await client.login()
            status, document = await client.call("GET", "/openapi.json", auth=False)
            assert status == 200
            async with listening_api(core) as base_url:
                problems = await in_thread(fuzz, document, base_url, token)
            assert not problems, f"{len(problems)} problems:\n" + "\n".join(sorted(set(problems))[:60])
        finally:
            await core.store.close()
