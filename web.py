"""HTTP plumbing that any JSON API on Starlette needs, and nothing about books, users or tokens.

web.py turns everything that goes wrong into an RFC 9457 problem (application/problem+json),
reads requests strictly (media type, body into a msgspec Struct, query string into a Struct, ids
in the path), signs the cursors of keyset pages, matches ETags, makes Starlette routes from a
table of `Operation`s, and holds the pure-ASGI middleware every request passes: request ids, trace
context, Prometheus metrics and the log line; the body limit and the 500 guard; the per-client rate
limits.

What it needs to know about an API comes as data: fields on an `Operation` (`private`,
`counted`, `strict_limit`, ...) and keyword arguments of the middleware. api.py is its only
user; openapi.py reads the same `Operation`s to write the OpenAPI document.
"""

import asyncio
import base64
import collections
import dataclasses
import hashlib
import hmac
import logging
import math
import os
import random
import re
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import msgspec
import prometheus_client
import prometheus_client.multiprocess
from msgspec import Struct
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import cors
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

try:  # optional: only to read the span that OpenTelemetry's SDK made for the request, if it runs
    from opentelemetry import context as opentelemetry_context
    from opentelemetry import trace as opentelemetry_trace
except ImportError:
    opentelemetry_context = opentelemetry_trace = None

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
FORM = "application/x-www-form-urlencoded"
encoder = msgspec.json.Encoder()
T = TypeVar("T")

# == Problems =====================================================================================
# Everything that goes wrong becomes an `HTTPProblem`, raised anywhere and answered in one place
# (`problem_response`) as application/problem+json. A client tells problems apart by `type`
# (RFC 9457 §3.1.1), never by parsing `detail`: each `Kind` of problem has its own, a path of the
# app, `{prefix}/problems/{name}`, and a title that never changes. These are the kinds any HTTP
# API has; an API adds its own (a 409 may mean several things) and serves the descriptions.


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    status: int
    title: str
    advice: str  # what a client should do about it, for `GET /problems/{name}`


HTTP_KINDS = [
    Kind("validation", 400, "The request is not valid",
         "Fix the body field (`errors[].pointer`), query parameter or header that `errors` names, then send it again."),
    Kind("unauthenticated", 401, "Sign-in required",
         "Send `Authorization: Bearer <access token>`, or sign in again: the credentials or the token were refused."),
    Kind("forbidden", 403, "Not allowed", "You are signed in, but this is not yours to do; do not retry."),
    Kind("not-found", 404, "Not found", "There is no such resource or route; check the URL."),
    Kind("method-not-allowed", 405, "Method not allowed", "Use one of the methods that `Allow` lists."),
    Kind("version-mismatch", 412, "The resource has changed",
         "Your `If-Match` is out of date: GET the resource again, redo your change on it, and send it with the new ETag. "
         "(On a write with `If-None-Match`: the resource exists, or still has the ETag you named.)"),
    Kind("too-large", 413, "The body is too large", "Send a smaller body."),
    Kind("unsupported-media-type", 415, "Unsupported media type",
         "Send the body as `application/json` (or `application/merge-patch+json` for PATCH)."),
    Kind("range-not-satisfiable", 416, "Range not satisfiable",
         "Ask for bytes within the file, whose size `Content-Range` gives, or send no `Range`."),
    Kind("rate-limited", 429, "Too many requests",
         "Wait the seconds that `Retry-After` gives, then retry; `RateLimit` says how close you are."),
    Kind("internal", 500, "Internal error",
         "Something went wrong on the server; retry later, and quote `request_id` when you report it."),
    Kind("unavailable", 503, "Service unavailable",
         "The database cannot be reached for now; retry after the seconds that `Retry-After` gives."),
]
BY_STATUS = {kind.status: kind for kind in HTTP_KINDS}  # the kind of a problem raised with none


class Problem(Struct, omit_defaults=True):
    """An RFC 9457 problem; `errors` names the bad fields (`pointer`) or query parameters."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, str]] = []
    request_id: str | None = None
    error: str | None = None  # OAuth 2.0's code (RFC 6749 §5.2), on a token endpoint's form refusals


class HTTPProblem(Exception):
    """A problem to answer; `kind` defaults to the HTTP kind of `status`."""

    def __init__(self, status: int, detail: str, *, kind: Kind | None = None,
                 errors: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None,
                 error: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.kind = status, detail, kind or BY_STATUS[status]
        self.errors, self.headers, self.error = errors or [], headers or {}, error


def problem_response(scope: Scope, status: int, detail: str, *, kind: Kind | None = None,
                     errors: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None,
                     request_id: str | None = None, error: str | None = None) -> Response:
    """The problem+json answer; its `type` is a path of the app the request `scope` is for."""
    kind = kind or BY_STATUS[status]
    problem = Problem(type=prefixed(scope, f"/problems/{kind.name}"), title=kind.title, status=status,
                      detail=detail, errors=errors or [], request_id=request_id, error=error)
    return Response(encoder.encode(problem), status, headers, "application/problem+json")


def invalid_body(error: Exception, pattern_messages: dict[str, str]) -> HTTPProblem:
    """A 400 for a body msgspec refused, with a JSON pointer to the first bad field.

    msgspec words a failed pattern as the regex itself; `pattern_messages` (field name → text)
    says it the way a person would."""
    message = str(error)
    if isinstance(error, UnicodeDecodeError):
        return HTTPProblem(400, "The body is not valid UTF-8.", errors=[{"pointer": "#", "detail": "invalid UTF-8"}])
    if isinstance(error, RecursionError):
        message = "JSON is nested too deeply"
    message = re.sub(r"Expected `str` matching regex '.*'", lambda _: pattern_messages.get(
        re.search(r"`\$\.(\w+)`", message).group(1), "Expected a different format"), message)
    path = re.search(r" - at `\$(.*)`$", message)
    field = re.search(r"(?:missing required|unknown) field `([^`]+)`", message)
    if path:
        message = message[: path.start()]
        pointer = "#" + re.sub(r"\.|\[(\d+)\]", lambda m: "/" + (m.group(1) or ""), path.group(1))
        if field:  # a field missing from (or unknown to) a nested object: point at the field itself
            pointer += f"/{field.group(1)}"
    else:
        pointer = f"#/{field.group(1)}" if field else "#"
    return HTTPProblem(400, f"{message} ({pointer})", errors=[{"pointer": pointer, "detail": message}])


def invalid_parameter(name: str, detail: str) -> HTTPProblem:
    return HTTPProblem(400, f"Query parameter `{name}`: {detail}", errors=[{"parameter": name, "detail": detail}])


async def on_problem(request: Request, error: HTTPProblem) -> Response:
    return problem_response(request.scope, error.status, error.detail, kind=error.kind, errors=error.errors,
                            headers=error.headers, error=error.error)


async def on_http_exception(request: Request, error: HTTPException) -> Response:
    """Starlette's own 404 (no such route) and 405 (method not allowed, with `Allow`)."""
    detail = {404: f"No route matches {request.url.path}.",
              405: f"{request.method} is not allowed on {request.url.path}."}.get(error.status_code, error.detail)
    return problem_response(request.scope, error.status_code, detail, headers=error.headers)


def plain_refusals_as_problems(scope: Scope, send: Send, describe: Callable[[int, str], str]) -> Send:
    """`send`, with a text/plain refusal turned into a problem whose detail is `describe(status,
    text)`: for the parts of Starlette that answer so themselves (a refused CORS preflight, a bad
    `Range` on a static file), so that a client meets one format for every refusal."""
    refusal: Message | None = None

    async def send_as_problem(message: Message) -> None:
        nonlocal refusal
        if message["type"] == "http.response.start" and message["status"] >= 400 and any(
                name == b"content-type" and value.startswith(b"text/plain") for name, value in message["headers"]):
            refusal = message  # held back until its body says why
            return
        if refusal is None:
            return await send(message)
        status, text = refusal["status"], message.get("body", b"").decode(errors="replace")
        kept = {name.decode(): value.decode("latin-1") for name, value in refusal["headers"]
                if name not in (b"content-type", b"content-length")}  # e.g. Content-Range, Vary
        problem = problem_response(scope, status, describe(status, text), headers=kept)
        await send({"type": "http.response.start", "status": status, "headers": problem.raw_headers})
        await send({"type": "http.response.body", "body": problem.body})

    return send_as_problem


class CORSMiddleware(cors.CORSMiddleware):
    """Starlette's CORS layer, with a refused preflight answered as a problem, not text/plain."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            send = plain_refusals_as_problems(scope, send, self.refused)
        await super().__call__(scope, receive, send)

    @staticmethod
    def refused(status: int, text: str) -> str:
        # Starlette says "Disallowed CORS origin, headers": what the preflight asked for that is not allowed.
        return f"The CORS preflight is refused; not allowed here: {text.removeprefix('Disallowed CORS ')}."


# == Reading requests, writing answers ============================================================


def app_path(request: Request, path: str) -> str:
    """A URL path for this app, with the prefix it is mounted under (or served behind)."""
    return prefixed(request.scope, path)


def url_path(path: str) -> str:
    """A path from the scope, percent-encoded again for a URL the API writes (Location, Link,
    `next`, a problem's `type`). The scope holds it decoded, and a path, or a parametrised mount's
    prefix, comes from the client: a bare `?`, `#` or backslash would make the URL point somewhere
    else, a space or `%` make it no URL at all, and a CR, LF or character past Latin-1 could not
    even go into a header. Everything but what RFC 3986 allows in a path stays encoded."""
    return quote(path, safe="/!$&'()*+,;=:@-._~")


def prefixed(scope: Scope, path: str) -> str:
    """`path` under the prefix the request's app is mounted under (`root_path`)."""
    return url_path(scope.get("root_path", "")) + path


def route_path(scope: Scope) -> str:
    """The path as the app's routes see it: without the prefix the app is mounted under. (As
    Starlette's router finds it: a server may give `root_path` without putting it in `path`.)"""
    path, root_path = scope["path"], scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path[len(root_path):len(root_path) + 1] in ("", "/"):
        return path[len(root_path):]
    return path


def header(request: Request, name: bytes) -> str | None:
    """The first value of the request header `name` (lower-case, as ASGI gives names), or None.

    What `request.headers.get` answers, for a fraction of its cost: that makes a Headers object, and
    a missing header (most are: If-Match, If-None-Match, Authorization on a public read) is a
    KeyError raised and caught. A read of a book looks for three."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def media_type(request: Request) -> str:
    """The request body's media type, lower-case, without parameters."""
    return (header(request, b"content-type") or "").split(";")[0].strip().lower()


async def read_json(request: Request, *media_types: str) -> bytes:
    """The raw body, after checking its media type (415); too large a body stops reading (413)."""
    received = media_type(request)
    body = await request.body()
    accepted = media_types or (JSON,)
    if received not in accepted:
        raise HTTPProblem(415, f"Send the body as {' or '.join(accepted)}, not {received or 'nothing'}.")
    return body


def decode(body: bytes, type_: type[T]) -> T:
    """The body as a Struct, or a 400 naming the first bad field; NUL characters are refused too,
    because PostgreSQL cannot store them. A Struct may word its patterns' failures in a
    `pattern_messages` class variable."""
    try:
        value = msgspec.json.decode(body, type=type_)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as error:
        raise invalid_body(error, getattr(type_, "pattern_messages", {})) from None
    for name in value.__struct_fields__:
        if isinstance(text := getattr(value, name), str) and "\x00" in text:
            detail = "Expected a string without NUL characters"
            raise HTTPProblem(400, f"{detail} (#/{name})", errors=[{"pointer": f"#/{name}", "detail": detail}])
    return value


def parse_query(request: Request, type_: type[T]) -> T:
    """The query string as a Struct; a 400 names the first bad, unknown or repeated parameter.
    NUL characters are refused, as in bodies: the databases cannot take them in a search."""
    items = request.query_params.multi_items()
    seen: set[str] = set()
    for name, value in items:
        if name in seen:
            raise invalid_parameter(name, "Give this parameter once.")
        if "\x00" in value:
            raise invalid_parameter(name, "Expected a value without NUL characters.")
        seen.add(name)
    try:
        query = msgspec.convert(dict(items), type_, strict=False)
    except msgspec.ValidationError as error:
        message = str(error)
        name = re.search(r"`\$\.(\w+)`|field `(.*)`", message)
        name = (name.group(1) or name.group(2)) if name else "query"
        raise invalid_parameter(name, re.sub(r" - at `.*`$", "", message)) from None
    # msgspec's lax mode also reads `5.0` and `1e1` as integers, while it refuses `05` and `+5`:
    # an integer in a query is written in digits, nothing else.
    for name, value in items:
        number = getattr(query, name)
        if type(number) is int and value != str(number):
            raise invalid_parameter(name, "Expected `int`, got `str`")
    return query


class NoQuery(Struct, forbid_unknown_fields=True):
    """The query string of an operation that takes none: any parameter in it is unknown."""


def no_query(request: Request) -> None:
    """For an operation without a query Struct: 400 naming the first parameter, if any was sent.
    Its handler calls it where its other 400s would come (after 401, 404, 403)."""
    if request.scope["query_string"]:
        parse_query(request, NoQuery)


def path_id(request: Request) -> int:
    """The `{id}` in the path; an id no row can have (0, or past 64 bits) is simply not found."""
    value = request.path_params["id"]
    if not 0 < value < 2**63:
        raise HTTPProblem(404, f"There is no resource with id {value}.")
    return value


class JSONResponse(Response):
    """A JSON body, encoded by msgspec; extra `headers` as Starlette's Response takes them.

    Its header list is written out here: Starlette's `init_headers` lower-cases and searches
    every name to find out whether Content-Length and Content-Type are given, which they never are."""

    media_type = JSON

    def __init__(self, value: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.status_code, self.background = status, None
        self.body = encoder.encode(value)
        self.raw_headers = [(b"content-length", str(len(self.body)).encode()), (b"content-type", b"application/json")]
        if headers:
            self.raw_headers += [(name.lower().encode("latin-1"), text.encode("latin-1"))
                                 for name, text in headers.items()]


IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # 1–255 visible ASCII characters
SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')  # RFC 8941 §3.3.3


def idempotency_key(request: Request) -> str | None:
    """The request's key, without the quotes of a structured-field string (`"k1"` is `k1`); None
    without the header; 400 naming the header for anything else."""
    values = request.headers.getlist("idempotency-key")
    if not values:
        return None
    key = values[0].strip() if len(values) == 1 else ""
    if string := SF_STRING.fullmatch(key):
        key = re.sub(r"\\(.)", r"\1", string.group(1))
    elif key.startswith('"'):
        key = ""  # a quote that does not open a well-formed string
    if not IDEMPOTENCY_KEY.fullmatch(key):
        detail = "Expected one key of 1–255 visible ASCII characters, optionally in double quotes"
        raise HTTPProblem(400, f"Header `Idempotency-Key`: {detail}.",
                          errors=[{"header": "Idempotency-Key", "detail": detail}])
    return key


def etag_matches(header: str, current: str, *, weak: bool) -> bool:
    """RFC 9110 list matching: `*` or any listed tag. Weak comparison ignores `W/`."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag == current or (weak and tag.removeprefix("W/") == current):
            return True
    return False


# == Pages: keyset cursors, signed so that a client cannot forge one ==============================
# A list's query Struct has `limit`, `cursor` and `sort`; every other field is a filter. A cursor
# records the list, the sort, the filters and the position after which the next page starts.

PAGING = ("limit", "cursor", "sort")


def cursor_filters(query: Struct) -> list:
    return [getattr(query, name) for name in query.__struct_fields__ if name not in PAGING]


def cursor_signature(key: bytes, payload: bytes) -> bytes:
    # Not the one-shot `hmac.digest`: it releases the GIL around the hash, and the event loop then
    # waits for whichever database thread took it to hand it back.
    return hmac.new(key, b"cursor:" + payload, hashlib.sha256).digest()[:12]


def make_cursor(key: bytes, query: Struct, position: list) -> str:
    payload = encoder.encode({"list": type(query).__name__, "sort": query.sort,
                              "filters": cursor_filters(query), "after": position})
    return base64.urlsafe_b64encode(payload + cursor_signature(key, payload)).decode().rstrip("=")


def read_cursor(key: bytes, query: Struct, shape: tuple[type, ...]) -> list | None:
    """The position a cursor records, or a 400 when it is garbage, forged, or made for another
    list, sort or filters than this request's. `shape` is the position's types, e.g. (str, int)."""
    if query.cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(query.cursor + "=" * (-len(query.cursor) % 4))
        payload, signature = raw[:-12], raw[-12:]
        if not hmac.compare_digest(signature, cursor_signature(key, payload)):
            raise ValueError
        state = msgspec.json.decode(payload)
    except (ValueError, msgspec.DecodeError):
        raise invalid_parameter("cursor", "This cursor is not one this API made; use `next` as given.") from None
    if (state.get("list"), state.get("sort"), state.get("filters")) != (
            type(query).__name__, query.sort, cursor_filters(query)):
        raise invalid_parameter("cursor", "This cursor belongs to another list, sort or filters.")
    after = state.get("after")
    if not isinstance(after, list) or [type(value) for value in after] != list(shape):
        raise invalid_parameter("cursor", "This cursor is damaged.")
    return after


def page(request: Request, key: bytes, query: Struct, rows: list[dict],
         position: Callable[[dict], list]) -> tuple[list[dict], str | None, dict[str, str]]:
    """A page from `rows`, which the store read with `limit + 1` to learn whether more follow: its
    items, the `next` URL (a cursor at `position(last item)`, or None) and the `Link` header."""
    items = rows[: query.limit]
    cursor = make_cursor(key, query, position(items[-1])) if len(rows) > query.limit else None
    return (items, *next_page(request, query, cursor))


def next_page(request: Request, query: Struct, cursor: str | None) -> tuple[str | None, dict[str, str]]:
    """The `next` URL (same parameters, new cursor) and the matching `Link` header."""
    if cursor is None:
        return None, {}
    params = {name: getattr(query, name) for name in query.__struct_fields__
              if name != "cursor" and (name == "limit" or name in request.query_params)}
    path = prefixed(request.scope, url_path(route_path(request.scope)))  # with any mount prefix
    url = path + "?" + urlencode({**params, "cursor": cursor})
    return url, {"Link": f'<{url}>; rel="next"'}


# == Operations and routes ========================================================================
# An API is a table of operations. The routes are made from it here, the OpenAPI document in
# openapi.py, and the middleware's knowledge of paths (which are private, which are counted by the
# rate limits) too, so an operation is written down exactly once.


@dataclasses.dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response]]
    tag: str
    ok: tuple[int, Any]  # the success status and the type of its body (None: no body)
    body: Any = None  # the request body's Struct
    query: Any = None  # the query string's Struct
    errors: tuple[int, ...] = ()  # statuses it may answer besides `ok` (400, 500 always; 429, 503 if counted)
    signed_in: bool = False  # needs a bearer token
    media_type: str = JSON  # of the success body
    form: Any = None  # the Struct of an `application/x-www-form-urlencoded` body it also takes
    etag: bool = False  # the success answer carries an ETag
    conditional: bool = False  # honours If-Match and If-None-Match against the ETag (RFC 9110 §13.1)
    private: bool = False  # `Cache-Control: no-store` on every answer here and below (accounts, credentials)
    counted: bool = True  # counted by the rate limits (probes and docs are not)
    strict_limit: bool = False  # also counted by the strict per-route limit (signing in, signing up)
    idempotent: bool = False  # honours an Idempotency-Key header (a retried POST is answered, not redone)


class Endpoint:
    """The ASGI app of one path: calls the handler for the request's method and sends its answer.

    An ASGI app, not a function: Starlette would wrap a function in a second exception-handling
    layer per request, and the app's ExceptionMiddleware already answers what handlers raise."""

    def __init__(self, handlers: dict[str, Callable[[Request], Awaitable[Response]]]) -> None:
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        response = await self.handlers["GET" if method == "HEAD" else method](Request(scope, receive, send))
        await response(scope, receive, send)


def routes(operations: Iterable[Operation]) -> list[Route]:
    """One Route per path, carrying all of its methods, so that a 405 lists them all in `Allow`.

    Starlette tries routes in order: the table's order, so put the busiest paths first."""
    by_path: dict[str, dict[str, Callable]] = {}
    for operation in operations:
        by_path.setdefault(operation.path, {})[operation.method] = operation.handler
    return [Route(path, Endpoint(handlers), methods=list(handlers)) for path, handlers in by_path.items()]


# == Middleware ===================================================================================
# Pure ASGI middleware, not BaseHTTPMiddleware: it runs on every request, so it has to be cheap.

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
CLIENT_GONE = 499  # the status logged and counted for a client that left mid-request (nginx's)
log = logging.getLogger("quire")


class JSONLines(logging.StreamHandler):
    """quire's own handler: each record's message, one JSON line, on stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.pending: list[str] = []
        self.flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on

    def write_line(self, line: str) -> None:
        """What `emit` writes for a record of this line, without making the record: building a
        LogRecord (thread, process, time fields the line does not show) costs more than the write.

        On the event loop, the lines of the requests one turn of the loop finishes go out in one
        write at the start of the next turn (nginx's `access_log ... buffer=` flushes by size or
        time; this, every turn): a line is at most one turn late, and a busy server makes one
        system call for several requests instead of one each."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self.lock:
            self.pending.append(line)
            # One flush per turn of each loop. Another loop's (a test's, which may be gone before
            # its turn comes) does not count: this one schedules its own.
            scheduled, self.flush_on = self.flush_on, loop
        if loop is None:  # no loop running in this thread: now
            self.write_pending()
        elif scheduled is not loop:
            loop.call_soon(self.write_pending)

    def write_pending(self) -> None:
        with self.lock:
            lines, self.pending, self.flush_on = self.pending, [], None
            if not lines:
                return
            try:
                self.stream.write(self.terminator.join(lines) + self.terminator)
                self.stream.flush()
            except Exception:  # a full disk, a closed pipe: reported as `emit` would, never raised into a request
                self.handleError(logging.makeLogRecord({"msg": f"{len(lines)} log line(s) not written"}))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))  # behind the lines already waiting, not before them
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Also what `logging.shutdown` calls at exit: the lines still waiting go out."""
        self.write_pending()
        super().flush()


class UTCClock:
    """Timestamps for log lines (`2026-12-02T19:30:38.245Z`): the part up to the second is
    formatted once a second, which costs a third of formatting a datetime on every line."""

    def __init__(self) -> None:
        self.second = (-1, "")  # one tuple, so that a thread never sees one second's prefix with another's

    def now(self) -> str:
        now = time.time()
        second, prefix = self.second
        if int(now) != second:
            second = int(now)
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self.second = (second, prefix)
        return "%s.%03dZ" % (prefix, (now - second) * 1000)  # `%` costs less than an f-string's format spec


clock = UTCClock()


def log_json(**fields: Any) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {"time": clock.now(), **fields}
    line = encoder.encode(fields).decode()
    handlers = log.handlers
    if len(handlers) == 1 and type(handlers[0]) is JSONLines and not log.filters:  # only quire's own
        handlers[0].write_line(line)
        return
    # Handlers of the embedding app: a record for them, made as log.info() makes one, minus the
    # walk up the stack for the caller's file and line, which the JSON line does not show.
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None))


def log_to_stderr() -> None:
    """One JSON line per record on stderr, unless the embedding app has set up this logger."""
    if not log.handlers:
        log.addHandler(JSONLines())
        log.setLevel(logging.INFO)
        log.propagate = False


# Metrics and trace context, made in the outermost layer so that they see every request, a 429 or
# a 413 included. prometheus-client keeps the numbers; OpenTelemetry is optional: quire runs without
# it, and when its SDK runs the app (`opentelemetry-instrument uvicorn api:app`) quire reports the
# ids of the server span it made, so that the log line and the exported span agree.

# Seconds. A request here takes about 0.1 to 100 ms: the buckets are finest there.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
UNMATCHED = "<unmatched>"  # the route label of every path no route matches: a scanner adds one label, not thousands
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # any other is "other"


class Metrics:
    """One app's Prometheus metrics, in a registry of its own: two apps in one process do not
    collide. With `PROMETHEUS_MULTIPROC_DIR` set (before the process starts), prometheus-client
    writes every worker's numbers to files there, and a scrape of any worker sums them all."""

    def __init__(self) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = prometheus_client.CollectorRegistry()
        self.process_metrics = False  # added at the first scrape: the collector reads /proc when made
        self.requests = self.counter("http_requests", "Requests answered, by method, route template and status.",
                                     ("method", "route", "status"))
        self.latency = prometheus_client.Histogram(
            "http_request_duration_seconds", "Time from a request's arrival to the end of its answer.",
            ("method", "route"), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = prometheus_client.Gauge("http_requests_in_flight", "Requests being answered now.",
                                                 multiprocess_mode="livesum", registry=self.registry)
        # One process: a plain count that the gauge reads at each scrape, for less than half the cost
        # of two locked increments a request. Several: each worker's count lives in its file.
        self.answering = 0
        if not self.multiprocess:
            self.in_flight.set_function(lambda: self.answering)
        # Label look-ups cached: `labels()` checks its arguments and takes a lock on every call.
        self.children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def counter(self, name: str, documentation: str, labels: Iterable[str] = ()) -> prometheus_client.Counter:
        """A counter of this registry (the exposition adds `_total` to its name)."""
        return prometheus_client.Counter(name, documentation, labels, registry=self.registry)

    def started(self) -> None:
        """A request has arrived (`in_flight` goes up by one)."""
        if self.multiprocess:
            self.in_flight.inc()
        else:
            self.answering += 1

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        """A request has been answered (`in_flight` goes down by one)."""
        if self.multiprocess:
            self.in_flight.dec()
        else:
            self.answering -= 1
        key = (method, route, status)
        children = self.children.get(key)
        if children is None:
            children = self.children[key] = (self.requests.labels(method, route, str(status)),
                                             self.latency.labels(method, route))
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The text a scrape gets, in the format its Accept header asks for, and its media type."""
        registry = self.registry
        if not self.multiprocess and not self.process_metrics:  # workers' CPU and memory cannot be summed
            prometheus_client.ProcessCollector(registry=registry)
            self.process_metrics = True
        if self.multiprocess:
            registry = prometheus_client.CollectorRegistry()
            prometheus_client.multiprocess.MultiProcessCollector(registry)
        encode, media_type = prometheus_client.exposition.choose_encoder(accept)
        return encode(registry), media_type


def route_template(scope: Scope, outer_route: Any, routes: Iterable[BaseRoute]) -> str:
    """The path template of the route that answered (`/api/v1/books/{id:int}`), never the raw path.

    The router leaves it in the scope. A request answered before routing (a 429, a 413) is
    matched here, as the router would have; `outer_route` is a parent app's Mount, if mounted."""
    route = scope.get("route")
    if route is not None and route is not outer_route:
        return route.path
    for route in routes:
        if route.matches(scope)[0] is not Match.NONE:
            return route.path
    return UNMATCHED


# Version 00 is exactly 55 characters; a later version may append fields after a dash.
TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)
NO_TRACE, NO_PARENT = b"0" * 32, b"0" * 16
# The flags quire passes on, by their hex in the header: those defined so far, sampled (1) and random id (2).
FLAGS = {f"{flags:02x}".encode(): f"{flags & 3:02x}" for flags in range(256)}


def parent_trace(header: bytes) -> tuple[str, str] | None:
    """The trace id and flags of a W3C `traceparent` (Trace Context §3.2), or None for a malformed
    one, which is ignored rather than refused: a broken tracer upstream must not break requests."""
    match = TRACEPARENT.fullmatch(header)
    if match is None:
        return None
    version, trace_id, parent_id, flags, more = match.groups()
    if version == b"ff" or (version == b"00" and more) or trace_id == NO_TRACE or parent_id == NO_PARENT:
        return None
    return trace_id.decode(), FLAGS[flags]


def trace_ids(traceparent: bytes | None) -> tuple[str, str, str]:
    """(trace id, span id, flags) of this request: the OpenTelemetry server span's when one is
    active, else the caller's trace (a valid `traceparent`) or a new one, with a span id of its own.

    The ids are pseudo-random, as OpenTelemetry's SDK makes them: unique, not secret. (Written
    with `%`, which costs three quarters of an f-string's format spec.)"""
    # An empty context, the usual case when no SDK runs, holds no span: a third of the look-up's cost.
    if opentelemetry_trace is not None and opentelemetry_context.get_current():
        span = opentelemetry_trace.get_current_span().get_span_context()
        if span.is_valid:
            return "%032x" % span.trace_id, "%016x" % span.span_id, "%02x" % span.trace_flags
    parent = parent_trace(traceparent) if traceparent else None
    span_id = "%016x" % (random.getrandbits(64) or 1)  # never all zeros, which means "no span"
    if parent is None:  # a new trace, not recorded by any tracer: not sampled, its id random
        return "%032x" % (random.getrandbits(128) or 1), span_id, "02"
    return parent[0], span_id, parent[1]


class RequestMiddleware:
    """The outermost layer of every request.

    Gives it an id (X-Request-ID) and its trace context (W3C `traceparent` in, `traceresponse`
    out), adds the headers every response carries, counts it in the metrics and writes one JSON
    log line. Paths and statuses are logged; headers and bodies, where passwords and tokens
    travel, never are. Answers for paths under the `private` prefixes are marked
    `Cache-Control: no-store`, whatever their status (a 404 or 413 included).
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Iterable[BaseRoute],
                 private: tuple[str, ...] = ()) -> None:
        self.app, self.metrics, self.routes, self.private = app, metrics, list(routes), private

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id, traceparent = "", None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"traceparent":
                traceparent = value if traceparent is None else b""  # two of them: neither counts
        if not (request_id and REQUEST_ID.fullmatch(request_id)):
            request_id = "%032x" % random.getrandbits(128)  # unique, not secret (as trace ids)
        trace_id, span_id, flags = trace_ids(traceparent)
        state = scope.setdefault("state", {})
        state["request_id"], state["trace_id"] = request_id, trace_id
        private = route_path(scope).startswith(self.private) if self.private else False
        outer_route = scope.get("route")
        status = 500  # what the log says if an exception escapes before a response starts

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Appended, not set: no handler sends these, and set would search the list.
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode()),
                                      (b"traceresponse", f"00-{trace_id}-{span_id}-{flags}".encode()),
                                      (b"x-content-type-options", b"nosniff")]
                if private:
                    MutableHeaders(scope=message)["Cache-Control"] = "no-store"
            await send(message)

        self.metrics.started()
        try:
            await self.app(scope, receive, send_with_headers)
        except ClientDisconnect:  # gone before its body was read: nobody to answer, nothing went wrong here
            status = CLIENT_GONE
        finally:
            seconds = time.perf_counter() - started
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.record(method, route_template(scope, outer_route, self.routes), status, seconds)
            # Milliseconds to the microsecond, truncated: `round(ms, 3)` would cost five times as much.
            log_json(request_id=request_id, trace_id=trace_id, span_id=span_id, method=scope["method"],
                     path=scope["path"], status=status, duration_ms=int(seconds * 1e6) / 1000)


class GuardMiddleware:
    """Refuses bodies over the limit without reading them (413), and turns an unexpected exception
    into a 500 problem that shows no internals; the traceback goes to the log with the request id.

    It sits inside the CORS layer, so that a browser may read these answers too.
    """

    def __init__(self, app: ASGIApp, *, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.too_large = f"The body is larger than {max_body} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received, started = 0, False

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPProblem(413, self.too_large)
            return message

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body:
                return await problem_response(scope, 413, self.too_large)(scope, receive, send)
        # A GET or HEAD has no body for a handler to read (RFC 9110 §9.3.1). What is read of one is
        # only listened to for a disconnect (a streamed file does) and thrown away: refused, it
        # would cut the file short. A declared Content-Length over the limit is still a 413 above.
        bounded = receive if scope["method"] in ("GET", "HEAD") else receive_limited
        try:
            await self.app(scope, bounded, send_tracked)
        except ClientDisconnect:
            raise  # not a fault: RequestMiddleware logs it as the client's leaving
        except Exception:
            request_id = scope["state"].get("request_id")
            log_json(request_id=request_id, trace_id=scope["state"].get("trace_id"), error=traceback.format_exc())
            if started:  # the response has begun: all that is left is to drop the connection
                raise
            response = problem_response(scope, 500, "Something went wrong on our side; the request id says where.",
                                        request_id=request_id)
            await response(scope, receive, send)


class TokenBuckets:
    """Per-client token buckets: `per_minute` requests a minute, in bursts of up to that many.

    Memory is bounded: past `max_clients` the least recently seen client is forgotten (and
    starts again with a full bucket), so a flood of distinct addresses cannot grow it.
    """

    def __init__(self, per_minute: int, max_clients: int = 10_000) -> None:
        self.capacity, self.rate, self.max_clients = per_minute, per_minute / 60, max_clients
        self.buckets: collections.OrderedDict[Any, tuple[float, float]] = collections.OrderedDict()

    def level(self, client: Any, now: float) -> float:
        """The tokens `client` has at `now`: what it had, refilled since."""
        tokens, last = self.buckets.get(client, (self.capacity, now))
        return min(self.capacity, tokens + (now - last) * self.rate)

    def keep(self, client: Any, tokens: float, now: float) -> None:
        self.buckets.pop(client, None)
        self.buckets[client] = (tokens, now)  # (re)inserted last: the most recently seen
        if len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)

    def standing(self, tokens: float) -> tuple[int, int]:
        """For a client with `tokens` left: `r`, the requests it may still make, and `t`, the
        seconds until its bucket is full again, or, with none left, until the next request is
        allowed (a 429's Retry-After)."""
        seconds = (1 - tokens) / self.rate if tokens < 1 else (self.capacity - tokens) / self.rate
        return int(tokens), math.ceil(seconds)


class RateLimitMiddleware:
    """429 with Retry-After once a client (its address as the server reports it) has used its
    share: the general limit on every counted request, and a stricter one per route on the
    `strict` (method, path) pairs, where guessing passwords or mass sign-ups would happen.
    Requests for the `uncounted` paths, or under the `uncounted_prefixes`, never count. Per process.

    Every counted answer, a 429 too, says where the client stands in the fields of
    draft-ietf-httpapi-ratelimit-headers: `RateLimit-Policy` lists the policies that apply
    (`"general";q=600;w=60`, and `"auth";q=10;w=60` on the strict routes) and `RateLimit` the
    one closest to refusing (`"general";r=599;t=1`)."""

    def __init__(self, app: ASGIApp, *, per_minute: int, auth_per_minute: int,
                 strict: Iterable[tuple[str, str]] = (), uncounted: Iterable[str] = (),
                 uncounted_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.general = TokenBuckets(per_minute)
        self.strict = TokenBuckets(auth_per_minute)
        self.strict_routes = frozenset(strict)
        self.uncounted, self.uncounted_prefixes = frozenset(uncounted), uncounted_prefixes
        # Made once: per request only the `RateLimit` item is formatted.
        general = f'"general";q={per_minute};w=60'
        self.general_policy = general.encode()
        self.strict_policy = f'{general}, "auth";q={auth_per_minute};w=60'.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = route_path(scope)
        if path in self.uncounted or path.startswith(self.uncounted_prefixes):
            return await self.app(scope, receive, send)
        client = scope["client"][0] if scope.get("client") else None
        now = time.monotonic()
        buckets = [("general", self.general, client)]
        if (scope["method"], path) in self.strict_routes:
            buckets.append(("auth", self.strict, (path, client)))
        levels = [bucket.level(key, now) for _, bucket, key in buckets]
        allowed = min(levels) >= 1
        standings = []
        for (name, bucket, key), level in zip(buckets, levels):
            left = level - 1 if allowed else level  # a refused request spends from no bucket
            bucket.keep(key, left, now)
            standings.append((*bucket.standing(left), name))
        # The one closest to refusing: the fewest requests left, then the longest wait (on a 429,
        # the bucket that refuses longest, which Retry-After repeats).
        remaining, seconds, name = min(standings, key=lambda standing: (standing[0], -standing[1]))
        policy = self.strict_policy if len(buckets) > 1 else self.general_policy
        fields = [(b"ratelimit-policy", policy), (b"ratelimit", f'"{name}";r={remaining};t={seconds}'.encode())]

        async def send_with_fields(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *fields]
            await send(message)

        if not allowed:
            response = problem_response(scope, 429, "Too many requests; slow down and retry after the given seconds.",
                                        headers={"Retry-After": str(seconds)})
            return await response(scope, receive, send_with_fields)
        await self.app(scope, receive, send_with_fields)
