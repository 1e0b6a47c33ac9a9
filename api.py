"""quire's HTTP API: a small bookstore on Starlette and msgspec.

api.py is quire's own story, read top to bottom: its configuration, the request and response
bodies (msgspec Structs), the handlers, the table of operations (from which the routes, the
OpenAPI document and the middleware's view of paths are all made), `create_app()` and the
command line. It leans on five modules, each with one role:

    web.py      HTTP plumbing any JSON API needs: problems, strict request reading, cursors,
                routes from the operations table, the middleware (request ids, limits, logs)
    openapi.py  the OpenAPI 3.1 document made from the operations table, and /docs
    commands.py what `create-admin` and `demo` do
    store.py    SQL: migrations, queries, transactions
    auth.py     passwords, tokens and the permission rules

    python api.py                       serve on http://127.0.0.1:8000 (SQLite in ./quire.db)
    python api.py create-admin EMAIL NAME    make or promote an admin (password on stdin)
    python api.py demo                  a sample user and a few books in an empty database
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from starlette.applications import Starlette
from starlette.config import Config
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

import auth
import commands
import openapi
import store as storage
import web
from web import (FORM, JSON, MERGE_PATCH, HTTPProblem, JSONResponse, Kind, Operation, app_path, decode, encoder,
                 etag_matches, header, idempotency_key, no_query, parse_query, path_id, problem_response,
                 read_cursor, read_json)

# == Configuration ================================================================================


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything configurable, one field per environment variable (QUIRE_ + upper-case name)."""

    database_url: str = "sqlite:///quire.db"
    secret_key: str | None = None  # at least 32 bytes, checked in load()
    token_ttl: Annotated[int, Meta(ge=1)] = 3600
    refresh_ttl: Annotated[int, Meta(ge=1)] = 14 * 24 * 3600  # seconds a refresh token lasts
    login_failures: Annotated[int, Meta(ge=1)] = 5  # failed sign-ins per email in 15 minutes before 429
    rate_limit: Annotated[int, Meta(ge=0)] = 600  # requests a minute per client; 0 turns limits off
    auth_rate_limit: Annotated[int, Meta(ge=1)] = 10
    cors_origins: tuple[str, ...] = ()
    max_body: Annotated[int, Meta(ge=1)] = 1024 * 1024
    idempotency_ttl: Annotated[int, Meta(ge=1)] = 86400  # seconds an Idempotency-Key is remembered

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
        scheme, separator, _ = settings.database_url.partition("://")
        if scheme not in ("sqlite", "sqlite+aiosqlite", "postgresql", "postgresql+asyncpg"):
            # The scheme alone, if any: the rest of the URL may hold a password.
            given = f"a {scheme}:// URL" if separator else "a URL without a scheme"
            raise ValueError(f"DATABASE_URL must be sqlite:///path.db or postgresql://user@host/db, not {given}.")
        for origin in settings.cors_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/?#\s]+", origin):
                raise ValueError(f"QUIRE_CORS_ORIGINS lists origins, a scheme and a host (and port) without a "
                                 f"path, as browsers send them: https://app.example.com; {origin!r} is not one.")
        return settings


# == Bodies =======================================================================================
# Every request body decodes straight into one of these Structs. `forbid_unknown_fields` makes a
# misspelt or server-owned field (`id`, `owner_id`, `role`, timestamps) an error instead of being
# silently dropped: nobody can assign what they are not meant to.


class RequestBody(Struct, forbid_unknown_fields=True):
    # msgspec words a failed pattern as the regex itself; a person reads these instead.
    pattern_messages: ClassVar[dict[str, str]] = {
        "title": "Expected text that is not only whitespace",
        "author": "Expected text that is not only whitespace",
        "email": "Expected an email address like ada@example.com"}


Title = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"\S",
                            description="1–200 characters, not only whitespace")]
Year = Annotated[int, Meta(ge=1, le=2100)]
Pages = Annotated[int, Meta(ge=1, le=100_000)]
Isbn = Annotated[str, Meta(max_length=40, examples=["978-0-13-235088-4"],
                           description="ISBN-13; hyphens and spaces are removed, the check digit is verified")]
Price = Annotated[int, Meta(ge=0, le=10_000_000, description=(
    "In the minor unit of the shop's currency (cents), an integer: money is never a float. null: not for sale"))]
Stock = Annotated[int, Meta(ge=0, le=1_000_000, description="Copies on hand")]
Timestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
# The most of an email, and of a password or refresh token, that signing in reads (real ones are far
# shorter); the same in the JSON body and the OAuth form.
MAX_EMAIL, MAX_SECRET = 254, 1024
# Neither part of an email holds an `@` or a space of any kind. `\s` is not the same set in Python
# (which checks) and in ECMAScript (in which a client reads the document's pattern): with the rest
# of each's spaces named too, the two agree.
NOT_IN_EMAIL = r"@\s\x1c-\x1f\x85\ufeff"
Email = Annotated[str, Meta(max_length=MAX_EMAIL,
                            pattern=rf"^[^{NOT_IN_EMAIL}]+@[^{NOT_IN_EMAIL}.]+(\.[^{NOT_IN_EMAIL}.]+)+$")]


class BookIn(RequestBody):
    """A book as created (POST) or replaced (PUT); a missing optional field becomes null."""

    example: ClassVar[dict] = {"title": "Clean Code", "author": "Robert C. Martin", "year": 2008,
                               "pages": 464, "isbn": "978-0-13-235088-4", "price_cents": 3999, "stock": 12}

    title: Title
    author: Title
    year: Year | None = None
    pages: Pages | None = None
    isbn: Isbn | None = None
    price_cents: Price | None = None
    stock: Stock = 0


class BookPatch(RequestBody):
    """A JSON merge patch (RFC 7396): absent fields stay, `null` clears an optional field."""

    example: ClassVar[dict] = {"pages": 431, "isbn": None}

    title: Title | UnsetType = UNSET
    author: Title | UnsetType = UNSET
    year: Year | None | UnsetType = UNSET
    pages: Pages | None | UnsetType = UNSET
    isbn: Isbn | None | UnsetType = UNSET
    price_cents: Price | None | UnsetType = UNSET
    stock: Stock | UnsetType = UNSET  # never null: a book always has a stock, 0 when none


class Book(Struct):
    id: int
    title: str
    author: str
    year: int | None
    pages: int | None
    isbn: str | None
    price_cents: int | None
    stock: int
    owner_id: int
    created_at: Timestamp
    updated_at: Timestamp


class BookPage(Struct):
    items: list[Book]
    next: str | None


# An order is the client's cart, placed at once: there is no cart on the server to keep in step.
# Its lines keep the title and price of the moment they were placed.

OrderStatus = Literal["placed", "paid", "shipped", "cancelled"]
# The life of an order: each status and the statuses it may move to.
MOVES: dict[str, tuple[str, ...]] = {"placed": ("paid", "cancelled"), "paid": ("shipped", "cancelled"),
                                     "shipped": (), "cancelled": ()}
Id = Annotated[int, Meta(ge=1, le=2**63 - 1)]


class OrderLineIn(RequestBody):
    book_id: Id
    quantity: Annotated[int, Meta(ge=1, le=100)]


class OrderIn(RequestBody):
    """1–20 lines, a book at most once."""

    example: ClassVar[dict] = {"items": [{"book_id": 1, "quantity": 1}]}

    items: Annotated[list[OrderLineIn], Meta(min_length=1, max_length=20)]


class OrderMove(RequestBody):
    """The status to move the order to."""

    example: ClassVar[dict] = {"status": "cancelled"}

    status: OrderStatus


class OrderLine(Struct):
    book_id: int
    title: str
    quantity: int
    unit_price_cents: int
    line_total_cents: int


class Order(Struct):
    id: int
    buyer_id: int
    status: OrderStatus
    items: list[OrderLine]
    total_cents: int
    created_at: Timestamp
    updated_at: Timestamp


class OrderPage(Struct):
    items: list[Order]
    next: str | None


Password = Annotated[str, Meta(min_length=8, max_length=128)]


class UserIn(RequestBody):
    """Registration; the email is stored lower-case."""

    example: ClassVar[dict] = {"email": "ada@example.com", "name": "Ada", "password": "correct horse"}

    email: Email
    name: Annotated[str, Meta(min_length=1, max_length=100)]
    password: Password


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
    """Sign in with `email` and `password`, or refresh with a `refresh_token`; not both."""

    example: ClassVar[dict] = {"email": "ada@example.com", "password": "correct horse"}
    json_schema: ClassVar[dict] = {"oneOf": [{"required": ["email", "password"]}, {"required": ["refresh_token"]}]}

    email: Annotated[str, Meta(max_length=MAX_EMAIL)] | UnsetType = UNSET
    password: Annotated[str, Meta(max_length=MAX_SECRET)] | UnsetType = UNSET
    refresh_token: Annotated[str, Meta(max_length=MAX_SECRET)] | UnsetType = UNSET


class TokenForm(Struct):
    """The OAuth 2.0 form (RFC 6749 §4.3, §6): `grant_type=password&username=...&password=...` or
    `grant_type=refresh_token&refresh_token=...`. Other parameters (`scope`, client fields) are ignored."""

    example: ClassVar[dict] = {"grant_type": "password", "username": "ada@example.com", "password": "correct horse"}

    grant_type: Literal["password", "refresh_token"]
    # The lengths are checked in oauth_grant (as `invalid_request`); here they are documented.
    username: Annotated[str, Meta(extra_json_schema={"maxLength": MAX_EMAIL})] | None = None
    password: Annotated[str, Meta(extra_json_schema={"maxLength": MAX_SECRET})] | None = None
    refresh_token: Annotated[str, Meta(extra_json_schema={"maxLength": MAX_SECRET})] | None = None


class Token(Struct):
    access_token: str
    expires_in: int
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"


class PasswordChange(RequestBody):
    example: ClassVar[dict] = {"current_password": "correct horse", "new_password": "a longer, better horse"}

    current_password: Annotated[str, Meta(max_length=MAX_SECRET)]
    # Held to 8–128 characters after the current password is checked (a wrong one is 403 first),
    # and never hashed before; the document gives the rule a client must follow.
    new_password: Annotated[str, Meta(description="8–128 characters",
                                      extra_json_schema={"minLength": 8, "maxLength": 128})]


class Status(Struct):
    status: str


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


class OrderQuery(RequestBody):
    limit: Annotated[int, Meta(ge=1, le=100)] = 20
    cursor: str | None = None
    sort: Literal["-id", "id"] = "-id"
    status: OrderStatus | None = None
    buyer_id: Id | None = None  # admins only


# == Problems =====================================================================================
# The kinds of problem quire adds to web.py's HTTP ones: where one status means several things, a
# client tells them apart by `type`. KINDS is the one table; `GET /problems/{kind}` serves it.

TAKEN = Kind("taken", 409, "Already taken",
             "The email or ISBN that `errors` points at belongs to another user or book; choose another.")
OUT_OF_STOCK = Kind("out-of-stock", 409, "Not enough stock",
                    "The line that `errors` points at asks for more copies than are left (the detail says how "
                    "many); order fewer. Nothing was ordered.")
NOT_FOR_SALE = Kind("not-for-sale", 409, "Not for sale",
                    "The book of the line that `errors` points at is gone or has no price; remove the line. "
                    "Nothing was ordered.")
INVALID_TRANSITION = Kind("invalid-transition", 409, "Not a possible move",
                          "The order's status does not allow this move (placed → paid → shipped, placed or paid → "
                          "cancelled); GET the order to see where it stands.")
KEY_REUSED = Kind("idempotency-key-reused", 422, "Idempotency key reused",
                  "This Idempotency-Key came before with another request; use a new key for a new request.")
TOKEN_EXPIRED = Kind("token-expired", 401, "Token expired",
                     "The access token is past its expiry: get a new one (refresh, or sign in again).")
TOKEN_REVOKED = Kind("token-revoked", 401, "Token revoked",
                     "The token was revoked (a logout, or a password change): sign in again.")
INVALID_GRANT = Kind("invalid-grant", 400, "Sign-in refused",
                     "The OAuth 2.0 form was refused; its `error` says why (RFC 6749 §5.2): `invalid_grant` (wrong "
                     "credentials, or a bad, spent or expired refresh token), `invalid_request` or "
                     "`unsupported_grant_type`.")
TOO_MANY_FAILED = Kind("too-many-failed-sign-ins", 429, "Too many failed sign-ins",
                       "This email had too many failed sign-ins in the last 15 minutes; wait the seconds that "
                       "`Retry-After` gives. Not even the right password is accepted until then.")
KINDS = {kind.name: kind for kind in [*web.HTTP_KINDS, TAKEN, OUT_OF_STOCK, NOT_FOR_SALE, INVALID_TRANSITION,
                                      KEY_REUSED, TOKEN_EXPIRED, TOKEN_REVOKED, INVALID_GRANT, TOO_MANY_FAILED]}


class ProblemKind(Struct):
    type: str
    title: str
    status: int
    description: str


def unauthorized(detail: str, kind: Kind | None = None) -> HTTPProblem:
    return HTTPProblem(401, detail, kind=kind, headers={"WWW-Authenticate": 'Bearer realm="quire"'})


async def on_unavailable(request: Request, error: storage.Unavailable) -> Response:
    return problem_response(request.scope, 503, "The database is unavailable; try again shortly.",
                            headers={"Retry-After": "2"})


async def on_conflict(request: Request, error: storage.Conflict) -> Response:
    detail = f"That {error.field} is already taken."
    return problem_response(request.scope, 409, detail, kind=TAKEN,
                            errors=[{"pointer": f"#/{error.field}", "detail": detail}])


# == Helpers for handlers =========================================================================


class ShopCounters:
    """The shop's own numbers on /metrics, beside the requests that web.py counts."""

    def __init__(self, metrics: web.Metrics) -> None:
        self.orders_placed = metrics.counter("quire_orders_placed", "Orders placed (a replayed retry is not counted).")
        self.orders_refused = metrics.counter("quire_orders_refused", "Orders refused, by the kind of problem.",
                                              ("kind",))
        for kind in (OUT_OF_STOCK, NOT_FOR_SALE):
            self.orders_refused.labels(kind.name)  # listed at 0 before the first refusal
        self.sign_in_failures = metrics.counter(
            "quire_sign_in_failures", "Sign-ins refused for a wrong email or password, wrong current passwords included.")


@dataclasses.dataclass
class Quire:
    """One app's state: its settings, its store, its metrics and its key (read from the store when
    not set)."""

    settings: Settings
    store: storage.Store
    metrics: web.Metrics
    counters: ShopCounters
    key: bytes | None = None

    async def signing_key(self) -> bytes:
        if self.key is None:
            self.key = (self.settings.secret_key or await self.store.secret_key()).encode()
        return self.key


def quire(request: Request) -> Quire:
    # By item, not `.state.quire`: State answers attributes in `__getattr__`, which Python calls
    # only after its own look-up has failed with an AttributeError (a quarter of a read's handler).
    return request.app.state["quire"]


async def signed_in(request: Request) -> storage.Row:
    """The caller, from `Authorization: Bearer`; 401 for no token or one that is bad, expired,
    revoked, or whose user is gone. The user's role is read now, so a promotion counts at once."""
    scheme, _, token = (header(request, b"authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("Sign in: send `Authorization: Bearer <token>` from POST /api/v1/auth/token.")
    app = quire(request)
    try:
        claims = auth.read_token(token.strip(), await app.signing_key())
        user_id = int(claims["sub"])
        if not 0 < user_id < 2**63:
            raise ValueError("its subject is not a user id")
    except (auth.InvalidToken, ValueError) as error:
        kind = TOKEN_EXPIRED if isinstance(error, auth.TokenExpired) else None
        raise unauthorized(f"The token was refused: {error}.", kind) from None
    user = await app.store.get_token_user(user_id, claims["jti"], session_id=claims.get("sid"),
                                          generation=claims.get("gen", 0))
    if user is None:
        raise unauthorized("The token's user no longer exists.")
    if user.pop("revoked"):
        raise unauthorized("The token was revoked; sign in again.", TOKEN_REVOKED)
    request.state.claims = claims
    return user


async def check_presented_token(request: Request) -> None:
    """Public operations need no token, but one that is sent is still checked (401 if bad)."""
    if header(request, b"authorization") is not None:
        await signed_in(request)


# == Users and tokens =============================================================================


async def register(request: Request) -> Response:
    """Create an account; the response's Location is the new user."""
    body = await read_json(request)
    await check_presented_token(request)
    no_query(request)
    credentials = decode(body, UserIn)
    password_hash = await auth.hash_password(credentials.password)
    user = await quire(request).store.create_user(
        email=credentials.email.lower(), name=credentials.name, password_hash=password_hash)
    location = app_path(request, f"/api/v1/users/{user['id']}")
    return JSONResponse(msgspec.convert(user, User), 201, {"Location": location})


SIGN_IN_WINDOW = 15 * 60  # seconds in which QUIRE_LOGIN_FAILURES failures stop an email's sign-ins


def refused_grant(error: str, detail: str) -> HTTPProblem:
    """A refusal of the OAuth 2.0 form: 400 with RFC 6749 §5.2's `error` code."""
    return HTTPProblem(400, detail, kind=INVALID_GRANT, error=error)


async def check_password(request: Request, email: str, password: str, wrong: HTTPProblem) -> storage.Row:
    """The user whose email and password these are; raises `wrong` otherwise, the attempt
    counted as a failure, and 429 while the email has had too many failures (known email or
    not, so the answer does not tell which emails exist)."""
    app = quire(request)
    login = await app.store.attempt_sign_in(email, window=SIGN_IN_WINDOW)  # counted before the check
    if login["attempts"] > app.settings.login_failures:  # this attempt included
        await app.store.forget_attempt(login["attempt"])
        if login["failures"] < app.settings.login_failures:  # the others are still being checked
            raise HTTPProblem(429, "Too many sign-ins for this email are being checked at once; try again "
                                   "in a second.", headers={"Retry-After": "1"})
        wait = max(1, math.ceil(login["oldest"] + SIGN_IN_WINDOW - time.time()))
        raise HTTPProblem(429, f"Too many failed sign-ins for this email; try again in {wait} seconds.",
                          kind=TOO_MANY_FAILED, headers={"Retry-After": str(wait)})
    if not await auth.verify_password(login["password_hash"] if login["id"] else None, password):
        app.counters.sign_in_failures.inc()
        await app.store.attempt_failed(login["attempt"])
        raise wrong
    await app.store.clear_failures(email, login["attempt"])
    return login


async def tokens(request: Request, user: storage.Row, session_id: int, refresh_token: str) -> Response:
    """The token endpoint's answer: a new access token of the session, and its refresh token."""
    app = quire(request)
    access_token, _ = auth.make_token(user["id"], await app.signing_key(), app.settings.token_ttl,
                                      session_id=session_id, generation=user["token_generation"])
    return JSONResponse(Token(access_token=access_token, expires_in=app.settings.token_ttl,
                              refresh_token=refresh_token))


async def issue_token(request: Request) -> Response:
    """Sign in, or refresh: an access token and a refresh token. Send JSON (`email` and `password`,
    or `refresh_token`) or the OAuth 2.0 form (`grant_type=password` or `refresh_token`). Each
    refresh spends its refresh token and answers the next one; a spent one sent again revokes
    its whole session."""
    body = await read_json(request, JSON, FORM)  # a query string is ignored, as RFC 6749 §3.2 says
    oauth = web.media_type(request) == FORM
    email, password, refresh_token = oauth_grant(body) if oauth else json_grant(body)
    app = quire(request)
    if refresh_token is None:
        wrong = (refused_grant("invalid_grant", "The email or the password is wrong.") if oauth
                 else unauthorized("The email or the password is wrong."))
        user = await check_password(request, email.lower(), password, wrong)
        refresh_token, refresh_hash = auth.new_refresh_token()
        session_id = await app.store.start_session(user["id"], generation=user["token_generation"],
                                                   refresh_hash=refresh_hash,
                                                   expires_at=int(time.time()) + app.settings.refresh_ttl)
        return await tokens(request, user, session_id, refresh_token)
    next_token, next_hash = auth.new_refresh_token()
    user = await app.store.rotate_refresh_token(auth.hash_refresh_token(refresh_token), new_hash=next_hash,
                                                expires_at=int(time.time()) + app.settings.refresh_ttl)
    if isinstance(user, str):
        detail = ("This refresh token was used before, so its session is revoked: sign in again." if user == "reused"
                  else "This refresh token is unknown, spent, expired or revoked: sign in again.")
        raise refused_grant("invalid_grant", detail) if oauth else unauthorized(detail)
    return await tokens(request, user, user["session_id"], next_token)


def json_grant(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(email, password, None) or (None, None, refresh_token) from the JSON body; 400 otherwise."""
    credentials = decode(body, Credentials)
    fields = {name for name in Credentials.__struct_fields__ if getattr(credentials, name) is not UNSET}
    if fields == {"email", "password"}:
        return credentials.email, credentials.password, None
    if fields == {"refresh_token"}:
        return None, None, credentials.refresh_token
    detail = "Send either `email` and `password`, or `refresh_token` alone"
    raise HTTPProblem(400, f"{detail}.", errors=[{"pointer": "#", "detail": detail}])


def oauth_grant(body: bytes) -> tuple[str | None, str | None, str | None]:
    """The same from the OAuth 2.0 form; RFC 6749 §5.2 refusals otherwise. Unknown parameters
    (`scope`, `client_id`, ...) are ignored (§3.2); a repeated one is `invalid_request`."""
    try:
        # Read as WHATWG's urlencoded parser reads it (what browsers and URLSearchParams write): an
        # empty pair (`a=b&`) is skipped, a name without `=` has an empty value.
        pairs = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise refused_grant("invalid_request", "The form is not valid application/x-www-form-urlencoded.") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise refused_grant("invalid_request", f"The parameter `{name}` is repeated; send it once.")
        form[name] = value
    # The JSON body's limits hold here too; NUL is refused because PostgreSQL cannot store it.
    for name, limit in (("username", MAX_EMAIL), ("password", MAX_SECRET), ("refresh_token", MAX_SECRET)):
        if len(form.get(name, "")) > limit or "\x00" in form.get(name, ""):
            raise refused_grant("invalid_request", f"`{name}` is longer than {limit} characters or holds a NUL.")
    grant_type = form.get("grant_type")
    if grant_type == "password" and form.get("username") and "password" in form:
        return form["username"], form["password"], None
    if grant_type == "refresh_token" and form.get("refresh_token"):
        return None, None, form["refresh_token"]
    if grant_type in ("password", "refresh_token"):
        needed = "`username` and `password`" if grant_type == "password" else "`refresh_token`"
        raise refused_grant("invalid_request", f"grant_type={grant_type} needs {needed}.")
    if grant_type is None:
        raise refused_grant("invalid_request", "The form needs a `grant_type`: `password` or `refresh_token`.")
    raise refused_grant("unsupported_grant_type",
                        f"grant_type={grant_type!r} is not supported; use `password` or `refresh_token`.")


async def logout(request: Request) -> Response:
    """Revoke the token this request carries and its session (its refresh token, and every
    access token of the session), for every worker sharing the database."""
    await signed_in(request)
    no_query(request)
    claims, store = request.state.claims, quire(request).store
    await store.log_out(claims["jti"], int(claims["exp"]) + auth.LEEWAY_SECONDS, claims.get("sid"))
    return Response(status_code=204)


async def change_password(request: Request) -> Response:
    """Change your password. Every token issued before, access and refresh, of every session, is
    refused from then on; a wrong `current_password` is 403 and counts as a failed sign-in."""
    body = await read_json(request)
    user = await signed_in(request)
    no_query(request)
    change = decode(body, PasswordChange)
    await check_password(request, user["email"], change.current_password,
                         HTTPProblem(403, "The current password is wrong."))
    try:
        msgspec.convert(change.new_password, Password)
    except msgspec.ValidationError as error:
        detail = str(error)
        raise HTTPProblem(400, f"{detail} (#/new_password)",
                          errors=[{"pointer": "#/new_password", "detail": detail}]) from None
    await quire(request).store.change_password(user["id"], await auth.hash_password(change.new_password))
    return Response(status_code=204)


async def me(request: Request) -> Response:
    """The signed-in user."""
    user = await signed_in(request)
    no_query(request)
    return JSONResponse(msgspec.convert(user, User))


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
    no_query(request)
    return JSONResponse(msgspec.convert(user, User))


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
    items, next_url, headers = web.page(request, key, query, rows, lambda user: [user["id"]])
    return JSONResponse(UserPage(items=msgspec.convert(items, list[User]), next=next_url), headers=headers)


# == Idempotent requests ==========================================================================
# A client that lost an answer sends the same POST again with the same `Idempotency-Key`
# (draft-ietf-httpapi-idempotency-key-header) and gets the first answer back instead of a second
# order. The key is written first, in the write's own transaction (store.claim_key says why).

async def idempotent(request: Request, user: storage.Row, key: str, body: bytes,
                     write: Callable[[storage.Run], Awaitable[Response]]) -> Response:
    """Run `write` in a transaction that also claims `key` and records `write`'s answer; or, when
    the key's first request already succeeded, answer that again (`Idempotent-Replayed: true`),
    or 422 if the key came with another request. A failed `write` rolls its key back with it,
    so the request may be retried with the same key."""
    app = quire(request)
    key_hash = hashlib.sha256(key.encode()).hexdigest()  # a leaked table does not show the keys
    fingerprint = hashlib.sha256(f"{request.method} {request.url.path} ".encode()
                                 + hashlib.sha256(body).digest()).hexdigest()
    await app.store.purge_expired_keys()
    async with app.store.transaction() as run:
        record = await app.store.claim_key(run, user_id=user["id"], key_hash=key_hash,
                                           fingerprint=fingerprint, ttl=app.settings.idempotency_ttl)
        if record is None:
            response = await write(run)
            await app.store.record_response(
                run, user_id=user["id"], key_hash=key_hash, status=response.status_code,
                body=response.body.decode(), location=response.headers.get("location"),
                etag=response.headers.get("etag"))
            return response
    if record["fingerprint"] != fingerprint:
        detail = "This Idempotency-Key was sent before with another request; use a new key for a new request"
        raise HTTPProblem(422, f"{detail}.", kind=KEY_REUSED, errors=[{"header": "Idempotency-Key", "detail": detail}])
    headers = {"Idempotent-Replayed": "true"}
    headers |= {name: record[name.lower()] for name in ("Location", "ETag") if record[name.lower()]}
    return Response(record["body"], record["status"], headers, JSON)


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


def etag(row: storage.Row) -> str:
    """A book's or an order's: strong, and new on every write (the row's version goes up by one)."""
    return f'"{row["id"]}.{row["version"]}"'


def book_response(book: storage.Row, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(msgspec.convert(book, Book), status, {"ETag": etag(book), **(headers or {})})


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


def checked_if_match(request: Request, current: str, what: str) -> str | None:
    """The If-Match header, once checked (RFC 9110 §13.1.1): 412 when it names none of the
    resource's current ETags, on a read as on a write."""
    if_match = header(request, b"if-match")
    if if_match is not None and not etag_matches(if_match, current, weak=False):
        raise HTTPProblem(412, f"The {what} has changed: its ETag is now {current}.")
    return if_match


def if_none_match_names(request: Request, current: str) -> bool:
    """If-None-Match names the current ETag, or is `*` (RFC 9110 §13.1.2; compared weakly)."""
    return etag_matches(header(request, b"if-none-match") or "", current, weak=True)


def expected_version(request: Request, row: storage.Row, what: str = "book") -> int | None:
    """A write's preconditions: 412 when If-Match names none of the row's ETags, or
    If-None-Match names it (`*`: it exists). The version the write must then find
    (compare-and-set) when If-Match named it; None when any version will do."""
    current = etag(row)
    if_match = checked_if_match(request, current, what)
    if if_none_match_names(request, current):
        raise HTTPProblem(412, f"The {what} exists with ETag {current}, which If-None-Match excludes.")
    return None if if_match is None or if_match.strip() == "*" else row["version"]


def not_modified(request: Request, row: storage.Row, what: str = "book") -> Response | None:
    """A read's preconditions: 412 when If-Match names none of the row's ETags; 304 when
    If-None-Match names the current one: the client's copy is current."""
    current = etag(row)
    checked_if_match(request, current, what)
    if if_none_match_names(request, current):
        return Response(status_code=304, headers={"ETag": current})
    return None


async def list_books(request: Request) -> Response:
    """A page of books: filter with `author` or `q`, order with `sort`, continue with `next`."""
    await check_presented_token(request)
    query = parse_query(request, BookQuery)
    app = quire(request)
    key = await app.signing_key()
    after = read_cursor(key, query, (str, int))
    rows = await app.store.list_books(limit=query.limit + 1, sort=query.sort, author=query.author,
                                      q=query.q, after=tuple(after) if after else None)
    items, next_url, headers = web.page(request, key, query, rows, lambda book: [book["title"], book["id"]])
    return JSONResponse(BookPage(items=msgspec.convert(items, list[Book]), next=next_url), headers=headers)


async def create_book(request: Request) -> Response:
    """Add a book; you become its owner. Send an `Idempotency-Key` to make a retry safe."""
    body = await read_json(request)
    user = await signed_in(request)
    key = idempotency_key(request)
    no_query(request)
    fields = normalise_isbn(msgspec.structs.asdict(decode(body, BookIn)))

    async def create(run: storage.Run | None) -> Response:
        book = await quire(request).store.create_book(owner_id=user["id"], fields=fields, run=run)
        return book_response(book, 201, {"Location": app_path(request, f"/api/v1/books/{book['id']}")})

    if key is None:  # one INSERT, no transaction around it
        return await create(None)
    return await idempotent(request, user, key, body, create)


async def get_book(request: Request) -> Response:
    """One book, with its ETag; send If-None-Match to get 304 when it has not changed."""
    await check_presented_token(request)
    book = await quire(request).store.get_book(path_id(request))
    if book is None:
        raise HTTPProblem(404, f"There is no book with id {request.path_params['id']}.")
    no_query(request)
    return not_modified(request, book) or book_response(book)


async def write_book(request: Request, body: bytes, type_: type[Struct]) -> Response:
    """PUT and PATCH: decode, then one conditional UPDATE; 412 if someone else wrote first."""
    book = await changeable_book(request)
    no_query(request)
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
    no_query(request)
    version = expected_version(request, book)
    if not await quire(request).store.delete_book(book["id"], version=version):
        raise await lost_race(request, book["id"])
    return Response(status_code=204)


# == Orders =======================================================================================


def order_response(order: storage.Row, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(msgspec.convert(order, Order), status, {"ETag": etag(order), **(headers or {})})


def order_lines(order: OrderIn) -> list[tuple[int, int]]:
    """The (book id, quantity) of each line, in the order sent; 400 for a book named twice."""
    seen: set[int] = set()
    for index, line in enumerate(order.items):
        if line.book_id in seen:
            detail = f"Book {line.book_id} is in the order twice; give it once with the total quantity"
            pointer = f"#/items/{index}/book_id"
            raise HTTPProblem(400, f"{detail} ({pointer})", errors=[{"pointer": pointer, "detail": detail}])
        seen.add(line.book_id)
    return [(line.book_id, line.quantity) for line in order.items]


def refused(error: storage.Refused, lines: list[tuple[int, int]]) -> HTTPProblem:
    """The 409 for an order line the shop cannot serve, pointing at that line."""
    book_id, quantity = lines[error.line]
    if error.reason == "out-of-stock":
        pointer = f"#/items/{error.line}/quantity"
        detail = f"Only {error.left} of book {book_id} left, fewer than the {quantity} ordered"
    else:
        pointer = f"#/items/{error.line}/book_id"
        detail = f"Book {book_id} does not exist or is not for sale"
    kind = OUT_OF_STOCK if error.reason == "out-of-stock" else NOT_FOR_SALE
    return HTTPProblem(409, f"{detail} ({pointer}); nothing was ordered.", kind=kind,
                       errors=[{"pointer": pointer, "detail": detail}])


async def place_order(request: Request) -> Response:
    """Buy books: every line is served or none is. All in one transaction: each book's stock goes
    down by its quantity, or the order is refused with 409 at the first line that cannot be served
    and nothing changes. Send an `Idempotency-Key` to make a retry safe."""
    body = await read_json(request)
    buyer = await signed_in(request)
    key = idempotency_key(request)
    no_query(request)
    lines = order_lines(decode(body, OrderIn))
    app = quire(request)
    placed = False  # set when this request, not an earlier one with its key, placed the order

    async def place(run: storage.Run) -> Response:
        nonlocal placed
        try:
            order = await app.store.place_order(run, buyer_id=buyer["id"], lines=lines)
        except storage.Refused as error:
            app.counters.orders_refused.labels(error.reason).inc()
            raise refused(error, lines) from None
        placed = True
        return order_response(order, 201, {"Location": app_path(request, f"/api/v1/orders/{order['id']}")})

    if key is None:
        async with app.store.transaction() as run:
            response = await place(run)
    else:
        response = await idempotent(request, buyer, key, body, place)
    if placed:  # counted once committed
        app.counters.orders_placed.inc()
    return response


async def visible_order(request: Request) -> tuple[storage.Row, storage.Row]:
    """The caller and the order in the path, if the caller may see it.

    :raise 401: no valid token.  :raise 404: no such order, or another buyer's (the same answer,
    so that order ids cannot be probed)."""
    user = await signed_in(request)
    order = await quire(request).store.get_order(path_id(request))
    if order is None or not auth.can_see_order(user, order):
        raise HTTPProblem(404, f"There is no order with id {request.path_params['id']}.")
    return user, order


async def get_order(request: Request) -> Response:
    """One of your orders (an admin: anyone's), with its ETag; If-None-Match gives 304."""
    _, order = await visible_order(request)
    no_query(request)
    return not_modified(request, order, "order") or order_response(order)


async def list_orders(request: Request) -> Response:
    """A page of your orders, newest first; an admin sees everyone's and may filter by `buyer_id`."""
    user = await signed_in(request)
    query = parse_query(request, OrderQuery)
    if query.buyer_id is not None and not auth.is_admin(user):
        raise web.invalid_parameter("buyer_id", "Only admins may filter by buyer; you see your own orders.")
    app = quire(request)
    key = await app.signing_key()
    after = read_cursor(key, query, (int,))
    rows = await app.store.list_orders(
        limit=query.limit + 1, descending=query.sort == "-id", after=after[0] if after else None,
        buyer_id=query.buyer_id if auth.is_admin(user) else user["id"], status=query.status)
    items, next_url, headers = web.page(request, key, query, rows, lambda order: [order["id"]])
    return JSONResponse(OrderPage(items=msgspec.convert(items, list[Order]), next=next_url), headers=headers)


async def move_order(request: Request) -> Response:
    """Move an order along its life: placed → paid → shipped, or placed/paid → cancelled. The buyer
    may only cancel; an admin may make every move. Cancelling puts the stock back."""
    body = await read_json(request, JSON, MERGE_PATCH)
    user, order = await visible_order(request)
    no_query(request)
    to_status = decode(body, OrderMove).status
    if not auth.can_move_order(user, order, to_status):
        raise HTTPProblem(403, "A buyer may only cancel an order; an admin moves it on.")
    version = expected_version(request, order, "order")
    if to_status not in MOVES[order["status"]]:
        allowed = " or ".join(f"'{status}'" for status in MOVES[order["status"]]) or "nothing else"
        detail = f"An order that is '{order['status']}' cannot become '{to_status}'; it can become {allowed}"
        raise HTTPProblem(409, f"{detail} (#/status).", kind=INVALID_TRANSITION, errors=[{"pointer": "#/status", "detail": detail}])
    moved = await quire(request).store.move_order(order["id"], from_status=order["status"],
                                                  to_status=to_status, version=version)
    if moved is None:  # another move won the compare-and-set
        detail = "The order changed while this request was in flight; fetch it again."
        if version is not None:
            raise HTTPProblem(412, detail)
        raise HTTPProblem(409, detail, kind=INVALID_TRANSITION)
    return order_response(moved)


# == Problem descriptions =========================================================================


async def describe_problem(request: Request) -> Response:
    """What a kind of problem means and what a client should do about it; `type` links here."""
    kind = KINDS.get(request.path_params["kind"])
    if kind is None:
        raise HTTPProblem(404, f"There is no kind of problem called {request.path_params['kind']!r}.")
    no_query(request)
    return JSONResponse(ProblemKind(type=app_path(request, f"/problems/{kind.name}"), title=kind.title,
                                    status=kind.status, description=kind.advice))


# == Probes ========================================================================================


async def healthz(request: Request) -> Response:
    """The process is up; the database is not consulted."""
    no_query(request)
    return JSONResponse(Status(status="ok"))


async def readyz(request: Request) -> Response:
    """The database answers a query (503 while it does not)."""
    no_query(request)
    await quire(request).store.ping()
    return JSONResponse(Status(status="ready"))


async def metrics(request: Request) -> Response:
    """Prometheus metrics, in the text format (or OpenMetrics, if the scraper's Accept asks for it).
    Served without the database; keep it from the public internet at the proxy."""
    no_query(request)
    body, media_type = quire(request).metrics.exposition(request.headers.get("accept", ""))
    return Response(body, media_type=media_type)


# == The operations ===============================================================================
# One row per operation. The routes, the OpenAPI document and what the middleware knows of paths
# (private, counted, strict) are all made from this table, so an operation is written down once.
# Starlette tries routes in the table's order, and most requests are for books: books come first.

OPERATIONS = [
    Operation("GET", "/api/v1/books", list_books, "books", (200, BookPage), query=BookQuery, errors=(400, 401)),
    Operation("POST", "/api/v1/books", create_book, "books", (201, Book), BookIn,
              errors=(400, 401, 409, 413, 415, 422), signed_in=True, etag=True, idempotent=True),
    Operation("GET", "/api/v1/books/{id:int}", get_book, "books", (200, Book), errors=(304, 401, 404, 412),
              etag=True, conditional=True),
    Operation("PUT", "/api/v1/books/{id:int}", replace_book, "books", (200, Book), BookIn,
              errors=(400, 401, 403, 404, 409, 412, 413, 415), signed_in=True, etag=True, conditional=True),
    Operation("PATCH", "/api/v1/books/{id:int}", patch_book, "books", (200, Book), BookPatch,
              errors=(400, 401, 403, 404, 409, 412, 413, 415), signed_in=True, etag=True, conditional=True),
    Operation("DELETE", "/api/v1/books/{id:int}", delete_book, "books", (204, None),
              errors=(401, 403, 404, 412), signed_in=True, conditional=True),
    Operation("POST", "/api/v1/orders", place_order, "orders", (201, Order), OrderIn,
              errors=(400, 401, 409, 413, 415, 422), signed_in=True, etag=True, idempotent=True),
    Operation("GET", "/api/v1/orders", list_orders, "orders", (200, OrderPage), query=OrderQuery,
              errors=(400, 401), signed_in=True),
    Operation("GET", "/api/v1/orders/{id:int}", get_order, "orders", (200, Order), errors=(304, 401, 404, 412),
              signed_in=True, etag=True, conditional=True),
    Operation("PATCH", "/api/v1/orders/{id:int}", move_order, "orders", (200, Order), OrderMove,
              errors=(400, 401, 403, 404, 409, 412, 413, 415), signed_in=True, etag=True, conditional=True),
    Operation("POST", "/api/v1/users", register, "users", (201, User), UserIn, errors=(400, 401, 409, 413, 415),
              private=True, strict_limit=True),
    Operation("GET", "/api/v1/users", list_users, "users", (200, UserPage), query=UserQuery,
              errors=(400, 401, 403), signed_in=True, private=True),
    Operation("GET", "/api/v1/users/me", me, "users", (200, User), errors=(401,), signed_in=True, private=True),
    Operation("POST", "/api/v1/users/me/password", change_password, "users", (204, None), PasswordChange,
              errors=(400, 401, 403, 413, 415), signed_in=True, private=True),
    Operation("GET", "/api/v1/users/{id:int}", get_user, "users", (200, User),
              errors=(401, 403, 404), signed_in=True, private=True),
    Operation("POST", "/api/v1/auth/token", issue_token, "auth", (200, Token), Credentials, form=TokenForm,
              errors=(400, 401, 413, 415), private=True, strict_limit=True),
    Operation("POST", "/api/v1/auth/logout", logout, "auth", (204, None), errors=(401,), signed_in=True,
              private=True),
    Operation("GET", "/healthz", healthz, "operations", (200, Status), counted=False),
    Operation("GET", "/readyz", readyz, "operations", (200, Status), errors=(503,), counted=False),
    Operation("GET", "/metrics", metrics, "operations", (200, {"type": "string"}), media_type="text/plain",
              counted=False),
    Operation("GET", "/problems/{kind}", describe_problem, "problems", (200, ProblemKind), errors=(404,),
              counted=False),
]

DOCS = openapi.Docs(
    OPERATIONS, title="quire", version="1.0.0",
    description="A small bookstore API. Press Authorize and sign in with your email (as username) and "
                "password, or call POST /api/v1/auth/token and paste its access_token under bearer.",
    security_schemes=lambda root_path: {
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
        # Swagger UI's Authorize dialog signs in with an email and a password through this flow. The
        # tokenUrl carries the prefix itself: against a server URL of /shop, a bare
        # /api/v1/auth/token would resolve to the host's root and drop it.
        "oauth2": {"type": "oauth2", "flows": {"password": {"tokenUrl": f"{root_path}/api/v1/auth/token",
                                                            "scopes": {}}}}},
    problem_kinds=list(KINDS))


# == The app ======================================================================================


def create_app(*, config: Config | None = None, **overrides: Any) -> Starlette:
    """A quire app. Keywords (`database_url`, `secret_key`, `token_ttl`, `rate_limit`,
    `auth_rate_limit`, `cors_origins`, `max_body`, `idempotency_ttl`) beat the environment and `.env`.

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
            web.log_json(error=f"not connected at start-up, will retry on demand: {error}")
        yield
        await store.disconnect()

    web.log_to_stderr()
    operations = DOCS.operations
    # A private operation's path and everything under it: `/api/v1/users/x` is a 404 about accounts too.
    private = tuple({op.path.split("{")[0]: None for op in operations if op.private})
    routes = web.routes(operations) + DOCS.asset_routes()
    metrics = web.Metrics()
    middleware = [Middleware(web.RequestMiddleware, metrics=metrics, routes=routes, private=private)]
    if settings.cors_origins:
        middleware.append(Middleware(
            web.CORSMiddleware, allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "If-Match", "If-None-Match", "Idempotency-Key",
                           "traceparent", "X-Request-ID"],
            expose_headers=["ETag", "Location", "Link", "X-Request-ID", "Retry-After", "Idempotent-Replayed",
                            "RateLimit", "RateLimit-Policy", "traceresponse"],
            max_age=600))
    middleware.append(Middleware(web.GuardMiddleware, max_body=settings.max_body))
    if settings.rate_limit:
        middleware.append(Middleware(
            web.RateLimitMiddleware, per_minute=settings.rate_limit, auth_per_minute=settings.auth_rate_limit,
            strict=[(op.method, op.path) for op in operations if op.strict_limit],
            uncounted=[op.path for op in operations if not op.counted], uncounted_prefixes=("/docs/", "/problems/")))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPProblem: web.on_problem, HTTPException: web.on_http_exception,
                            storage.Unavailable: on_unavailable, storage.Conflict: on_conflict},
        lifespan=lifespan,
    )
    app.state.quire = Quire(settings, store, metrics, ShopCounters(metrics))
    return app


# == Command line =================================================================================


def main(argv: list[str]) -> int:
    if argv == ["demo"]:
        print(asyncio.run(commands.fill_demo(create_app().state.quire.store)))
        return 0
    if argv[:1] == ["create-admin"] and len(argv) == 3:
        app = create_app()
        password = commands.read_password()

        def check_new_user(fields: dict[str, str]) -> None:  # the registration's own rules
            decode(encoder.encode(fields), UserIn)

        try:
            print(asyncio.run(commands.create_admin(app.state.quire.store, argv[1], argv[2], password,
                                                    check_new_user=check_new_user)))
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
