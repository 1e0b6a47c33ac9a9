"""quire's HTTP API: a small bookstore on Starlette and msgspec.

api.py is the only module that knows HTTP. It declares the request and response bodies as msgspec
Structs, the operations (one table, from which both the routes and the OpenAPI document are made),
the errors as RFC 9457 problem details, the middleware, `create_app()` and the command line.
SQL lives in store.py; passwords, tokens and permission rules in auth.py.

    python api.py                       serve on http://127.0.0.1:8000 (SQLite in ./quire.db)
    python api.py create-admin EMAIL NAME    make or promote an admin (password on stdin)
    python api.py demo                  a sample user and a few books in an empty database
"""

import asyncio
import base64
import collections
import contextlib
import dataclasses
import functools
import datetime
import getpass
import hashlib
import hmac
import html
import logging
import math
import os
import re
import secrets
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Annotated, Any, ClassVar, Literal, TypeVar
from urllib.parse import urlencode

import msgspec
import openapi_ui_bundles
from msgspec import UNSET, Meta, Struct, UnsetType
from starlette.applications import Starlette
from starlette.config import Config
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import auth
import store as storage

# == Configuration ================================================================================


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything configurable, one field per environment variable (QUIRE_ + upper-case name)."""

    database_url: str = "sqlite:///quire.db"
    secret_key: str | None = None  # at least 32 bytes, checked in load()
    token_ttl: Annotated[int, Meta(ge=1)] = 3600
    rate_limit: Annotated[int, Meta(ge=0)] = 600  # requests a minute per client; 0 turns limits off
    auth_rate_limit: Annotated[int, Meta(ge=1)] = 10
    cors_origins: tuple[str, ...] = ()
    max_body: Annotated[int, Meta(ge=1)] = 1024 * 1024

    @classmethod
    def load(cls, config: Config, overrides: dict[str, Any]) -> "Settings":
        """Keyword overrides beat the environment (and `.env`), which beats the defaults."""
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            env_name = "DATABASE_URL" if field.name == "database_url" else f"QUIRE_{field.name.upper()}"
            value = overrides.get(field.name, config(env_name, default=None))
            if value is None or value == "":
                continue
            if field.name == "cors_origins" and isinstance(value, str):
                value = [origin.strip() for origin in value.split(",") if origin.strip()]
            values[field.name] = tuple(value) if field.name == "cors_origins" else value
        try:
            settings = msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as error:
            field = re.search(r"`\$\.(\w+)`", str(error))
            name = field.group(1).upper() if field else "?"
            name = name if name == "DATABASE_URL" else f"QUIRE_{name}"
            raise ValueError(f"{name} is wrong: {re.sub(r' - at `.*`$', '', str(error))}.") from None
        if settings.secret_key is not None and len(settings.secret_key.encode()) < 32:
            raise ValueError("QUIRE_SECRET_KEY must be at least 32 bytes; make one with "
                             "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`.")
        return settings


# == Bodies =======================================================================================
# Every request body decodes straight into one of these Structs. `forbid_unknown_fields` makes a
# misspelt or server-owned field (`id`, `owner_id`, `role`, timestamps) an error instead of being
# silently dropped: nobody can assign what they are not meant to.


class RequestBody(Struct, forbid_unknown_fields=True):
    pass


Title = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"\S",
                            description="1–200 characters, not only whitespace")]
Year = Annotated[int, Meta(ge=1, le=2100)]
Pages = Annotated[int, Meta(ge=1, le=100_000)]
Isbn = Annotated[str, Meta(max_length=40, examples=["978-0-13-235088-4"],
                           description="ISBN-13; hyphens and spaces are removed, the check digit is verified")]
Timestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
Email = Annotated[str, Meta(max_length=254, pattern=r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")]


class BookIn(RequestBody):
    """A book as created (POST) or replaced (PUT); a missing optional field becomes null."""

    example: ClassVar[dict] = {"title": "Clean Code", "author": "Robert C. Martin", "year": 2008,
                               "pages": 464, "isbn": "978-0-13-235088-4"}

    title: Title
    author: Title
    year: Year | None = None
    pages: Pages | None = None
    isbn: Isbn | None = None


class BookPatch(RequestBody):
    """A JSON merge patch (RFC 7396): absent fields stay, `null` clears an optional field."""

    example: ClassVar[dict] = {"pages": 431, "isbn": None}

    title: Title | UnsetType = UNSET
    author: Title | UnsetType = UNSET
    year: Year | None | UnsetType = UNSET
    pages: Pages | None | UnsetType = UNSET
    isbn: Isbn | None | UnsetType = UNSET


class Book(Struct):
    id: int
    title: str
    author: str
    year: int | None
    pages: int | None
    isbn: str | None
    owner_id: int
    created_at: Timestamp
    updated_at: Timestamp


class BookPage(Struct):
    items: list[Book]
    next: str | None


class UserIn(RequestBody):
    """Registration; the email is stored lower-case."""

    example: ClassVar[dict] = {"email": "ada@example.com", "name": "Ada", "password": "correct horse"}

    email: Email
    name: Annotated[str, Meta(min_length=1, max_length=100)]
    password: Annotated[str, Meta(min_length=8, max_length=128)]


class User(Struct):
    id: int
    email: str
    name: str
    role: Literal["user", "admin"]
    created_at: Timestamp


class UserPage(Struct):
    items: list[User]
    next: str | None


class Credentials(RequestBody):
    example: ClassVar[dict] = {"email": "ada@example.com", "password": "correct horse"}

    email: Annotated[str, Meta(max_length=254)]
    password: Annotated[str, Meta(max_length=1024)]


class Token(Struct):
    access_token: str
    expires_in: int
    token_type: Literal["bearer"] = "bearer"


class Status(Struct):
    status: str


class Problem(Struct, omit_defaults=True):
    """An RFC 9457 problem; `errors` names the bad fields (`pointer`) or query parameters."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, str]] = []
    request_id: str | None = None


# Query strings are checked like bodies: converted into a Struct, unknown parameters refused.


class BookQuery(RequestBody):
    limit: Annotated[int, Meta(ge=1, le=100)] = 20
    cursor: str | None = None
    sort: Literal["id", "-id", "title", "-title"] = "id"
    author: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    q: Annotated[str, Meta(min_length=1, max_length=100)] | None = None


class UserQuery(RequestBody):
    limit: Annotated[int, Meta(ge=1, le=100)] = 20
    cursor: str | None = None
    sort: Literal["id", "-id"] = "id"


encoder = msgspec.json.Encoder()
T = TypeVar("T")
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"

# == Errors =======================================================================================
# Everything that goes wrong becomes an `HTTPProblem`, raised anywhere and answered in one place
# (`problem_response`) as application/problem+json.


class HTTPProblem(Exception):
    def __init__(self, status: int, detail: str, *, errors: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.errors, self.headers = status, detail, errors or [], headers or {}


TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
          405: "Method Not Allowed", 409: "Conflict", 412: "Precondition Failed",
          413: "Content Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests",
          500: "Internal Server Error", 503: "Service Unavailable"}


def problem_response(status: int, detail: str, *, errors: list[dict[str, str]] | None = None,
                     headers: dict[str, str] | None = None, request_id: str | None = None) -> Response:
    problem = Problem(type="about:blank", title=TITLES.get(status, "Error"), status=status, detail=detail,
                      errors=errors or [], request_id=request_id)
    return Response(encoder.encode(problem), status, headers, "application/problem+json")


def unauthorized(detail: str) -> HTTPProblem:
    return HTTPProblem(401, detail, headers={"WWW-Authenticate": 'Bearer realm="quire"'})


# msgspec words a failed pattern as the regex itself; a person reads these instead.
PATTERN_MESSAGES = {"title": "Expected text that is not only whitespace",
                    "author": "Expected text that is not only whitespace",
                    "email": "Expected an email address like ada@example.com"}


def invalid_body(error: Exception) -> HTTPProblem:
    """A 400 for a body msgspec refused, with a JSON pointer to the first bad field."""
    message = str(error)
    if isinstance(error, UnicodeDecodeError):
        return HTTPProblem(400, "The body is not valid UTF-8.", errors=[{"pointer": "#", "detail": "invalid UTF-8"}])
    if isinstance(error, RecursionError):
        message = "JSON is nested too deeply"
    message = re.sub(r"Expected `str` matching regex '.*'", lambda _: PATTERN_MESSAGES.get(
        re.search(r"`\$\.(\w+)`", message).group(1), "Expected a different format"), message)
    path = re.search(r" - at `\$(.*)`$", message)
    field = re.search(r"(?:missing required|unknown) field `(.+)`", message)
    if path:
        message = message[: path.start()]
        pointer = "#" + re.sub(r"\.|\[(\d+)\]", lambda m: "/" + (m.group(1) or ""), path.group(1))
    else:
        pointer = f"#/{field.group(1)}" if field else "#"
    return HTTPProblem(400, f"{message} ({pointer})", errors=[{"pointer": pointer, "detail": message}])


def invalid_parameter(name: str, detail: str) -> HTTPProblem:
    return HTTPProblem(400, f"Query parameter `{name}`: {detail}", errors=[{"parameter": name, "detail": detail}])


async def on_problem(request: Request, error: HTTPProblem) -> Response:
    return problem_response(error.status, error.detail, errors=error.errors, headers=error.headers)


async def on_http_exception(request: Request, error: HTTPException) -> Response:
    """Starlette's own 404 (no such route) and 405 (method not allowed, with `Allow`)."""
    detail = {404: f"No route matches {request.url.path}.",
              405: f"{request.method} is not allowed on {request.url.path}."}.get(error.status_code, error.detail)
    return problem_response(error.status_code, detail, headers=error.headers)


async def on_unavailable(request: Request, error: storage.Unavailable) -> Response:
    return problem_response(503, "The database is unavailable; try again shortly.", headers={"Retry-After": "2"})


async def on_conflict(request: Request, error: storage.Conflict) -> Response:
    detail = f"That {error.field} is already taken."
    return problem_response(409, detail, errors=[{"pointer": f"#/{error.field}", "detail": detail}])


# == Middleware ===================================================================================
# Pure ASGI middleware, not BaseHTTPMiddleware: it runs on every request, so it has to be cheap.

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
log = logging.getLogger("quire")


def log_json(**fields: Any) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")[:-6] + "Z", **fields}
    # makeRecord + handle is what log.info() does, minus the walk up the stack for the caller's
    # file and line, which the JSON line does not show; this runs for every request.
    log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, encoder.encode(fields).decode(), None, None))


class RequestMiddleware:
    """The outermost layer of every request.

    Gives it an id (X-Request-ID), adds the headers every response carries, and writes one JSON
    log line. Paths and statuses are logged; headers and bodies, where passwords and tokens
    travel, never are.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
        if not REQUEST_ID.fullmatch(request_id):
            request_id = secrets.token_hex(16)
        scope.setdefault("state", {})["request_id"] = request_id
        route_path = scope["path"][len(scope.get("root_path", "")):]
        private = route_path.startswith(("/api/v1/users", "/api/v1/auth"))
        status = 500  # what the log says if an exception escapes before a response starts

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Appended, not set: no handler sends these two, and set would search the list.
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode()),
                                      (b"x-content-type-options", b"nosniff")]
                if private:
                    MutableHeaders(scope=message)["Cache-Control"] = "no-store"
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            log_json(request_id=request_id, method=scope["method"], path=scope["path"], status=status,
                     duration_ms=round((time.perf_counter() - started) * 1000, 3))


class GuardMiddleware:
    """Refuses bodies over the limit without reading them (413), and turns an unexpected exception
    into a 500 problem that shows no internals; the traceback goes to the log with the request id.

    It sits inside the CORS layer, so that a browser may read these answers too.
    """

    def __init__(self, app: ASGIApp, *, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"The body is larger than {self.max_body} bytes."
        received, started = 0, False

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPProblem(413, too_large)
            return message

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body:
            return await problem_response(413, too_large)(scope, receive, send)
        try:
            await self.app(scope, receive_limited, send_tracked)
        except Exception:
            request_id = scope["state"].get("request_id")
            log_json(request_id=request_id, error=traceback.format_exc())
            if started:  # the response has begun: all that is left is to drop the connection
                raise
            response = problem_response(500, "Something went wrong on our side; the request id says where.",
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

    def take(self, client: Any, now: float) -> float:
        """Spend one token; 0 when allowed, else the seconds until a token is back."""
        tokens, last = self.buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self.buckets[client] = (tokens, now)  # (re)inserted last: the most recently seen
        if len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return 0.0 if allowed else (1 - tokens) / self.rate


# Requests that never count: probes and the docs.
UNCOUNTED = ("/healthz", "/readyz", "/openapi.json", "/docs")
STRICT = {("POST", "/api/v1/auth/token"), ("POST", "/api/v1/users")}


class RateLimitMiddleware:
    """429 with Retry-After once a client (its address as the server reports it) has used its
    share: the general limit on every counted request, and a stricter one per route on signing
    in and registering, where guessing passwords or mass sign-ups would happen. Per process."""

    def __init__(self, app: ASGIApp, *, per_minute: int, auth_per_minute: int) -> None:
        self.app = app
        self.general = TokenBuckets(per_minute)
        self.strict = TokenBuckets(auth_per_minute)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route_path = scope["path"][len(scope.get("root_path", "")):]
        if route_path not in UNCOUNTED and not route_path.startswith("/docs/"):
            client = scope["client"][0] if scope.get("client") else None
            now = time.monotonic()
            wait = self.general.take(client, now)
            if (scope["method"], route_path) in STRICT:
                wait = max(wait, self.strict.take((route_path, client), now))
            if wait:
                response = problem_response(429, "Too many requests; slow down and retry after the given seconds.",
                                            headers={"Retry-After": str(math.ceil(wait))})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# == Helpers for handlers =========================================================================


@dataclasses.dataclass
class Quire:
    """One app's state: its settings, its store and its key (read from the store when not set)."""

    settings: Settings
    store: storage.Store
    key: bytes | None = None

    async def signing_key(self) -> bytes:
        if self.key is None:
            self.key = (self.settings.secret_key or await self.store.secret_key()).encode()
        return self.key


def quire(request: Request) -> Quire:
    return request.app.state.quire


def app_path(request: Request, path: str) -> str:
    """A URL path for this app, with the prefix it is mounted under (or served behind)."""
    prefix = request.scope.get("root_path", "")
    # Escaped as Starlette escapes request.url: a parametrised mount takes its prefix from the
    # client, and a bare `?`, `#` or backslash would make the URL point somewhere else.
    return prefix.replace("?", "%3F").replace("#", "%23").replace("\\", "%5C") + path


async def read_json(request: Request, *media_types: str) -> bytes:
    """The raw body, after checking its media type (415); too large a body stops reading (413)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    accepted = media_types or (JSON,)
    if media_type not in accepted:
        raise HTTPProblem(415, f"Send the body as {' or '.join(accepted)}, not {media_type or 'nothing'}.")
    return body


def decode(body: bytes, type_: type[T]) -> T:
    """The body as a Struct, or a 400 naming the first bad field; NUL characters are refused too,
    because PostgreSQL cannot store them."""
    try:
        value = msgspec.json.decode(body, type=type_)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as error:
        raise invalid_body(error) from None
    for name in value.__struct_fields__:
        if isinstance(text := getattr(value, name), str) and "\x00" in text:
            detail = "Expected a string without NUL characters"
            raise HTTPProblem(400, f"{detail} (#/{name})", errors=[{"pointer": f"#/{name}", "detail": detail}])
    return value


def parse_query(request: Request, type_: type[T]) -> T:
    """The query string as a Struct; a 400 names the first bad, unknown or repeated parameter."""
    items = request.query_params.multi_items()
    seen: set[str] = set()
    for name, _ in items:
        if name in seen:
            raise invalid_parameter(name, "Give this parameter once.")
        seen.add(name)
    try:
        return msgspec.convert(dict(items), type_, strict=False)
    except msgspec.ValidationError as error:
        message = str(error)
        name = re.search(r"`\$\.(\w+)`|field `(.+)`", message)
        name = (name.group(1) or name.group(2)) if name else "query"
        raise invalid_parameter(name, re.sub(r" - at `.*`$", "", message)) from None


def path_id(request: Request) -> int:
    """The `{id}` in the path; an id no row can have (0, or past 64 bits) is simply not found."""
    value = request.path_params["id"]
    if not 0 < value < 2**63:
        raise HTTPProblem(404, f"There is no resource with id {value}.")
    return value


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(encoder.encode(value), status, headers, JSON)


async def signed_in(request: Request) -> storage.Row:
    """The caller, from `Authorization: Bearer`; 401 for no token or one that is bad, expired,
    revoked, or whose user is gone. The user's role is read now, so a promotion counts at once."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("Sign in: send `Authorization: Bearer <token>` from POST /api/v1/auth/token.")
    app = quire(request)
    try:
        claims = auth.read_token(token.strip(), await app.signing_key())
        user_id = int(claims["sub"])
        if not 0 < user_id < 2**63:
            raise ValueError("its subject is not a user id")
    except (auth.InvalidToken, ValueError) as error:
        raise unauthorized(f"The token was refused: {error}.") from None
    user = await app.store.get_token_user(user_id, claims["jti"])
    if user is None:
        raise unauthorized("The token was revoked, or its user no longer exists.")
    request.state.claims = claims
    return user


# -- cursors: a page's position, signed so that a client cannot forge one -------------------------


def make_cursor(key: bytes, query: Struct, position: list) -> str:
    payload = encoder.encode({"list": type(query).__name__, "sort": query.sort,
                              "filters": cursor_filters(query), "after": position})
    signature = hmac.new(key, b"cursor:" + payload, hashlib.sha256).digest()[:12]
    return base64.urlsafe_b64encode(payload + signature).decode().rstrip("=")


def cursor_filters(query: Struct) -> list:
    return [getattr(query, "author", None), getattr(query, "q", None)]


def read_cursor(key: bytes, query: Struct, shape: tuple[type, ...]) -> list | None:
    """The position a cursor records, or a 400 when it is garbage, forged, or made for another
    list, sort or filters than this request's. `shape` is the position's types, e.g. (str, int)."""
    if query.cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(query.cursor + "=" * (-len(query.cursor) % 4))
        payload, signature = raw[:-12], raw[-12:]
        expected = hmac.new(key, b"cursor:" + payload, hashlib.sha256).digest()[:12]
        if not hmac.compare_digest(signature, expected):
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


def next_page(request: Request, query: Struct, cursor: str | None) -> tuple[str | None, dict[str, str]]:
    """The `next` URL (same parameters, new cursor) and the matching `Link` header."""
    if cursor is None:
        return None, {}
    params = {name: getattr(query, name) for name in query.__struct_fields__
              if name != "cursor" and (name == "limit" or name in request.query_params)}
    url = request.url.path + "?" + urlencode({**params, "cursor": cursor})  # the path carries any mount prefix
    return url, {"Link": f'<{url}>; rel="next"'}


# -- conditional requests ------------------------------------------------------------------------


def etag(book: storage.Row) -> str:
    """Strong, and new on every write: the row's version goes up by one with each."""
    return f'"{book["id"]}.{book["version"]}"'


def etag_matches(header: str, current: str, *, weak: bool) -> bool:
    """RFC 9110 list matching: `*` or any listed tag. Weak comparison ignores `W/`."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag == current or (weak and tag.removeprefix("W/") == current):
            return True
    return False


# == Users and tokens =============================================================================


async def register(request: Request) -> Response:
    """Create an account; the response's Location is the new user."""
    credentials = decode(await read_json(request), UserIn)
    password_hash = await auth.hash_password(credentials.password)
    user = await quire(request).store.create_user(
        email=credentials.email.lower(), name=credentials.name, password_hash=password_hash)
    location = app_path(request, f"/api/v1/users/{user['id']}")
    return json_response(msgspec.convert(user, User), 201, {"Location": location})


async def issue_token(request: Request) -> Response:
    """Exchange email and password for a bearer token; a wrong email or password is the same 401."""
    credentials = decode(await read_json(request), Credentials)
    app = quire(request)
    user = await app.store.get_login(credentials.email.lower())
    if not await auth.verify_password(user and user["password_hash"], credentials.password):
        raise unauthorized("The email or the password is wrong.")
    token, _ = auth.make_token(user["id"], await app.signing_key(), app.settings.token_ttl)
    return json_response(Token(access_token=token, expires_in=app.settings.token_ttl))


async def logout(request: Request) -> Response:
    """Revoke the token this request carries, for every worker sharing the database."""
    await signed_in(request)
    claims = request.state.claims
    await quire(request).store.revoke_token(claims["jti"], int(claims["exp"]) + auth.LEEWAY_SECONDS)
    return Response(status_code=204)


async def me(request: Request) -> Response:
    """The signed-in user."""
    return json_response(msgspec.convert(await signed_in(request), User))


async def get_user(request: Request) -> Response:
    """One user: yourself, or anyone if you are an admin. Others get 403 whether the id exists or
    not, so that ids cannot be probed."""
    viewer = await signed_in(request)
    user_id = request.path_params["id"]
    if not auth.can_see_user(viewer, user_id):
        raise HTTPProblem(403, "You may only see your own account.")
    user = await quire(request).store.get_user(path_id(request))
    if user is None:
        raise HTTPProblem(404, f"There is no user with id {user_id}.")
    return json_response(msgspec.convert(user, User))


async def list_users(request: Request) -> Response:
    """A page of users, for admins; keyset pagination by id."""
    viewer = await signed_in(request)
    if not auth.is_admin(viewer):
        raise HTTPProblem(403, "Only admins may list users.")
    query = parse_query(request, UserQuery)
    app = quire(request)
    key = await app.signing_key()
    after = read_cursor(key, query, (int,))
    rows = await app.store.list_users(limit=query.limit + 1, descending=query.sort == "-id",
                                      after=after[0] if after else None)
    items = rows[: query.limit]
    cursor = make_cursor(key, query, [items[-1]["id"]]) if len(rows) > query.limit else None
    next_url, headers = next_page(request, query, cursor)
    return json_response(UserPage(items=msgspec.convert(items, list[User]), next=next_url), headers=headers)


# == Books ========================================================================================


def normalise_isbn(fields: dict[str, Any]) -> dict[str, Any]:
    """Remove hyphens and spaces from `isbn` and check it is an ISBN-13 (400 if not)."""
    if fields.get("isbn") is None:
        return fields
    isbn = re.sub(r"[-\s]", "", fields["isbn"])
    digits = [int(c) for c in isbn] if isbn.isascii() and isbn.isdigit() else []
    if len(digits) != 13:
        detail = "Expected an ISBN-13: 13 digits, hyphens and spaces allowed"
    elif sum(d * (3 if i % 2 else 1) for i, d in enumerate(digits)) % 10:
        detail = "The ISBN-13's check digit is wrong"
    else:
        return {**fields, "isbn": isbn}
    raise HTTPProblem(400, f"{detail} (#/isbn)", errors=[{"pointer": "#/isbn", "detail": detail}])


def book_response(book: storage.Row, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return json_response(msgspec.convert(book, Book), status, {"ETag": etag(book), **(headers or {})})


async def changeable_book(request: Request) -> storage.Row:
    """The book in the path, if the signed-in caller may change it.

    :raise 401: no valid token.  :raise 404: no such book.  :raise 403: not the owner nor an admin.
    """
    user = await signed_in(request)
    book = await quire(request).store.get_book(path_id(request))
    if book is None:
        raise HTTPProblem(404, f"There is no book with id {request.path_params['id']}.")
    if not auth.can_change_book(user, book):
        raise HTTPProblem(403, "Only the book's owner or an admin may change it.")
    return book


def expected_version(request: Request, book: storage.Row) -> int | None:
    """The version a write must find (compare-and-set), if the client sent If-Match; 412 when
    the book has already moved on."""
    header = request.headers.get("if-match")
    if header is None:
        return None
    if not etag_matches(header, etag(book), weak=False):
        raise HTTPProblem(412, f"The book has changed: its ETag is now {etag(book)}.")
    return book["version"]


async def check_presented_token(request: Request) -> None:
    """Public reads need no token, but one that is sent is still checked (401 if bad)."""
    if "authorization" in request.headers:
        await signed_in(request)


async def list_books(request: Request) -> Response:
    """A page of books: filter with `author` or `q`, order with `sort`, continue with `next`."""
    await check_presented_token(request)
    query = parse_query(request, BookQuery)
    app = quire(request)
    key = await app.signing_key()
    after = read_cursor(key, query, (str, int))
    rows = await app.store.list_books(limit=query.limit + 1, sort=query.sort, author=query.author,
                                      q=query.q, after=tuple(after) if after else None)
    items = rows[: query.limit]
    cursor = None
    if len(rows) > query.limit:
        cursor = make_cursor(key, query, [items[-1]["title"], items[-1]["id"]])
    next_url, headers = next_page(request, query, cursor)
    return json_response(BookPage(items=msgspec.convert(items, list[Book]), next=next_url), headers=headers)


async def create_book(request: Request) -> Response:
    """Add a book; you become its owner."""
    body = await read_json(request)
    user = await signed_in(request)
    fields = normalise_isbn(msgspec.structs.asdict(decode(body, BookIn)))
    book = await quire(request).store.create_book(owner_id=user["id"], fields=fields)
    return book_response(book, 201, {"Location": app_path(request, f"/api/v1/books/{book['id']}")})


async def get_book(request: Request) -> Response:
    """One book, with its ETag; send If-None-Match to get 304 when it has not changed."""
    await check_presented_token(request)
    book = await quire(request).store.get_book(path_id(request))
    if book is None:
        raise HTTPProblem(404, f"There is no book with id {request.path_params['id']}.")
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and etag_matches(if_none_match, etag(book), weak=True):
        return Response(status_code=304, headers={"ETag": etag(book)})
    return book_response(book)


async def write_book(request: Request, body: bytes, type_: type[Struct]) -> Response:
    """PUT and PATCH: decode, then one conditional UPDATE; 412 if someone else wrote first."""
    book = await changeable_book(request)
    changes = decode(body, type_)
    fields = {name: value for name, value in msgspec.structs.asdict(changes).items() if value is not UNSET}
    fields = normalise_isbn(fields)
    version = expected_version(request, book)
    if not fields:  # an empty merge patch changes nothing, not even the ETag
        return book_response(book)
    updated = await quire(request).store.update_book(book["id"], fields, version=version)
    if updated is None:
        raise await lost_race(request, book["id"])
    return book_response(updated)


async def lost_race(request: Request, book_id: int) -> HTTPProblem:
    """Why a conditional write matched no row: the book is gone (404) or has changed (412)."""
    if await quire(request).store.get_book(book_id) is None:
        return HTTPProblem(404, f"There is no book with id {book_id}.")
    return HTTPProblem(412, "The book changed while this request was in flight; fetch it again.")


async def replace_book(request: Request) -> Response:
    """Replace every client field of a book (owner or admin); missing optional fields become null."""
    return await write_book(request, await read_json(request), BookIn)


async def patch_book(request: Request) -> Response:
    """Change some fields (owner or admin): a JSON merge patch, `null` clears an optional field."""
    return await write_book(request, await read_json(request, JSON, MERGE_PATCH), BookPatch)


async def delete_book(request: Request) -> Response:
    """Delete a book (owner or admin); its id is never used again."""
    book = await changeable_book(request)
    version = expected_version(request, book)
    if not await quire(request).store.delete_book(book["id"], version=version):
        raise await lost_race(request, book["id"])
    return Response(status_code=204)


# == Operations ===================================================================================


async def healthz(request: Request) -> Response:
    """The process is up; the database is not consulted."""
    return json_response(Status(status="ok"))


async def readyz(request: Request) -> Response:
    """The database answers a query (503 while it does not)."""
    await quire(request).store.ping()
    return json_response(Status(status="ready"))


# == Docs =========================================================================================
# Swagger UI's files come from the openapi-ui-bundles package and are served by the app itself,
# so /docs works without internet. The page runs no inline script, which lets its
# Content-Security-Policy allow scripts from this origin only.

DOCS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>quire API</title>
<link rel="stylesheet" href="{root}/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui" data-spec-url="{root}/openapi.json"></div>
<script src="{root}/docs/assets/swagger-ui-bundle.js"></script>
<script src="{root}/docs/init.js"></script></body></html>
"""
DOCS_SCRIPT = """const element = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({url: element.dataset.specUrl, dom_id: "#swagger-ui", deepLinking: true});
"""
DOCS_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; "
               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


async def openapi(request: Request) -> Response:
    """This API's OpenAPI 3.1 document; its server URL carries any mount prefix."""
    return Response(openapi_document(app_path(request, "")), media_type=JSON)


async def docs(request: Request) -> Response:
    """Swagger UI for this API, served from the app (no CDN)."""
    page_html = DOCS_PAGE.format(root=html.escape(app_path(request, "")))
    return HTMLResponse(page_html, headers={"Content-Security-Policy": DOCS_POLICY})


async def docs_script(request: Request) -> Response:
    return Response(DOCS_SCRIPT, media_type="text/javascript")


# == The route table ==============================================================================
# One row per operation. The routes and the OpenAPI document are both made from this table, so a
# new operation is written down exactly once.


@dataclasses.dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: Callable[[Request], Awaitable[Response]]
    tag: str
    ok: tuple[int, Any]  # the success status and the type of its body (None: no body)
    body: Any = None
    query: Any = None
    errors: tuple[int, ...] = ()
    signed_in: bool = False
    media_type: str = JSON  # of the success body


OPERATIONS = [
    Operation("GET", "/healthz", healthz, "operations", (200, Status)),
    Operation("GET", "/readyz", readyz, "operations", (200, Status), errors=(503,)),
    Operation("POST", "/api/v1/users", register, "users", (201, User), UserIn, errors=(400, 409, 413, 415)),
    Operation("GET", "/api/v1/users", list_users, "users", (200, UserPage), query=UserQuery,
              errors=(400, 401, 403), signed_in=True),
    Operation("GET", "/api/v1/users/me", me, "users", (200, User), errors=(401,), signed_in=True),
    Operation("GET", "/api/v1/users/{id:int}", get_user, "users", (200, User),
              errors=(401, 403, 404), signed_in=True),
    Operation("POST", "/api/v1/auth/token", issue_token, "auth", (200, Token), Credentials,
              errors=(400, 401, 413, 415)),
    Operation("POST", "/api/v1/auth/logout", logout, "auth", (204, None), errors=(401,), signed_in=True),
    Operation("GET", "/api/v1/books", list_books, "books", (200, BookPage), query=BookQuery, errors=(400, 401)),
    Operation("POST", "/api/v1/books", create_book, "books", (201, Book), BookIn,
              errors=(400, 401, 409, 413, 415), signed_in=True),
    Operation("GET", "/api/v1/books/{id:int}", get_book, "books", (200, Book), errors=(304, 401, 404)),
    Operation("PUT", "/api/v1/books/{id:int}", replace_book, "books", (200, Book), BookIn,
              errors=(400, 401, 403, 404, 409, 412, 413, 415), signed_in=True),
    Operation("PATCH", "/api/v1/books/{id:int}", patch_book, "books", (200, Book), BookPatch,
              errors=(400, 401, 403, 404, 409, 412, 413, 415), signed_in=True),
    Operation("DELETE", "/api/v1/books/{id:int}", delete_book, "books", (204, None),
              errors=(401, 403, 404, 412), signed_in=True),
]


OPERATIONS += [
    Operation("GET", "/openapi.json", openapi, "docs", (200, {"type": "object"})),
    Operation("GET", "/docs", docs, "docs", (200, {"type": "string"}), media_type="text/html"),
]

# == The OpenAPI document =========================================================================
# Made from OPERATIONS, the Structs (via msgspec's JSON Schema) and the handlers' docstrings.


def ref(type_: Any) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{type_.__name__}"}


def problem_content() -> dict[str, Any]:
    return {"application/problem+json": {"schema": ref(Problem)}}


def describe_responses(operation: Operation) -> dict[str, Any]:
    status, type_ = operation.ok
    success: dict[str, Any] = {"description": HTTPStatus(status).phrase}
    if type_ is not None:
        success["content"] = {operation.media_type: {"schema": type_ if isinstance(type_, dict) else ref(type_)}}
    headers = {}
    if status == 201:
        headers["Location"] = {"description": "The new resource's URL", "schema": {"type": "string"}}
    if type_ is Book:
        headers["ETag"] = {"description": "Strong; changes on every write", "schema": {"type": "string"}}
    if type_ in (BookPage, UserPage):
        headers["Link"] = {"description": 'The next page, `<url>; rel="next"`', "schema": {"type": "string"}}
    if headers:
        success["headers"] = headers
    responses = {str(status): success}
    counted = operation.path.startswith("/api/")
    for error in sorted({*operation.errors, 500, *((429, 503) if counted else ())}):
        responses[str(error)] = ({"description": "Not Modified: your copy is current"} if error == 304 else
                                 {"description": HTTPStatus(error).phrase, "content": problem_content()})
    return responses


def describe_parameters(operation: Operation, path: str) -> list[dict[str, Any]]:
    parameters = []
    if "{id}" in path:
        parameters.append({"name": "id", "in": "path", "required": True,
                           "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}})
    if operation.query is not None:
        (_,), components = msgspec.json.schema_components([operation.query])
        schema = components[operation.query.__name__]
        for name, property_schema in schema["properties"].items():
            # An absent parameter is the Struct's None; a client cannot send null in a query string.
            options = [option for option in property_schema.get("anyOf", []) if option != {"type": "null"}]
            if options:
                property_schema = options[0]
            parameters.append({"name": name, "in": "query", "required": False, "schema": property_schema})
    if operation.handler is get_book:
        parameters.append({"name": "If-None-Match", "in": "header", "schema": {"type": "string"}})
    if operation.method in ("PUT", "PATCH", "DELETE"):
        parameters.append({"name": "If-Match", "in": "header", "schema": {"type": "string"},
                           "description": "Only write if the book still has this ETag (else 412)"})
    return parameters


@functools.lru_cache(maxsize=64)  # bounded: under a parametrised mount, clients choose the prefix
def openapi_document(root_path: str) -> bytes:
    """The OpenAPI 3.1 document, for an app served under `root_path` (made once per prefix)."""
    types = {Problem} | {t for op in OPERATIONS for t in (op.ok[1], op.body) if isinstance(t, type)}
    _, schemas = msgspec.json.schema_components(sorted(types, key=lambda t: t.__name__),
                                                ref_template="#/components/schemas/{name}")
    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", operation.path)
        summary, _, description = " ".join((operation.handler.__doc__ or "").split()).partition(". ")
        summary += "." if description else ""
        spec: dict[str, Any] = {
            "operationId": operation.handler.__name__, "tags": [operation.tag],
            "summary": summary.strip(), "description": " ".join(description.split()),
            "parameters": describe_parameters(operation, path),
            "responses": describe_responses(operation)}
        if operation.body is not None:
            media_types = (JSON, MERGE_PATCH) if operation.method == "PATCH" else (JSON,)
            spec["requestBody"] = {"required": True, "content": {
                media_type: {"schema": ref(operation.body), "example": operation.body.example}
                for media_type in media_types}}
        if operation.signed_in:
            spec["security"] = [{"bearer": []}]
        paths.setdefault(path, {})[operation.method.lower()] = spec
    return encoder.encode({
        "openapi": "3.1.0",
        "info": {"title": "quire", "version": "1.0.0",
                 "description": "A small bookstore API. Sign in with POST /api/v1/auth/token, "
                                "then press Authorize and paste the access_token."},
        "servers": [{"url": root_path or "/"}],
        "tags": [{"name": tag} for tag in dict.fromkeys(op.tag for op in OPERATIONS)],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
    })


def routes(operations: list[Operation]) -> list[Route]:
    """One Route per path, carrying all of its methods, so that a 405 lists them all in `Allow`."""
    by_path: dict[str, dict[str, Callable]] = {}
    for operation in operations:
        by_path.setdefault(operation.path, {})[operation.method] = operation.handler

    def dispatch(handlers: dict[str, Callable]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await handlers["GET" if request.method == "HEAD" else request.method](request)
        return endpoint

    # Starlette tries routes in order and most requests are for books, so books come first.
    paths = sorted(by_path, key=lambda path: not path.startswith("/api/v1/books"))
    return [Route(path, dispatch(by_path[path]), methods=list(by_path[path])) for path in paths]


# == The app ======================================================================================


def create_app(*, config: Config | None = None, **overrides: Any) -> Starlette:
    """A quire app. Keywords (`database_url`, `secret_key`, `token_ttl`, `rate_limit`,
    `auth_rate_limit`, `cors_origins`, `max_body`) beat the environment and `.env`.

    Nothing connects here: the store connects on the first request that needs it, so the app
    also works mounted in a parent app that does not run this app's lifespan.
    """
    unknown = set(overrides) - {field.name for field in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"create_app() got unknown settings: {', '.join(sorted(unknown))}")
    if config is None:
        config = Config(".env") if os.path.exists(".env") else Config()
    settings = Settings.load(config, overrides)
    store = storage.Store(settings.database_url)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # Connecting early is only a head start: if the database is down, the app serves 503s and
        # connects later by itself.
        try:
            await store.connect()
        except storage.Unavailable as error:
            log_json(error=f"not connected at start-up, will retry on demand: {error}")
        yield
        await store.disconnect()

    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False

    middleware = [Middleware(RequestMiddleware)]
    if settings.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "If-Match", "If-None-Match"],
            expose_headers=["ETag", "Location", "Link", "X-Request-ID", "Retry-After"], max_age=600))
    middleware.append(Middleware(GuardMiddleware, max_body=settings.max_body))
    if settings.rate_limit:
        middleware.append(Middleware(RateLimitMiddleware, per_minute=settings.rate_limit,
                                     auth_per_minute=settings.auth_rate_limit))
    docs_files = [Route("/docs/init.js", docs_script),
                  Mount("/docs/assets", StaticFiles(directory=openapi_ui_bundles.swagger_ui.static_path))]
    app = Starlette(
        routes=routes(OPERATIONS) + docs_files,
        middleware=middleware,
        exception_handlers={HTTPProblem: on_problem, HTTPException: on_http_exception,
                            storage.Unavailable: on_unavailable, storage.Conflict: on_conflict},
        lifespan=lifespan,
    )
    app.state.quire = Quire(settings, store)
    return app


# == Command line =================================================================================


def read_password() -> str:
    """From the terminal without echo, or one plain line when stdin is piped."""
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    return sys.stdin.readline().rstrip("\r\n")


async def create_admin(store: storage.Store, email: str, name: str, password: str) -> int:
    """Create an admin, or promote the existing user with that email (password unchanged).

    :raise HTTPProblem: a new user's email, name or password breaks the registration rules.
    """
    try:
        await store.connect()
        user = await store.promote_user(email.lower())
        if user is None:
            decode(encoder.encode({"email": email, "name": name, "password": password}), UserIn)
            password_hash = await auth.hash_password(password)
            user = await store.create_user(email=email.lower(), name=name, password_hash=password_hash, role="admin")
        return user["id"]
    finally:
        await store.disconnect()


DEMO_USER = {"email": "demo@example.com", "name": "Demo", "password": "demo password"}
DEMO_BOOKS = [
    {"title": "Clean Code", "author": "Robert C. Martin", "year": 2008, "pages": 464, "isbn": "9780132350884"},
    {"title": "Structure and Interpretation of Computer Programs", "author": "Harold Abelson",
     "year": 1996, "pages": 657, "isbn": "9780262510875"},
    {"title": "The Pragmatic Programmer", "author": "Andrew Hunt", "year": 1999, "pages": 352, "isbn": None},
    {"title": "Fluent Python", "author": "Luciano Ramalho", "year": 2022, "pages": 1012, "isbn": "9781492056355"},
    {"title": "Designing Data-Intensive Applications", "author": "Martin Kleppmann", "year": 2017,
     "pages": 616, "isbn": "9781449373320"},
]


async def fill_demo(store: storage.Store) -> str:
    """Give an empty database a sample user and a few books, so /docs has something to show."""
    try:
        await store.connect()
        if await store.list_books(limit=1, sort="id", author=None, q=None, after=None):
            return "The database already has books; nothing added."
        user = await store.get_login(DEMO_USER["email"])
        if user is None:
            user = await store.create_user(email=DEMO_USER["email"], name=DEMO_USER["name"],
                                           password_hash=await auth.hash_password(DEMO_USER["password"]))
        for book in DEMO_BOOKS:
            await store.create_book(owner_id=user["id"], fields=book)
        return (f"Added {len(DEMO_BOOKS)} books and the user {DEMO_USER['email']} "
                f"(password: {DEMO_USER['password']!r}); sign in at /docs.")
    finally:
        await store.disconnect()


def main(argv: list[str]) -> int:
    if argv == ["demo"]:
        print(asyncio.run(fill_demo(create_app().state.quire.store)))
        return 0
    if argv[:1] == ["create-admin"] and len(argv) == 3:
        app = create_app()
        password = read_password()
        try:
            print(asyncio.run(create_admin(app.state.quire.store, argv[1], argv[2], password)))
        except HTTPProblem as problem:
            print(f"create-admin: {problem.detail}", file=sys.stderr)
            return 2
        return 0
    if argv:
        print("usage: python api.py [demo | create-admin EMAIL NAME]", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run("api:app", host="127.0.0.1", port=8000, access_log=False)
    return 0


app = create_app()

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
