"""quire's tests, through the HTTP interface first.

Every test gets a fresh app and a fresh database from `create_app`: a temporary SQLite file by
default, or a throwaway PostgreSQL database when TEST_DATABASE_URL points at a server (the
database named there is only used to create and drop the throwaway ones).

    pytest -q                                                        # SQLite
    TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres pytest -q   # PostgreSQL
"""

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import datetime
import hashlib
import hmac
import itertools
import json
import logging
import os
import queue
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import asyncpg
import http_sfv
import httpx2
import jsonschema
import jwt
import prometheus_client
import prometheus_client.multiprocess
import pytest
import uvicorn
from fastapi import FastAPI
from openapi_spec_validator import validate as validate_openapi
from opentelemetry.instrumentation.starlette import StarletteInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.routing import Match, Mount, Route
from starlette.testclient import TestClient

import api
import auth
import commands
import openapi
import store as storage
import web

POSTGRES = os.environ.get("TEST_DATABASE_URL")
PASSWORD = "correct horse"
PRODUCTION_SCRYPT = (auth.SCRYPT_N, auth.SCRYPT_R, auth.SCRYPT_P)  # before cheap_hashing lowers them

# == Fixtures =====================================================================================


@pytest.fixture(autouse=True)
def cheap_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash with a small scrypt cost: the production cost (~0.1 s a hash here) would make the
    suite take minutes. Hashes describe their parameters, so everything else runs unchanged;
    `test_passwords_are_stored_with_owasp_parameters` checks the real cost."""
    monkeypatch.setattr(auth, "SCRYPT_N", 2**10)
    monkeypatch.setattr(auth, "SCRYPT_P", 1)


async def _admin(sql: str, server: str | None = None) -> None:
    """Run one statement on the server's maintenance database (TEST_DATABASE_URL by default)."""
    connection = await asyncpg.connect((server or POSTGRES).replace("postgresql://", "postgres://", 1))
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture
def database_url(tmp_path) -> Iterator[str]:
    """A database nobody else uses, removed afterwards."""
    if not POSTGRES:
        yield f"sqlite:///{tmp_path / 'quire.db'}"
        return
    name = f"quire_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def make_app(database_url: str) -> Callable[..., api.Starlette]:
    """An app factory on the test's database; rate limits off unless a test turns them on."""
    def make(**overrides):
        settings = {"database_url": database_url, "rate_limit": 0, **overrides}
        return api.create_app(config=api.Config(environ={}), **settings)
    return make


@pytest.fixture
def client(make_app) -> Iterator[TestClient]:
    with TestClient(make_app()) as client:
        # Every response a test receives must be one the OpenAPI document describes.
        client.event_hooks["response"].append(lambda response: check_against_openapi(client.app, response))
        yield client


# == Helpers ======================================================================================

_emails = itertools.count(1)


def register(client: TestClient, email: str | None = None, name: str = "Ada",
             password: str = PASSWORD) -> dict:
    email = email or f"user{next(_emails)}@example.com"
    response = client.post("/api/v1/users", json={"email": email, "name": name, "password": password})
    assert response.status_code == 201, response.text
    return response.json()


def token_for(client: TestClient, email: str, password: str = PASSWORD) -> str:
    response = client.post("/api/v1/auth/token", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def signed_in_user(client: TestClient, **kwargs) -> tuple[dict, dict[str, str]]:
    """A new user and the headers that sign its requests in."""
    user = register(client, **kwargs)
    return user, bearer(token_for(client, user["email"], kwargs.get("password", PASSWORD)))


def make_admin(client: TestClient, email: str) -> None:
    """Promote through the same code `python api.py create-admin` runs."""
    store = client.app.state.quire.store
    client.portal.call(store.promote_user, email)


def assert_problem(response, status: int, detail_part: str = "") -> dict:
    """The response is a problem+json with the given status and a detail mentioning `detail_part`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["type"] and body["title"]
    assert detail_part in body["detail"], body["detail"]
    return body


# == Smoke ========================================================================================


def test_a_user_registers_signs_in_and_reads_itself(client):
    user, headers = signed_in_user(client)
    response = client.get("/api/v1/users/me", headers=headers)
    assert response.status_code == 200
    assert response.json() == user
    assert response.headers["cache-control"] == "no-store"


# == Foundation: shared names and helpers =========================================================

USERS = "/api/v1/users"
ME = "/api/v1/users/me"
TOKEN = "/api/v1/auth/token"
LOGOUT = "/api/v1/auth/logout"
HERE = os.path.dirname(os.path.abspath(__file__))
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
REQUEST_ID_SHAPE = re.compile(r"[A-Za-z0-9._-]{1,128}")
JSON_HEADERS = {"Content-Type": "application/json"}
EMAIL_PATTERN_DETAIL = "Expected an email address like ada@example.com"


RUNTIME_MODULES = ("api", "web", "openapi", "commands", "store", "auth")


def quire_imports(module: str) -> set[str]:
    """The runtime modules that `module`.py imports."""
    import ast
    tree = ast.parse(Path(HERE, f"{module}.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return names & set(RUNTIME_MODULES)


def test_the_runtime_modules_import_each_other_as_a_tree_with_api_at_the_top():
    assert {module: quire_imports(module) for module in RUNTIME_MODULES} == {
        "api": {"web", "openapi", "commands", "store", "auth"},
        "openapi": {"web"},  # the generic modules know nothing of quire's own
        "commands": {"store", "auth"},
        "web": set(), "store": set(), "auth": set()}


def test_importing_the_runtime_modules_does_no_io(tmp_path):
    """Importing builds the module-level app but connects to nothing and creates no file."""
    code = f"import sys; sys.path.insert(0, {HERE!r}); import {', '.join(RUNTIME_MODULES)}"
    environment = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'never.db'}", "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment, check=True, timeout=60)
    assert list(tmp_path.iterdir()) == []


def test_the_container_image_holds_every_runtime_module_and_no_test_package():
    dockerfile = Path(HERE, "Dockerfile").read_text()
    copied = re.search(r"^COPY --chown=\S+ (.+) \./$", dockerfile, re.M).group(1).split()
    assert sorted(copied) == sorted(f"{module}.py" for module in RUNTIME_MODULES)
    allowed = {line[1:] for line in Path(HERE, ".dockerignore").read_text().split() if line.startswith("!")}
    assert allowed == {*copied, "requirements.txt"}
    # The image installs what precedes the `# Tests` line (the Dockerfile cuts there with sed).
    assert "sed '/^# Tests/,$d' requirements.txt" in dockerfile
    runtime = Path(HERE, "requirements.txt").read_text().split("\n# Tests")[0]
    packages = {line.split("==")[0] for line in runtime.splitlines() if line and not line.startswith("#")}
    assert {"starlette", "msgspec", "uvicorn[standard]", "databases", "aiosqlite", "asyncpg"} <= packages
    assert not packages & {"pytest", "httpx2", "fastapi", "requests-oauthlib", "http-sfv", "PyJWT"}


@pytest.fixture
def plain_client(tmp_path) -> Iterator[TestClient]:
    """A client for HTTP plumbing that a request settles before it reaches the database (routing,
    request ids, media types, malformed JSON): always on a SQLite file, so that the PostgreSQL
    pass does not pay for a database per case where the database plays no part."""
    app = api.create_app(config=api.Config(environ={}), database_url=f"sqlite:///{tmp_path / 'plain.db'}",
                         rate_limit=0)
    with TestClient(app) as client:
        yield client


def user_body(**changes) -> dict:
    """A valid registration body; `changes` override fields, and a value of `...` removes one."""
    body = {"email": f"user{next(_emails)}@example.com", "name": "Ada", "password": PASSWORD, **changes}
    return {name: value for name, value in body.items() if value is not ...}


def assert_bad_field(response, pointer: str, detail: str) -> None:
    """A 400 problem whose first error points at `pointer` with exactly `detail`."""
    body = assert_problem(response, 400)
    assert body["errors"][0] == {"pointer": pointer, "detail": detail}


def assert_bad_parameter(response, parameter: str, detail: str) -> None:
    body = assert_problem(response, 400, detail)
    assert body["errors"][0] == {"parameter": parameter, "detail": detail}


def assert_unauthorized(response) -> dict:
    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    return body


def signing_key(client: TestClient) -> bytes:
    """The key the app signs tokens with (configured, or made and kept in the database)."""
    return client.portal.call(client.app.state.quire.signing_key)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(key: bytes, payload: dict | str, header: dict | str | None = None, *,
          digest=hashlib.sha256) -> str:
    """A JWT signed with `key`; `payload` and `header` are dicts or raw JSON text (to send
    duplicate keys or NaN, which json.dumps would not write)."""
    header = {"alg": "HS256", "typ": "JWT"} if header is None else header
    parts = [b64url((part if isinstance(part, str) else json.dumps(part)).encode()) for part in (header, payload)]
    signing_input = ".".join(parts)
    return f"{signing_input}.{b64url(hmac.new(key, signing_input.encode(), digest).digest())}"


def claims(user_id: int, **changes) -> dict:
    """Claims of a token that would be valid for `user_id`; a value of `...` removes a claim."""
    values = {"sub": str(user_id), "exp": int(time.time()) + 600, "jti": uuid.uuid4().hex, **changes}
    return {name: value for name, value in values.items() if value is not ...}


def non_canonical(token: str) -> str:
    """The same token with the signature's last character changed in its unused low bits only:
    a 32-byte signature is 43 characters, the last of which carries 2 bits nobody reads."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    head, payload, signature = token.split(".")
    variant = signature[:-1] + alphabet[alphabet.index(signature[-1]) ^ 1]
    assert base64.urlsafe_b64decode(variant + "=") == base64.urlsafe_b64decode(signature + "=")
    return f"{head}.{payload}.{variant}"


def sized_token(key: bytes, user_id: int, size: int) -> str:
    """A valid token padded with a filler claim to exactly `size` characters."""
    filler = size  # base64url grows by 4/3, so this starts too long and shrinks to fit
    while len(token := forge(key, claims(user_id, filler="x" * filler))) > size:
        filler -= 1
    assert len(token) == size, len(token)
    return token


def run_python(code: str | None, *args: str, stdin: str = "", env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a Python snippet (or `api.py ...` when `code` is None) in a process of its own, from
    the project's directory, with no QUIRE_ setting leaking in from the environment."""
    environ = {name: value for name, value in os.environ.items()
               if not name.startswith("QUIRE_") and name != "DATABASE_URL"}
    environ.update(env or {})
    command = [sys.executable, "-c", code, *args] if code is not None else [sys.executable, "api.py", *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, cwd=HERE, env=environ,
                          timeout=timeout)


# == Registration =================================================================================


def test_registering_answers_201_with_the_users_location_and_no_password(client):
    response = client.post(USERS, json={"email": "Ada.Lovelace@Example.COM", "name": "Ada Lovelace",
                                        "password": PASSWORD})
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    user = response.json()
    assert set(user) == {"id", "email", "name", "role", "created_at"}
    assert isinstance(user["id"], int) and user["id"] > 0
    assert user["email"] == "ada.lovelace@example.com"
    assert (user["name"], user["role"]) == ("Ada Lovelace", "user")
    assert RFC3339.fullmatch(user["created_at"]) and user["created_at"].endswith("Z")
    assert response.headers["location"] == f"/api/v1/users/{user['id']}"
    assert PASSWORD not in response.text and "scrypt" not in response.text
    assert "password" not in response.text and "hash" not in response.text
    # The Location is where the user is found.
    headers = bearer(token_for(client, "ada.lovelace@example.com"))
    found = client.get(response.headers["location"], headers=headers)
    assert found.status_code == 200 and found.json() == user


def test_an_email_is_stored_lower_case_and_taken_in_any_case(client):
    first = register(client, "Grace.Hopper@Example.com")
    assert first["email"] == "grace.hopper@example.com"
    response = client.post(USERS, json={"email": "GRACE.HOPPER@example.COM", "name": "Impostor",
                                        "password": "another password"})
    body = assert_problem(response, 409, "email")
    assert body["errors"][0]["pointer"] == "#/email"
    assert response.headers["cache-control"] == "no-store"
    # The refused registration wrote nothing: its password does not sign in.
    refused = client.post(TOKEN, json={"email": "grace.hopper@example.com", "password": "another password"})
    assert_unauthorized(refused)


BAD_REGISTRATIONS = [
    ({"email": 1}, "#/email", "Expected `str`, got `int`"),
    ({"name": None}, "#/name", "Expected `str`, got `null`"),
    ({"password": ["x"]}, "#/password", "Expected `str`, got `array`"),
    ({"password": 12345678}, "#/password", "Expected `str`, got `int`"),
    ({"role": "admin"}, "#/role", "Object contains unknown field `role`"),
    ({"id": 1}, "#/id", "Object contains unknown field `id`"),
    ({"created_at": "2020-01-01T00:00:00Z"}, "#/created_at", "Object contains unknown field `created_at`"),
    ({"email": ...}, "#/email", "Object missing required field `email`"),
    ({"name": ...}, "#/name", "Object missing required field `name`"),
    ({"password": ...}, "#/password", "Object missing required field `password`"),
    ({"password": "x" * 7}, "#/password", "Expected `str` of length >= 8"),
    ({"password": "x" * 129}, "#/password", "Expected `str` of length <= 128"),
    ({"name": ""}, "#/name", "Expected `str` of length >= 1"),
    ({"name": "x" * 101}, "#/name", "Expected `str` of length <= 100"),
    ({"email": "ada.example.com"}, "#/email", EMAIL_PATTERN_DETAIL),
    ({"email": "ada@lovelace@example.com"}, "#/email", EMAIL_PATTERN_DETAIL),
    ({"email": "@example.com"}, "#/email", EMAIL_PATTERN_DETAIL),
    ({"email": "ada@example"}, "#/email", EMAIL_PATTERN_DETAIL),
    ({"email": "a\ufeffb@example.com"}, "#/email", EMAIL_PATTERN_DETAIL),  # a space to ECMAScript's `\s`
    ({"email": "a\x1fb@example.com"}, "#/email", EMAIL_PATTERN_DETAIL),  # and to Python's
    ({"email": "ada lovelace@example.com"}, "#/email", EMAIL_PATTERN_DETAIL),
    ({"email": "ada@example.com "}, "#/email", EMAIL_PATTERN_DETAIL),
    ({"email": "\tada@example.com"}, "#/email", EMAIL_PATTERN_DETAIL),
    ({"email": "ada@exam\nple.com"}, "#/email", EMAIL_PATTERN_DETAIL),
    ({"email": ""}, "#/email", EMAIL_PATTERN_DETAIL),
    ({"email": "a" * 243 + "@example.com"}, "#/email", "Expected `str` of length <= 254"),
]


@pytest.mark.parametrize("changes, pointer, detail", BAD_REGISTRATIONS, ids=[
    ",".join(f"{name}={value!r:.20}" for name, value in changes.items()) for changes, *_ in BAD_REGISTRATIONS])
def test_a_bad_registration_is_400_naming_the_field_and_writes_nothing(client, changes, pointer, detail):
    body = user_body(**changes)
    response = client.post(USERS, json=body)
    assert_bad_field(response, pointer, detail)
    assert response.headers["cache-control"] == "no-store"
    if isinstance(body.get("email"), str) and isinstance(body.get("password"), str):
        signing_in = client.post(TOKEN, json={"email": body["email"], "password": body["password"]})
        assert signing_in.status_code in (400, 401), "the refused registration wrote nothing"


@pytest.mark.parametrize("changes", [
    {"email": "a" * 242 + "@example.com"},  # 254 characters
    {"email": "x@y.z"},
    {"email": "O'Brien+books@mail.example.co.uk"},
    {"name": "x"},
    {"name": "x" * 100},
    {"password": "x" * 8},
    {"password": "x" * 128},
    {"password": "pässwörd ✓"},
])
def test_the_limits_of_every_registration_field_are_accepted(client, changes):
    body = user_body(**changes)
    response = client.post(USERS, json=body)
    assert response.status_code == 201, response.text
    assert token_for(client, body["email"], body["password"])


@pytest.mark.parametrize("content, detail", [
    (b"{", "Input data was truncated"),
    (b"", "Input data was truncated"),
    (b'{"email": }', "JSON is malformed: invalid character (byte 10)"),
    (b"not json", "JSON is malformed: invalid character (byte 4)"),
    (b"null", "Expected `object`, got `null`"),
    (b'"ada@example.com"', "Expected `object`, got `str`"),
])
def test_malformed_json_is_400_pointing_at_the_whole_body(plain_client, content, detail):
    assert_bad_field(plain_client.post(USERS, content=content, headers=JSON_HEADERS), "#", detail)


@pytest.mark.parametrize("headers, content", [
    ({"Content-Type": "text/plain"}, json.dumps(user_body())),
    ({"Content-Type": "application/x-www-form-urlencoded"}, "email=ada%40example.com&name=Ada"),
    ({"Content-Type": "application/merge-patch+json"}, json.dumps(user_body())),
    ({"Content-Type": "application/jsonx"}, json.dumps(user_body())),
    ({}, json.dumps(user_body())),
    ({}, b""),  # no body at all: no media type either, and 415 comes before 400
], ids=["text", "form", "merge-patch", "jsonx", "no-content-type", "no-body"])
def test_a_body_that_is_not_declared_json_is_415(plain_client, headers, content):
    response = plain_client.post(USERS, content=content, headers=headers)
    assert_problem(response, 415, "application/json")
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON"])
def test_json_media_type_parameters_and_case_are_accepted(client, content_type):
    response = client.post(USERS, content=json.dumps(user_body()), headers={"Content-Type": content_type})
    assert response.status_code == 201, response.text


def test_passwords_are_stored_with_owasp_parameters(client, monkeypatch):
    # N=2**13, r=8, p=10 is in OWASP's list, as costly as N=2**14, p=5 in half the memory (8 MiB).
    assert PRODUCTION_SCRYPT == (2**13, 8, 10)
    monkeypatch.setattr(auth, "SCRYPT_N", PRODUCTION_SCRYPT[0])
    monkeypatch.setattr(auth, "SCRYPT_P", PRODUCTION_SCRYPT[2])
    first, second = register(client, "one@example.com"), register(client, "two@example.com")
    store = client.app.state.quire.store
    hashes = [client.portal.call(store.get_login, user["email"])["password_hash"] for user in (first, second)]
    for stored in hashes:
        assert re.fullmatch(r"scrypt\$8192,8,10\$[A-Za-z0-9_-]{22}\$[A-Za-z0-9_-]{43}", stored), stored
        assert PASSWORD not in stored
    assert hashes[0].split("$")[2] != hashes[1].split("$")[2], "every hash has its own salt"
    assert token_for(client, "one@example.com")


def test_a_token_presented_when_registering_is_checked_and_a_bad_one_creates_nobody(client):
    assert_unauthorized(client.post(USERS, json=user_body(email="ada@example.com"), headers=bearer("not.a.token")))
    assert_unauthorized(client.post(TOKEN, json={"email": "ada@example.com", "password": PASSWORD}))
    _, headers = signed_in_user(client)  # a good token is no obstacle: a signed-in user may register another
    assert client.post(USERS, json=user_body(email="ada@example.com"), headers=headers).status_code == 201


# == Tokens =======================================================================================


def test_the_right_password_gets_a_bearer_token(client):
    user = register(client)
    response = client.post(TOKEN, json={"email": user["email"], "password": PASSWORD})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    assert body["access_token"].count(".") == 2
    assert client.get(ME, headers=bearer(body["access_token"])).json() == user


def test_the_dummy_hash_for_unknown_emails_is_made_in_the_hashing_thread(client, monkeypatch):
    """Making the dummy hash is a whole scrypt hash: made on the event loop, the first sign-in
    for an unknown email would stall every other request for its duration."""
    threads = []

    def dummy_hash() -> str:
        threads.append(threading.current_thread().name)
        return auth.make_password_hash("dummy")

    monkeypatch.setattr(auth, "_dummy_hash", dummy_hash)
    assert_unauthorized(client.post(TOKEN, json={"email": "nobody@example.com", "password": PASSWORD}))
    assert len(threads) == 1 and threads[0].startswith("scrypt"), threads


def test_the_dummy_hash_is_made_by_the_first_check_whoever_signs_in(client, monkeypatch):
    """Made at the first unknown email's check, that one would cost two hashes and tell, once per
    process, that the email is not registered: the first check of a known email makes it instead."""
    user = register(client)
    made = []
    monkeypatch.setattr(auth, "_dummy_hash", functools.cache(lambda: made.append(1) or auth.make_password_hash("d")))
    assert_unauthorized(client.post(TOKEN, json={"email": user["email"], "password": "not the password"}))
    assert made == [1]
    assert_unauthorized(client.post(TOKEN, json={"email": "nobody@example.com", "password": PASSWORD}))
    assert made == [1]  # made once, before any unknown email asked for it


def test_a_wrong_password_and_an_unknown_email_get_the_same_401(client):
    user = register(client)
    wrong_password = client.post(TOKEN, json={"email": user["email"], "password": "not the password"})
    unknown_email = client.post(TOKEN, json={"email": "nobody@example.com", "password": PASSWORD})
    for response in (wrong_password, unknown_email):
        assert_unauthorized(response)
        assert response.headers["cache-control"] == "no-store"
    assert wrong_password.json() == unknown_email.json()
    assert wrong_password.headers["www-authenticate"] == unknown_email.headers["www-authenticate"]


def test_an_unknown_email_costs_a_password_check_like_a_wrong_password(client, monkeypatch):
    user = register(client)
    checked = []
    real_check = auth.check_password_hash

    def counting_check(stored: str, password: str) -> bool:
        checked.append(password)
        return real_check(stored, password)

    monkeypatch.setattr(auth, "check_password_hash", counting_check)
    client.post(TOKEN, json={"email": "nobody@example.com", "password": "guess one"})
    client.post(TOKEN, json={"email": user["email"], "password": "guess two"})
    assert checked == ["guess one", "guess two"]


def test_signing_in_ignores_the_case_of_the_email(client):
    user = register(client, "Mixed.Case@Example.com")
    for email in ("mixed.case@example.com", "MIXED.CASE@EXAMPLE.COM", "Mixed.Case@Example.com"):
        assert client.get(ME, headers=bearer(token_for(client, email))).json() == user


def test_every_user_and_token_response_says_no_store(client):
    user, headers = signed_in_user(client)
    other = register(client)
    responses = [
        client.post(USERS, json=user_body()),
        client.post(USERS, json=user_body(email=user["email"])),
        client.post(USERS, json=user_body(name="")),
        client.post(TOKEN, json={"email": user["email"], "password": PASSWORD}),
        client.post(TOKEN, json={"email": user["email"], "password": "wrong password"}),
        client.get(ME, headers=headers),
        client.get(ME),
        client.get(f"{USERS}/{user['id']}", headers=headers),
        client.get(f"{USERS}/{other['id']}", headers=headers),
        client.get(USERS, headers=headers),
        client.delete(ME, headers=headers),
        client.post(LOGOUT, headers=headers),
    ]
    for response in responses:
        assert response.headers.get("cache-control") == "no-store", (response.request.url, response.status_code)


def test_every_response_says_nosniff_and_carries_a_request_id(make_app):
    with TestClient(make_app(max_body=1000)) as client:
        user, headers = signed_in_user(client)
        responses = [
            client.get("/healthz"),
            client.get("/readyz"),
            client.get("/no/such/route"),
            client.delete(ME, headers=headers),
            client.get(ME),
            client.get(ME, headers=headers),
            client.post(USERS, json=user_body()),
            client.post(USERS, json=user_body(name="")),
            client.post(USERS, content="x", headers={"Content-Type": "text/plain"}),
            client.post(USERS, content=b"x" * 2000, headers=JSON_HEADERS),
            client.get("/api/v1/books"),
            client.post(LOGOUT, headers=headers),
        ]
    for response in responses:
        assert response.headers.get("x-content-type-options") == "nosniff", response.request.url
        assert REQUEST_ID_SHAPE.fullmatch(response.headers.get("x-request-id", "")), response.request.url


@pytest.mark.parametrize("request_id", ["abc", "A.b_c-9", "x" * 128, "1", "0af2c7e8-4b1e-4c2a-9f00-7d1e2f3a4b5c"])
def test_a_valid_request_id_is_echoed(plain_client, request_id):
    for response in (plain_client.get("/healthz", headers={"X-Request-ID": request_id}),
                     plain_client.get("/no/such/route", headers={"X-Request-ID": request_id})):
        assert response.headers["x-request-id"] == request_id


@pytest.mark.parametrize("request_id", [
    b"", b"x" * 129, b"has space", b"semi;colon", b"a/b", b"<script>", b"tab\tin", "ünïcode".encode(),
], ids=["empty", "129-chars", "space", "semicolon", "slash", "markup", "tab", "non-ascii"])
def test_an_invalid_request_id_is_replaced_by_a_new_one(plain_client, request_id):
    first = plain_client.get("/healthz", headers={"X-Request-ID": request_id})
    second = plain_client.get("/healthz", headers={"X-Request-ID": request_id})
    for response in (first, second):
        assert REQUEST_ID_SHAPE.fullmatch(response.headers["x-request-id"])
        assert response.headers["x-request-id"].encode() != request_id
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_requests_without_an_id_get_distinct_ones(plain_client):
    ids = {plain_client.get("/healthz").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


# == Refresh tokens and the OAuth 2.0 form ========================================================

FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


def sign_in(client: TestClient, email: str, password: str = PASSWORD) -> dict:
    response = client.post(TOKEN, json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return response.json()


def refresh(client: TestClient, refresh_token: str):
    return client.post(TOKEN, json={"refresh_token": refresh_token})


def assert_token_answer(response) -> dict:
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert body["token_type"] == "bearer" and body["expires_in"] == 3600
    assert len(base64.urlsafe_b64decode(body["refresh_token"] + "==")) >= 32
    return body


def assert_refused_grant(response, error: str, detail: str = "") -> dict:
    body = assert_problem(response, 400, detail)
    assert body["error"] == error and body["type"] == "/problems/invalid-grant", body
    return body


def test_each_grant_answers_an_access_token_and_a_refresh_token(client):
    user = register(client)
    grants = [
        client.post(TOKEN, json={"email": user["email"], "password": PASSWORD}),
        client.post(TOKEN, data={"grant_type": "password", "username": user["email"], "password": PASSWORD}),
    ]
    for response in grants:
        body = assert_token_answer(response)
        assert client.get(ME, headers=bearer(body["access_token"])).json() == user
        by_json = assert_token_answer(refresh(client, body["refresh_token"]))
        by_form = assert_token_answer(client.post(TOKEN, data={"grant_type": "refresh_token",
                                                               "refresh_token": by_json["refresh_token"]}))
        assert len({body["refresh_token"], by_json["refresh_token"], by_form["refresh_token"]}) == 3
        for new in (by_json, by_form):
            assert client.get(ME, headers=bearer(new["access_token"])).json() == user
    # Only hashes are stored: the database cannot hand out a session.
    store = client.app.state.quire.store
    stored = {row["token_hash"] for row in client.portal.call(store.query, "SELECT token_hash FROM refresh_tokens")}
    assert body["refresh_token"] not in stored
    assert hashlib.sha256(body["refresh_token"].encode()).hexdigest() in stored


def test_the_form_ignores_scope_client_fields_and_basic_client_authentication(client):
    user = register(client)
    response = client.post(TOKEN, data={"grant_type": "password", "username": user["email"].upper(),
                                        "password": PASSWORD, "scope": "read write", "client_id": "swagger",
                                        "client_secret": ""},
                           headers={"Authorization": "Basic " + base64.b64encode(b"swagger:").decode()})
    assert_token_answer(response)


def test_the_form_is_read_as_browsers_parse_one(client):
    """WHATWG's application/x-www-form-urlencoded: empty pairs are skipped, a name alone has an empty value."""
    user = register(client)
    credentials = urlencode({"username": user["email"], "password": PASSWORD})
    for form in (f"grant_type=password&{credentials}&", f"&&grant_type=password&{credentials}&scope"):
        assert_token_answer(client.post(TOKEN, content=form.encode(), headers=FORM_HEADERS))


@pytest.mark.parametrize("form, error, detail", [
    ("", "invalid_request", "needs a `grant_type`"),
    ("username=a%40example.com&password=x", "invalid_request", "needs a `grant_type`"),
    ("grant_type=client_credentials", "unsupported_grant_type", "'client_credentials' is not supported"),
    ("grant_type=password&username=a%40example.com", "invalid_request", "needs `username` and `password`"),
    ("grant_type=password&password=x", "invalid_request", "needs `username` and `password`"),
    ("grant_type=refresh_token", "invalid_request", "needs `refresh_token`"),
    ("grant_type=password&grant_type=password&username=a%40example.com&password=x", "invalid_request",
     "`grant_type` is repeated"),
    ("grant_type=refresh_token&refresh_token=garbage", "invalid_grant", "refresh token is unknown"),
    ("grant_type=password&username=nobody%40example.com&password=x", "invalid_grant", "wrong"),
    ("%ff%fe=1", "invalid_request", "not valid application/x-www-form-urlencoded"),
    ("grant_type=password&username=a%00b%40example.com&password=x", "invalid_request", "`username`"),
    ("grant_type=password&username=a%40example.com&password=" + "x" * 1025, "invalid_request", "`password`"),
    ("grant_type=refresh_token&refresh_token=a%00", "invalid_request", "`refresh_token`"),
])
def test_the_forms_refusals_follow_rfc_6749_and_change_nothing(client, form, error, detail):
    sessions = lambda: client.portal.call(client.app.state.quire.store.query, "SELECT id FROM sessions")  # noqa: E731
    assert_refused_grant(client.post(TOKEN, content=form.encode(), headers=FORM_HEADERS), error, detail)
    assert sessions() == []


@pytest.mark.parametrize("body, detail", [
    ({"email": "a@example.com", "password": PASSWORD, "refresh_token": "x"}, "Send either"),
    ({"password": PASSWORD, "refresh_token": "x"}, "Send either"),
    ({"email": "a@example.com"}, "Send either"),
    ({}, "Send either"),
    ({"refresh_token": 7}, "Expected `str`"),
])
def test_json_that_mixes_or_lacks_the_grants_fields_is_400(client, body, detail):
    assert_problem(client.post(TOKEN, json=body), 400, detail)


@pytest.mark.parametrize("token", ["garbage", "", "x" * 1000])
def test_a_bad_refresh_token_in_json_is_401(client, token):
    body = assert_unauthorized(refresh(client, token))
    assert "refresh token is unknown, spent, expired or revoked" in body["detail"]


def test_a_spent_refresh_token_sent_again_revokes_its_whole_session_and_only_that(client):
    user = register(client)
    first, other = sign_in(client, user["email"]), sign_in(client, user["email"])
    rotated = assert_token_answer(refresh(client, first["refresh_token"]))
    # The stolen copy of the spent token is presented again: the session ends, both ways in.
    reused = client.post(TOKEN, data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]})
    assert_refused_grant(reused, "invalid_grant", "used before, so its session is revoked")
    assert_unauthorized(refresh(client, rotated["refresh_token"]))
    for access_token in (first["access_token"], rotated["access_token"]):
        assert assert_unauthorized(client.get(ME, headers=bearer(access_token)))["type"] == "/problems/token-revoked"
    # The user's other session goes on.
    assert client.get(ME, headers=bearer(other["access_token"])).status_code == 200
    assert_token_answer(refresh(client, other["refresh_token"]))


def test_of_two_concurrent_refreshes_with_one_token_exactly_one_succeeds(client):
    user = register(client)
    token = sign_in(client, user["email"])["refresh_token"]
    responses = at_once(8, lambda n: refresh(client, token))
    assert sorted(response.status_code for response in responses) == [200] + [401] * 7


def test_refresh_tokens_expire_after_the_refresh_ttl(make_app):
    with TestClient(make_app(refresh_ttl=1)) as client:
        user = register(client)
        token = sign_in(client, user["email"])["refresh_token"]
        time.sleep(2.1)
        assert_unauthorized(refresh(client, token))


def test_access_tokens_expire_after_the_token_ttl_as_token_expired(make_app, monkeypatch):
    monkeypatch.setattr(auth, "LEEWAY_SECONDS", 0)  # or the test would wait 30 s more
    with TestClient(make_app(token_ttl=1)) as client:
        user = register(client)
        tokens = sign_in(client, user["email"])
        assert tokens["expires_in"] == 1
        time.sleep(2.1)
        body = assert_unauthorized(client.get(ME, headers=bearer(tokens["access_token"])))
        assert body["type"] == "/problems/token-expired" and body["title"] == api.TOKEN_EXPIRED.title
        refreshed = refresh(client, tokens["refresh_token"])  # what a client does on token-expired
        assert refreshed.status_code == 200, refreshed.text
        # `exp` is whole seconds (iat + 1), so without the leeway a token issued late in a second
        # would be past it a few milliseconds later: the usual leeway back for the new token.
        monkeypatch.setattr(auth, "LEEWAY_SECONDS", 30)
        assert client.get(ME, headers=bearer(refreshed.json()["access_token"])).status_code == 200


def test_logout_ends_the_session_its_refresh_token_included(client):
    user = register(client)
    tokens = sign_in(client, user["email"])
    assert client.post(LOGOUT, headers=bearer(tokens["access_token"])).status_code == 204
    assert_unauthorized(refresh(client, tokens["refresh_token"]))


def test_a_logout_that_fails_halfway_leaves_the_token_and_the_session_as_they_were(client, monkeypatch):
    """Revoking the token and ending its session are one transaction: a failure in the second
    step must not leave a revoked access token beside a refresh token that still works."""
    user = register(client)
    tokens = sign_in(client, user["email"])
    real_sqlite, real_on_loop, real_postgres = storage.Store._sqlite, storage.Store._on_loop, storage.Store._postgres

    def failing_on_sessions(sql: str) -> None:
        if sql.startswith("UPDATE sessions"):
            raise RuntimeError("the disk is full")

    async def sqlite(self, connection, sql, values):
        failing_on_sessions(sql)
        return await real_sqlite(self, connection, sql, values)

    def on_loop(connection, sql, values):
        failing_on_sessions(sql)
        return real_on_loop(connection, sql, values)

    async def postgres(raw, sql, values):
        failing_on_sessions(sql)
        return await real_postgres(raw, sql, values)

    with monkeypatch.context() as patch:  # SQLite runs statements on the loop or on a thread
        patch.setattr(storage.Store, "_sqlite", sqlite)
        patch.setattr(storage.Store, "_on_loop", staticmethod(on_loop))
        patch.setattr(storage.Store, "_postgres", staticmethod(postgres))
        assert_problem(client.post(LOGOUT, headers=bearer(tokens["access_token"])), 500)
    assert client.get(ME, headers=bearer(tokens["access_token"])).status_code == 200
    assert client.post(LOGOUT, headers=bearer(tokens["access_token"])).status_code == 204
    assert_unauthorized(refresh(client, tokens["refresh_token"]))


# == Changing the password ========================================================================

PASSWORD_URL = "/api/v1/users/me/password"


def test_changing_the_password_refuses_every_older_token_at_once(client):
    user = register(client)
    sessions = [sign_in(client, user["email"]) for _ in range(2)]
    headers = bearer(sessions[0]["access_token"])
    response = client.post(PASSWORD_URL, json={"current_password": PASSWORD, "new_password": "a new long password"},
                           headers=headers)
    assert response.status_code == 204 and response.content == b""
    assert response.headers["cache-control"] == "no-store"
    for tokens in sessions:
        body = assert_unauthorized(client.get(ME, headers=bearer(tokens["access_token"])))
        assert body["type"] == "/problems/token-revoked"
        assert_unauthorized(refresh(client, tokens["refresh_token"]))
    assert_unauthorized(client.post(TOKEN, json={"email": user["email"], "password": PASSWORD}))
    new = sign_in(client, user["email"], "a new long password")
    assert client.get(ME, headers=bearer(new["access_token"])).json() == user


@pytest.mark.parametrize("body, status, detail", [
    ({"current_password": "wrong password", "new_password": "a new long password"}, 403, "current password is wrong"),
    ({"current_password": PASSWORD, "new_password": "short"}, 400, "Expected `str` of length >= 8 (#/new_password)"),
    ({"current_password": PASSWORD, "new_password": "x" * 129}, 400, "Expected `str` of length <= 128"),
    ({"current_password": PASSWORD}, 400, "missing required field `new_password`"),
    ({"current_password": PASSWORD, "new_password": "a new long password", "role": "admin"}, 400, "unknown field"),
])
def test_a_refused_password_change_changes_nothing(client, body, status, detail):
    user, headers = signed_in_user(client)
    assert_problem(client.post(PASSWORD_URL, json=body, headers=headers), status, detail)
    assert client.get(ME, headers=headers).status_code == 200
    sign_in(client, user["email"])


def test_a_sign_in_that_races_a_password_change_gets_a_session_that_is_refused(client):
    """The interleaving, step by step: a sign-in checks the old password; the change commits; the
    sign-in then starts its session. Neither its access token nor its refresh token may work."""
    user = register(client)
    store = client.app.state.quire.store
    generation = client.portal.call(store.get_login, user["email"])["token_generation"]  # read by the sign-in
    headers = bearer(sign_in(client, user["email"])["access_token"])
    assert client.post(PASSWORD_URL, json={"current_password": PASSWORD, "new_password": "a new long password"},
                       headers=headers).status_code == 204
    refresh_token, refresh_hash = auth.new_refresh_token()
    session_id = client.portal.call(functools.partial(store.start_session, user["id"], generation=generation,
                                                      refresh_hash=refresh_hash, expires_at=int(time.time()) + 60))
    access_token, _ = auth.make_token(user["id"], signing_key(client), 3600, session_id=session_id,
                                      generation=generation)
    assert_unauthorized(client.get(ME, headers=bearer(access_token)))
    assert_unauthorized(refresh(client, refresh_token))


def test_a_wrong_current_password_counts_as_a_failed_sign_in(make_app):
    with TestClient(make_app(login_failures=2)) as client:
        user, headers = signed_in_user(client)
        wrong = {"current_password": "wrong password", "new_password": "a new long password"}
        assert client.post(PASSWORD_URL, json=wrong, headers=headers).status_code == 403
        assert client.post(TOKEN, json={"email": user["email"], "password": "nope"}).status_code == 401
        assert_problem(client.post(TOKEN, json={"email": user["email"], "password": PASSWORD}), 429)


def test_a_password_change_needs_a_token(client):
    assert_unauthorized(client.post(PASSWORD_URL, json={"current_password": PASSWORD, "new_password": "x" * 10}))


# == Failed sign-ins ==============================================================================


def fail_sign_in(client: TestClient, email: str):
    return client.post(TOKEN, json={"email": email, "password": "not the password"})


def test_five_failed_sign_ins_stop_the_email_for_fifteen_minutes_even_with_the_right_password(client):
    user = register(client)
    for _ in range(5):
        assert_unauthorized(fail_sign_in(client, user["email"]))
    for response in (fail_sign_in(client, user["email"]),
                     client.post(TOKEN, json={"email": user["email"].upper(), "password": PASSWORD}),
                     client.post(TOKEN, data={"grant_type": "password", "username": user["email"],
                                              "password": PASSWORD})):
        body = assert_problem(response, 429, "Too many failed sign-ins")
        assert body["type"] == "/problems/too-many-failed-sign-ins"
        assert 890 <= int(response.headers["retry-after"]) <= 900
    # Another email is not affected; an unknown email is throttled the same way.
    assert_token_answer(client.post(TOKEN, json={"email": register(client)["email"], "password": PASSWORD}))
    for _ in range(5):
        assert_unauthorized(fail_sign_in(client, "nobody@example.com"))
    assert_problem(fail_sign_in(client, "nobody@example.com"), 429)


def test_thirty_wrong_passwords_sent_at_once_get_no_more_than_five_tries(client):
    """Checking a password takes a while; attempts are counted before it, so a burst sent in
    parallel cannot slip past the count."""
    user = register(client)
    responses = at_once(30, lambda n: fail_sign_in(client, user["email"]))
    statuses = collections.Counter(response.status_code for response in responses)
    assert set(statuses) <= {401, 429} and statuses[401] <= 5, statuses  # all 429 is possible: all counted first
    # Refused attempts were not counted as failures: one at a time, the rest of the five follow.
    more = [fail_sign_in(client, user["email"]).status_code for _ in range(6)]
    assert statuses[401] + more.count(401) == 5 and more[-1] == 429, (statuses, more)
    assert_problem(client.post(TOKEN, json={"email": user["email"], "password": PASSWORD}), 429)


def test_right_passwords_sent_at_once_are_never_told_that_they_failed(client):
    """Attempts are counted before their passwords are checked, so more than five at once find
    the count full: those are 429s, but not "too many failed sign-ins" with a 15-minute wait, since
    none failed; they may try again in a second. No attempt counts as a failure afterwards."""
    user = register(client)
    responses = at_once(12, lambda n: client.post(TOKEN, json={"email": user["email"], "password": PASSWORD}))
    for response in responses:
        if response.status_code != 200:
            body = assert_problem(response, 429, "being checked at once")
            assert body["type"] != "/problems/too-many-failed-sign-ins" and response.headers["retry-after"] == "1"
    for _ in range(4):  # the count is empty: four failures still leave a fifth try
        assert_unauthorized(fail_sign_in(client, user["email"]))
    assert_token_answer(client.post(TOKEN, json={"email": user["email"], "password": PASSWORD}))


def test_a_success_clears_the_count(client):
    user = register(client)
    for _ in range(4):
        fail_sign_in(client, user["email"])
    sign_in(client, user["email"])
    for _ in range(4):
        assert_unauthorized(fail_sign_in(client, user["email"]))
    sign_in(client, user["email"])


def test_failures_older_than_fifteen_minutes_no_longer_count(client):
    user = register(client)
    store = client.app.state.quire.store
    for age in (901, 950, 1000, 2000, 5000):  # five failures, all out of the window
        client.portal.call(functools.partial(
            store.query, "INSERT INTO sign_in_failures (email, failed_at) VALUES (:email, :at)",
            {"email": user["email"], "at": time.time() - age}, write=True))
    sign_in(client, user["email"])
    for age in (100, 200, 300, 400, 500):  # five inside it
        client.portal.call(functools.partial(
            store.query, "INSERT INTO sign_in_failures (email, failed_at) VALUES (:email, :at)",
            {"email": user["email"], "at": time.time() - age}, write=True))
    response = client.post(TOKEN, json={"email": user["email"], "password": PASSWORD})
    assert_problem(response, 429)
    assert 395 <= int(response.headers["retry-after"]) <= 401  # until the oldest (500 s ago) leaves


def test_the_throttle_holds_across_two_apps_on_one_database(make_app):
    with TestClient(make_app()) as first, TestClient(make_app()) as second:
        user = register(first)
        for n in range(5):
            assert_unauthorized(fail_sign_in(first if n % 2 else second, user["email"]))
        assert_problem(first.post(TOKEN, json={"email": user["email"], "password": PASSWORD}), 429)
        assert_problem(second.post(TOKEN, json={"email": user["email"], "password": PASSWORD}), 429)


def test_login_failures_is_at_least_one(database_url):
    with pytest.raises(ValueError, match="QUIRE_LOGIN_FAILURES"):
        api.create_app(config=api.Config(environ={"QUIRE_LOGIN_FAILURES": "0"}), database_url=database_url)


# == A real OAuth 2.0 client ======================================================================


def test_a_standard_oauth_client_signs_in_with_the_password_grant_and_refreshes(tmp_path, database_url, monkeypatch):
    """requests-oauthlib, as an application would use it, against quire in a real uvicorn."""
    from oauthlib.oauth2 import LegacyApplicationClient
    from requests_oauthlib import OAuth2Session
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # plain http on loopback
    with uvicorn_server(tmp_path, database_url) as server:
        server.wait_ready()
        with httpx2.Client(base_url=server.url, timeout=10) as http:
            assert http.post(USERS, json={"email": "ada@example.com", "name": "Ada", "password": PASSWORD}
                             ).status_code == 201
        session = OAuth2Session(client=LegacyApplicationClient(client_id="quire-test"))
        token = session.fetch_token(server.url + TOKEN, username="ada@example.com", password=PASSWORD,
                                    client_id="quire-test", include_client_id=True)
        assert token["token_type"].lower() == "bearer" and token["refresh_token"]
        assert session.get(server.url + ME).json()["email"] == "ada@example.com"
        refreshed = session.refresh_token(server.url + TOKEN, client_id="quire-test")
        assert refreshed["refresh_token"] != token["refresh_token"]
        assert session.get(server.url + ME).status_code == 200
        # A wrong password comes back as the OAuth error the library raises.
        from oauthlib.oauth2.rfc6749.errors import InvalidGrantError
        with pytest.raises(InvalidGrantError):
            OAuth2Session(client=LegacyApplicationClient(client_id="quire-test")).fetch_token(
                server.url + TOKEN, username="ada@example.com", password="wrong password")


# == Verifying tokens =============================================================================
# Each case makes, from the app's key, a user id and a good token, the value that is sent.

HOSTILE_TOKENS: list[tuple[str, Callable[[bytes, int, str], str]]] = [
    ("garbage", lambda key, uid, good: "garbage"),
    ("three-garbage-parts", lambda key, uid, good: "a.b.c"),
    ("four-parts", lambda key, uid, good: good + ".x"),
    ("two-parts", lambda key, uid, good: good.rsplit(".", 1)[0]),
    ("empty-signature", lambda key, uid, good: good.rsplit(".", 1)[0] + "."),
    ("expired-beyond-leeway", lambda key, uid, good: forge(key, claims(uid, exp=int(time.time()) - 40))),
    ("alg-none", lambda key, uid, good: forge(key, claims(uid), {"alg": "none", "typ": "JWT"}).rsplit(".", 1)[0] + "."),
    ("alg-none-signed", lambda key, uid, good: forge(key, claims(uid), {"alg": "none", "typ": "JWT"})),
    ("alg-missing", lambda key, uid, good: forge(key, claims(uid), {"typ": "JWT"})),
    ("alg-lower-case", lambda key, uid, good: forge(key, claims(uid), {"alg": "hs256", "typ": "JWT"})),
    ("alg-HS512", lambda key, uid, good: forge(
        key, claims(uid), {"alg": "HS512", "typ": "JWT"}, digest=hashlib.sha512)),
    ("alg-HS512-pyjwt", lambda key, uid, good: jwt.encode(claims(uid), key, algorithm="HS512")),
    ("alg-RS256", lambda key, uid, good: forge(key, claims(uid), {"alg": "RS256", "typ": "JWT"})),
    ("tampered-payload", lambda key, uid, good: ".".join(
        [good.split(".")[0], b64url(json.dumps(claims(uid + 1)).encode()), good.split(".")[2]])),
    ("tampered-signature", lambda key, uid, good: ".".join(
        good.split(".")[:2] + [("A" if good.split(".")[2][0] != "A" else "B") + good.split(".")[2][1:]])),
    ("another-key", lambda key, uid, good: forge(b"another key, 32 bytes or longer!!", claims(uid))),
    ("non-canonical-signature", lambda key, uid, good: non_canonical(good)),
    ("padded-signature", lambda key, uid, good: good + "="),
    ("standard-base64-alphabet", lambda key, uid, good: good.replace("-", "+").replace("_", "/")
        if "-" in good or "_" in good else good + "+"),
    ("crit-header", lambda key, uid, good: forge(key, claims(uid), {"alg": "HS256", "typ": "JWT", "crit": ["exp"]})),
    ("duplicate-payload-keys", lambda key, uid, good: forge(
        key, f'{{"sub":"{uid + 1}","sub":"{uid}","exp":{int(time.time()) + 600},"jti":"j"}}')),
    ("duplicate-header-keys", lambda key, uid, good: forge(key, claims(uid), '{"alg":"none","alg":"HS256"}')),
    ("exp-string", lambda key, uid, good: forge(key, claims(uid, exp=str(int(time.time()) + 600)))),
    ("exp-missing", lambda key, uid, good: forge(key, claims(uid, exp=...))),
    ("nbf-in-a-minute", lambda key, uid, good: forge(key, claims(uid, nbf=int(time.time()) + 60))),
    ("nbf-in-a-minute-pyjwt", lambda key, uid, good: jwt.encode(claims(uid, nbf=int(time.time()) + 60), key,
                                                               algorithm="HS256")),
    ("nbf-string", lambda key, uid, good: forge(key, claims(uid, nbf="0"))),
    ("exp-null", lambda key, uid, good: forge(key, claims(uid, exp=None))),
    ("exp-true", lambda key, uid, good: forge(key, claims(uid, exp=True))),
    ("exp-NaN", lambda key, uid, good: forge(key, f'{{"sub":"{uid}","exp":NaN,"jti":"j"}}')),
    ("exp-infinite", lambda key, uid, good: forge(key, f'{{"sub":"{uid}","exp":1e400,"jti":"j"}}')),
    ("exp-past-2-to-the-63", lambda key, uid, good: forge(key, claims(uid, exp=2**63))),  # logout was a 500
    ("sub-missing", lambda key, uid, good: forge(key, claims(uid, sub=...))),
    ("sub-number", lambda key, uid, good: forge(key, claims(uid, sub=uid))),
    ("jti-missing", lambda key, uid, good: forge(key, claims(uid, jti=...))),
    # Signed with the key, so only from someone who has it: still a 401, never a 500 or Python's words.
    ("jti-lone-surrogate", lambda key, uid, good: forge(
        key, f'{{"sub":"{uid}","exp":{int(time.time()) + 600},"jti":"\\ud800"}}')),
    ("jti-empty", lambda key, uid, good: forge(key, claims(uid, jti=""))),
    ("sub-of-5000-digits", lambda key, uid, good: forge(key, claims(uid, sub="1" * 5000))),
    ("payload-not-an-object", lambda key, uid, good: forge(key, "[1, 2]")),
    ("header-not-an-object", lambda key, uid, good: forge(key, claims(uid), '"HS256"')),
    ("header-deeply-nested", lambda key, uid, good: forge(key, claims(uid), "[" * 3000 + "]" * 3000)),
    ("over-8-KB", lambda key, uid, good: sized_token(key, uid, 8193)),
    ("non-ascii", lambda key, uid, good: good[:-1] + "é"),
    ("nul", lambda key, uid, good: good + "\x00"),
]
# Well-formed tokens that read_token may accept, but that name no user the API can find.
NO_USER_TOKENS = [
    ("sub-not-an-id", lambda key, uid, good: forge(key, claims(uid, sub="ada"))),
    ("sub-negative", lambda key, uid, good: forge(key, claims(uid, sub="-1"))),
    ("sub-past-64-bits", lambda key, uid, good: forge(key, claims(uid, sub="99999999999999999999"))),
    ("sub-of-nobody", lambda key, uid, good: forge(key, claims(uid, sub="987654"))),
]


def test_a_request_without_a_token_is_401_asking_for_one(client):
    for response in (client.get(ME), client.get(ME, headers={"Authorization": ""})):
        assert_unauthorized(response)
        assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("authorization", [
    "Bearer", "Bearer ", "Basic YWRhOmNvcnJlY3QgaG9yc2U=", "Token {good}", "{good}", "Bearer{good}",
], ids=["bearer-alone", "bearer-space", "basic", "other-scheme", "no-scheme", "no-space"])
def test_a_token_in_the_wrong_scheme_is_401(client, authorization):
    user, _ = signed_in_user(client)
    good = token_for(client, user["email"])
    assert_unauthorized(client.get(ME, headers={"Authorization": authorization.format(good=good)}))


@pytest.mark.parametrize("make_token", [case for _, case in HOSTILE_TOKENS + NO_USER_TOKENS],
                         ids=[name for name, _ in HOSTILE_TOKENS + NO_USER_TOKENS])
def test_a_bad_token_is_401_with_www_authenticate(client, make_token):
    user, headers = signed_in_user(client)
    good = headers["Authorization"].removeprefix("Bearer ")
    token = make_token(signing_key(client), user["id"], good)
    assert token != good
    response = client.get(ME, headers={"Authorization": b"Bearer " + token.encode()})
    assert_unauthorized(response)
    assert response.headers["cache-control"] == "no-store"
    # The same token is refused everywhere a token is read.
    assert_unauthorized(client.get(f"{USERS}/{user['id']}", headers={"Authorization": b"Bearer " + token.encode()}))


@pytest.mark.parametrize("make_token", [case for _, case in HOSTILE_TOKENS],
                         ids=[name for name, _ in HOSTILE_TOKENS])
def test_read_token_refuses_a_bad_token_with_invalid_token(make_token):
    key = b"k" * 64
    good, _ = auth.make_token(7, key, 600)
    assert auth.read_token(good, key)["sub"] == "7"
    with pytest.raises(auth.InvalidToken):
        auth.read_token(make_token(key, 7, good), key)


@pytest.mark.parametrize("value", [
    None, 0, 1.5, True, b"a.b.c", bytearray(b"a.b.c"), ["a", "b", "c"], {"a": 1}, object(),
    "", ".", "..", "...", "a.b.c", "é.é.é", "\udcff", "\x00", "x" * 100_000, "." * 9000,
    "e30.e30.", "e30.e30.e30", "W10.W10.", "bnVsbA.bnVsbA.", "_w.e30.", "e30.e30.!!!", "=.=.=",
    "eyJhbGciOiJIUzI1NiJ9." + "A" * 8000 + ".x", b64url(b"[" * 6000) + ".e30.e30",
    b64url(b'{"alg":"HS256"}') + "." + b64url(b"\xff\xfe") + ".e30",
], ids=lambda value: repr(value)[:30])
def test_read_token_never_raises_anything_but_invalid_token(value):
    with pytest.raises(auth.InvalidToken):
        auth.read_token(value, b"k" * 64)


def test_read_token_allows_30_seconds_of_leeway_and_no_more():
    key = b"k" * 64
    token, made = auth.make_token(7, key, 60)
    assert auth.read_token(token, key, now=made["exp"] + 29)["sub"] == "7"
    with pytest.raises(auth.InvalidToken):
        auth.read_token(token, key, now=made["exp"] + 31)


def test_a_token_with_nbf_is_accepted_from_30_seconds_before_it():
    key, now = b"k" * 64, time.time()
    token = jwt.encode(claims(7, nbf=int(now) + 60), key, algorithm="HS256")
    assert auth.read_token(token, key, now=now + 31)["sub"] == "7"
    assert auth.read_token(token, key, now=now + 300)["sub"] == "7"
    with pytest.raises(auth.InvalidToken, match="not valid yet"):
        auth.read_token(token, key, now=now + 29)


def test_a_token_expired_within_the_leeway_is_still_accepted(client):
    user, _ = signed_in_user(client)
    token = forge(signing_key(client), claims(user["id"], exp=int(time.time()) - 20))
    assert client.get(ME, headers=bearer(token)).json() == user


def test_a_token_of_8_kb_is_accepted(client):
    user, _ = signed_in_user(client)
    token = sized_token(signing_key(client), user["id"], 8192)
    assert client.get(ME, headers=bearer(token)).json() == user


def test_the_bearer_scheme_is_case_insensitive(client):
    user, headers = signed_in_user(client)
    token = headers["Authorization"].removeprefix("Bearer ")
    assert client.get(ME, headers={"Authorization": f"bearer {token}"}).json() == user


def test_a_token_made_here_verifies_under_pyjwt(client):
    user = register(client)
    token = token_for(client, user["email"])
    decoded = jwt.decode(token, signing_key(client), algorithms=["HS256"], options={"require": ["exp", "sub", "jti"]})
    assert decoded["sub"] == str(user["id"])
    assert isinstance(decoded["jti"], str) and decoded["jti"]
    assert decoded["exp"] - decoded["iat"] == 3600
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_a_pyjwt_token_with_sub_exp_and_jti_is_accepted(client):
    user = register(client)
    key = signing_key(client)
    token = jwt.encode({"sub": str(user["id"]), "exp": int(time.time()) + 60, "jti": uuid.uuid4().hex},
                       key, algorithm="HS256")
    assert client.get(ME, headers=bearer(token)).json() == user
    assert auth.read_token(token, key)["sub"] == str(user["id"])


def test_logout_answers_204_and_that_token_is_refused_from_then_on(client):
    user, headers = signed_in_user(client)
    other_headers = bearer(token_for(client, user["email"]))
    response = client.post(LOGOUT, headers=headers)
    assert response.status_code == 204
    assert response.content == b""
    assert response.headers["cache-control"] == "no-store"
    assert_unauthorized(client.get(ME, headers=headers))
    assert_unauthorized(client.post(LOGOUT, headers=headers))
    # Only that token: another token of the same user still works.
    assert client.get(ME, headers=other_headers).json() == user


def test_a_logged_out_token_stays_refused_after_a_restart(make_app):
    with TestClient(make_app()) as client:
        user, headers = signed_in_user(client)
        assert client.post(LOGOUT, headers=headers).status_code == 204
    with TestClient(make_app()) as client:
        assert_unauthorized(client.get(ME, headers=headers))


def test_logout_needs_a_token(client):
    assert_unauthorized(client.post(LOGOUT))
    assert_unauthorized(client.post(LOGOUT, headers=bearer("garbage")))


def test_a_token_from_an_app_with_another_secret_key_is_refused(make_app):
    with TestClient(make_app(secret_key="a" * 32)) as first, TestClient(make_app(secret_key="b" * 32)) as second:
        user = register(first)
        token = token_for(first, user["email"])
        assert first.get(ME, headers=bearer(token)).status_code == 200
        assert_unauthorized(second.get(ME, headers=bearer(token)))
        assert second.get(ME, headers=bearer(token_for(second, user["email"]))).json() == user


def test_a_configured_secret_key_signs_the_tokens(make_app):
    secret = "a configured secret key of 32+ bytes"
    with TestClient(make_app(secret_key=secret)) as client:
        user = register(client)
        token = token_for(client, user["email"])
    assert jwt.decode(token, secret.encode(), algorithms=["HS256"])["sub"] == str(user["id"])


def test_token_ttl_sets_the_tokens_lifetime(make_app):
    with TestClient(make_app(token_ttl=120)) as client:
        user = register(client)
        response = client.post(TOKEN, json={"email": user["email"], "password": PASSWORD})
        assert response.json()["expires_in"] == 120
        decoded = jwt.decode(response.json()["access_token"], signing_key(client), algorithms=["HS256"])
    assert decoded["exp"] - decoded["iat"] == 120
    assert abs(decoded["exp"] - (time.time() + 120)) < 5


# == Users ========================================================================================


def test_a_user_sees_itself_at_me_and_at_its_id(client):
    user, headers = signed_in_user(client)
    for path in (ME, f"{USERS}/{user['id']}"):
        response = client.get(path, headers=headers)
        assert response.status_code == 200
        assert response.json() == user
        assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("path", [ME, f"{USERS}/1", f"{USERS}/99999999999999999999", USERS])
def test_reading_users_without_a_token_is_401(client, path):
    register(client)
    assert_unauthorized(client.get(path))


@pytest.mark.parametrize("target", ["existing", "missing", "zero", "past-64-bits"])
def test_a_user_gets_403_for_any_other_id_existing_or_not(client, target):
    other = register(client)
    _, headers = signed_in_user(client)
    user_id = {"existing": other["id"], "missing": 999999, "zero": 0, "past-64-bits": 99999999999999999999}[target]
    response = client.get(f"{USERS}/{user_id}", headers=headers)
    body = assert_problem(response, 403)
    # The same answer whether or not the id exists, so ids cannot be probed.
    assert body == client.get(f"{USERS}/{other['id']}", headers=headers).json()
    assert response.headers["cache-control"] == "no-store"


def test_an_admin_sees_anyone_and_gets_404_for_a_missing_id(client):
    other = register(client)
    admin, headers = signed_in_user(client)
    make_admin(client, admin["email"])
    assert client.get(f"{USERS}/{other['id']}", headers=headers).json() == other
    assert client.get(ME, headers=headers).json()["role"] == "admin"
    for user_id in (999999, 0, 99999999999999999999):
        assert_problem(client.get(f"{USERS}/{user_id}", headers=headers), 404)


def test_a_promotion_counts_at_once_for_a_token_issued_before_it(client):
    other = register(client)
    user, headers = signed_in_user(client)
    assert_problem(client.get(f"{USERS}/{other['id']}", headers=headers), 403)
    assert_problem(client.get(USERS, headers=headers), 403)
    make_admin(client, user["email"])
    assert client.get(f"{USERS}/{other['id']}", headers=headers).json() == other
    assert client.get(USERS, headers=headers).status_code == 200


# == Listing users ================================================================================


def admin_with_users(client: TestClient, count: int) -> tuple[list[dict], dict[str, str]]:
    """An admin and `count - 1` other users, all of them in id order; and the admin's headers."""
    admin, headers = signed_in_user(client)
    make_admin(client, admin["email"])
    users = [{**admin, "role": "admin"}] + [register(client) for _ in range(count - 1)]
    return users, headers


def test_listing_users_is_for_admins_only(client):
    assert_unauthorized(client.get(USERS))
    _, headers = signed_in_user(client)
    response = client.get(USERS, headers=headers)
    assert_problem(response, 403)
    assert response.headers["cache-control"] == "no-store"


def test_an_admin_lists_users_twenty_to_a_page_by_default(client):
    users, headers = admin_with_users(client, 21)
    response = client.get(USERS, headers=headers)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["items"] == users[:20]
    assert body["next"] and "limit=20" in body["next"]
    assert response.headers["link"] == f'<{body["next"]}>; rel="next"'
    last = client.get(body["next"], headers=headers).json()
    assert last == {"items": users[20:], "next": None}


@pytest.mark.parametrize("sort, limit, pages", [
    ("id", 2, 3), ("-id", 2, 3), ("id", 4, 2), ("-id", 5, 2), ("id", 6, 1), ("-id", 1, 6), (None, 100, 1),
])
def test_a_walk_through_the_users_sees_each_once_in_order(client, sort, limit, pages):
    users, headers = admin_with_users(client, 6)
    expected = [user["id"] for user in (users[::-1] if sort == "-id" else users)]
    url = f"{USERS}?limit={limit}" + (f"&sort={sort}" if sort else "")
    seen, count = [], 0
    while url:
        response = client.get(url, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        seen += [user["id"] for user in body["items"]]
        count += 1
        if body["next"]:
            assert response.headers["link"] == f'<{body["next"]}>; rel="next"'
            assert f"limit={limit}" in body["next"] and (not sort or f"sort={sort}" in body["next"].replace("%2D", "-"))
        else:
            assert "link" not in response.headers
        url = body["next"]
    assert seen == expected
    # `next` is null as soon as no user is left, also when the count is a multiple of the limit.
    assert count == pages


@pytest.mark.parametrize("query, parameter, detail", [
    ("limit=0", "limit", "Expected `int` >= 1"),
    ("limit=101", "limit", "Expected `int` <= 100"),
    ("limit=-1", "limit", "Expected `int` >= 1"),
    ("limit=abc", "limit", "Expected `int`, got `str`"),
    ("limit=1.5", "limit", "Expected `int`, got `str`"),
    ("limit=1&limit=2", "limit", "Give this parameter once."),
    ("sort=name", "sort", "Invalid enum value 'name'"),
    ("sort=title", "sort", "Invalid enum value 'title'"),
    ("sort=id&sort=-id", "sort", "Give this parameter once."),
    ("foo=1", "foo", "Object contains unknown field `foo`"),
    ("q=ada", "q", "Object contains unknown field `q`"),
    ("cursor=garbage", "cursor", "This cursor is not one this API made; use `next` as given."),
    ("cursor=", "cursor", "This cursor is not one this API made; use `next` as given."),
    ("cursor=%FF%FE", "cursor", "This cursor is not one this API made; use `next` as given."),
])
def test_a_bad_user_list_query_is_400_naming_the_parameter(client, query, parameter, detail):
    _, headers = admin_with_users(client, 1)
    assert_bad_parameter(client.get(f"{USERS}?{query}", headers=headers), parameter, detail)


def test_a_user_list_cursor_only_works_with_its_own_sort(client):
    _, headers = admin_with_users(client, 3)
    next_url = client.get(f"{USERS}?limit=1", headers=headers).json()["next"]
    cursor = re.search(r"cursor=([^&]+)", next_url).group(1)
    assert client.get(f"{USERS}?limit=1&cursor={cursor}", headers=headers).status_code == 200
    assert client.get(f"{USERS}?limit=2&cursor={cursor}", headers=headers).status_code == 200
    response = client.get(f"{USERS}?limit=1&sort=-id&cursor={cursor}", headers=headers)
    assert_bad_parameter(response, "cursor", "This cursor belongs to another list, sort or filters.")
    tampered = cursor[:-2] + ("AA" if cursor[-2:] != "AA" else "BB")
    assert_bad_parameter(client.get(f"{USERS}?limit=1&cursor={tampered}", headers=headers), "cursor",
                         "This cursor is not one this API made; use `next` as given.")


# == Errors =======================================================================================


@pytest.mark.parametrize("path", ["/nope", "/api/v1", "/api/v1/users/ada", "/api/v1/books/abc",
                                  "/api/v2/users", "/api/v1/users/me/extra"])
def test_an_unknown_route_is_a_404_problem(plain_client, path):
    response = plain_client.get(path)
    assert_problem(response, 404)
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("method, path, allowed", [
    ("DELETE", ME, {"GET"}),
    ("POST", ME, {"GET"}),
    ("PUT", f"{USERS}/1", {"GET"}),
    ("PATCH", USERS, {"GET", "POST"}),
    ("DELETE", USERS, {"GET", "POST"}),
    ("GET", TOKEN, {"POST"}),
    ("GET", LOGOUT, {"POST"}),
    ("PUT", "/api/v1/books", {"GET", "POST"}),
    ("POST", "/api/v1/books/1", {"GET", "PUT", "PATCH", "DELETE"}),
    ("POST", "/healthz", {"GET"}),
    ("DELETE", "/readyz", {"GET"}),
])
def test_a_method_not_allowed_is_405_listing_every_method_of_the_path(plain_client, method, path, allowed):
    response = plain_client.request(method, path)
    assert_problem(response, 405)
    listed = {name.strip() for name in response.headers["allow"].split(",")}
    assert listed - {"HEAD"} == allowed, response.headers["allow"]


VALID_BOOK = '"title": "Clean Code", "author": "Robert C. Martin"'
VALID_USER = '"email": "ada@example.com", "name": "Ada", "password": "correct horse"'

HOSTILE_BODIES = [
    # (path, body, pointer, detail); the detail is the exact one for the first bad field.
    (USERS, b'{"email": "ada@example.com", "name": "\xff\xfe"}', "#", "invalid UTF-8"),
    ("/api/v1/books", b'{"title": "Clean \xc3\x28"}', "#", "invalid UTF-8"),
    (USERS, b"[" * 1000 + b"]" * 1000, "#", "Expected `object`, got `array`"),
    (USERS, b'{"email": ' + b"[" * 1000 + b"]" * 1000 + b"}", "#/email", "Expected `str`, got `array`"),
    ("/api/v1/books", b'{"title": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001, "#/title", "Expected `str`, got `object`"),
    (USERS, ("[{" + VALID_USER + "}]").encode(), "#", "Expected `object`, got `array`"),
    ("/api/v1/books", ("[{" + VALID_BOOK + "}]").encode(), "#", "Expected `object`, got `array`"),
    (USERS, ("{" + VALID_USER + "} x").encode(), "#", "JSON is malformed: trailing characters (byte 74)"),
    ("/api/v1/books", ("{" + VALID_BOOK + "}{}").encode(), "#", "JSON is malformed: trailing characters (byte 54)"),
    (USERS, b'{"email": "ada@example.com", "name": "A\\u0000da", "password": "correct horse"}',
     "#/name", "Expected a string without NUL characters"),
    (USERS, b'{"email": "a\\u0000da@example.com", "name": "Ada", "password": "correct horse"}',
     "#/email", "Expected a string without NUL characters"),
    (TOKEN, b'{"email": "a\\u0000da@example.com", "password": "correct horse"}',
     "#/email", "Expected a string without NUL characters"),
    ("/api/v1/books", ('{"title": "Clean\\u0000Code", "author": "Robert C. Martin"}').encode(),
     "#/title", "Expected a string without NUL characters"),
    (USERS, b'{"email": "ada@example.com", "name": "\\ud800", "password": "correct horse"}',
     "#", "JSON is malformed: unexpected end of escaped utf-16 surrogate pair (byte 44)"),
    ("/api/v1/books", ("{" + VALID_BOOK + ', "year": 1e400}').encode(), "#/year", "Number out of range"),
    ("/api/v1/books", ("{" + VALID_BOOK + ', "year": -1e400}').encode(), "#/year", "Number out of range"),
    ("/api/v1/books", ("{" + VALID_BOOK + f', "year": {10**30}}}').encode(), "#/year", "Expected `int` <= 2100"),
    ("/api/v1/books", ("{" + VALID_BOOK + f', "pages": {10**30}}}').encode(), "#/pages", "Expected `int` <= 100000"),
    ("/api/v1/books", ("{" + VALID_BOOK + f', "pages": -{10**30}}}').encode(), "#/pages", "Expected `int` >= 1"),
    ("/api/v1/books", ("{" + VALID_BOOK + ', "year": 1e30}').encode(), "#/year", "Expected `int | null`, got `float`"),
    ("/api/v1/books", ("{" + VALID_BOOK + ', "year": NaN}').encode(), "#",
     "JSON is malformed: invalid character (byte 62)"),
]


@pytest.mark.parametrize("path, content, pointer, detail", HOSTILE_BODIES,
                         ids=[f"{i}-{path.rsplit('/', 1)[1]}" for i, (path, *_rest) in enumerate(HOSTILE_BODIES)])
def test_hostile_input_is_400_never_500(client, path, content, pointer, detail):
    _, headers = signed_in_user(client)
    response = client.post(path, content=content, headers={**headers, **JSON_HEADERS})
    assert_bad_field(response, pointer, detail)


def test_a_body_over_the_limit_is_413(make_app):
    with TestClient(make_app(max_body=100)) as client:
        _, headers = signed_in_user(client, email="a@b.co")  # these bodies fit in 100 bytes
        big = json.dumps(user_body(name="x" * 200))
        for response in (
            client.post(USERS, content=big, headers=JSON_HEADERS),
            # 413 comes before 415 and 401.
            client.post(USERS, content=big, headers={"Content-Type": "text/plain"}),
            client.post("/api/v1/books", content=big, headers={"Content-Type": "text/plain"}),
            client.post("/api/v1/books", content=big, headers={**JSON_HEADERS, **headers}),
        ):
            assert_problem(response, 413, "100")
            assert response.headers["x-content-type-options"] == "nosniff"


def test_a_chunked_body_over_the_limit_is_413_too(make_app):
    with TestClient(make_app(max_body=100)) as client:
        def chunks() -> Iterator[bytes]:
            yield b'{"email": "ada@example.com", '
            yield b'"name": "' + b"x" * 200 + b'", '
            yield b'"password": "correct horse"}'

        response = client.post(USERS, content=chunks(), headers=JSON_HEADERS)
        assert "content-length" not in response.request.headers
        assert_problem(response, 413, "100")


def test_a_body_over_the_limit_sent_while_a_file_streams_does_not_cut_the_file_short(make_app):
    """The limit protects what a handler reads; a file being streamed also reads on, to notice a
    client that leaves, and what it reads then is thrown away. A large body sent with a GET of a
    docs asset must not abort the answer half-sent (a 200 in the log, a cut file in the browser)."""
    app = make_app(max_body=100)
    asset = Path(openapi.openapi_ui_bundles.swagger_ui.static_path) / "swagger-ui.css"
    chunks, messages, finished = 30, [], asyncio.Event()

    async def receive() -> dict:
        nonlocal chunks
        if chunks:
            chunks -= 1
            return {"type": "http.request", "body": b"x" * 10, "more_body": chunks > 0}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            finished.set()

    path = "/docs/assets/swagger-ui.css"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {}}
    asyncio.run(app(scope, receive, send))
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 200
    assert b"".join(message.get("body", b"") for message in messages[1:]) == asset.read_bytes()


def test_a_body_at_the_limit_is_read(make_app):
    with TestClient(make_app(max_body=100)) as client:
        body = json.dumps({"email": "ada@example.com", "name": "Ada", "password": "p"})
        body = json.dumps({"email": "ada@example.com", "name": "Ada", "password": "p" * (100 - len(body) + 1)})
        assert len(body.encode()) == 100
        response = client.post(USERS, content=body, headers=JSON_HEADERS)
        assert response.status_code == 201, response.text


def test_an_endless_body_is_refused_without_reading_it_all(make_app):
    app = make_app(max_body=100)
    sent, messages = 0, []

    async def receive() -> dict:
        nonlocal sent
        sent += 1
        if sent > 10_000:  # a safety net: the app should have stopped long before
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": b"x" * 10, "more_body": True}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": USERS, "raw_path": USERS.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {}}
    asyncio.run(app(scope, receive, send))
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 413
    assert sent <= 20, f"read {sent} chunks of a body refused after 100 bytes"


def test_an_unexpected_failure_is_a_500_without_internals(client, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(client.app.state.quire.store, "create_user", fail)
    response = client.post(USERS, json=user_body(), headers={"X-Request-ID": "trace-500"})
    body = assert_problem(response, 500)
    assert body["request_id"] == "trace-500" == response.headers["x-request-id"]
    assert response.headers["x-content-type-options"] == "nosniff"
    for secret in ("secret internals", "Traceback", "RuntimeError", "store.py", PASSWORD):
        assert secret not in response.text
    # Without a request id of the client's, the body names the one the server made.
    response = client.post(USERS, json=user_body())
    assert assert_problem(response, 500)["request_id"] == response.headers["x-request-id"]
    # And the app is still fine afterwards.
    monkeypatch.undo()
    assert client.post(USERS, json=user_body()).status_code == 201


# == Logging ======================================================================================

LOGGING_SNIPPET = """
import sys
import api, auth
from starlette.testclient import TestClient

auth.SCRYPT_N, auth.SCRYPT_P = 2**10, 1
app = api.create_app(config=api.Config(environ={}), database_url=sys.argv[1], secret_key=sys.argv[2],
                     rate_limit=0)
password = "a very secret password"

def fail(*args, **kwargs):
    raise RuntimeError("secret internals")

with TestClient(app) as client:
    client.post("/api/v1/users", json={"email": "ada@example.com", "name": "Ada", "password": password},
                headers={"X-Request-ID": "req-1"})
    token = client.post("/api/v1/auth/token", json={"email": "ada@example.com", "password": password},
                        headers={"X-Request-ID": "req-2"}).json()["access_token"]
    authorization = {"Authorization": "Bearer " + token}
    client.get("/api/v1/users/me", headers={**authorization, "X-Request-ID": "req-3"})
    client.get("/no/such/route?token=" + token, headers={"X-Request-ID": "req-4"})
    client.post("/api/v1/auth/logout", headers={**authorization, "X-Request-ID": "req-5"})
    app.state.quire.store.create_user = fail
    client.post("/api/v1/users", json={"email": "bob@example.com", "name": "Bob", "password": password},
                headers={"X-Request-ID": "req-6"})
    print(token)
"""


def test_each_request_writes_one_json_line_to_stderr_without_secrets(database_url):
    secret_key = "the secret key, at least 32 bytes long"
    started = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    result = run_python(LOGGING_SNIPPET, database_url, secret_key)
    ended = datetime.datetime.now(datetime.UTC)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2, "only the snippet's own output is on stdout: " + result.stdout
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    requests = [line for line in lines if "status" in line]
    assert [line["request_id"] for line in requests] == [f"req-{n}" for n in range(1, 7)]
    expected = [("POST", "/api/v1/users", 201), ("POST", "/api/v1/auth/token", 200),
                ("GET", "/api/v1/users/me", 200), ("GET", "/no/such/route", 404),
                ("POST", "/api/v1/auth/logout", 204), ("POST", "/api/v1/users", 500)]
    assert [(line["method"], line["path"], line["status"]) for line in requests] == expected
    for line in requests:
        assert {"time", "request_id", "method", "path", "status", "duration_ms"} <= set(line)
        assert RFC3339.fullmatch(line["time"]), line["time"]
        assert started <= datetime.datetime.fromisoformat(line["time"].replace("Z", "+00:00")) <= ended
        assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0
    # The unexpected failure is logged, with its request id, so that the 500's body can be traced.
    assert any(line.get("request_id") == "req-6" and "secret internals" in json.dumps(line) for line in lines)
    for secret in ("a very secret password", token, token.split(".")[2], secret_key):
        assert secret not in result.stderr


def test_log_lines_of_one_turn_of_the_loop_go_out_in_one_write_in_their_order():
    """quire's own handler writes the lines a turn of the event loop made at the start of the next
    turn, in one write; without a loop, at once; a record logged the usual way goes behind them."""
    writes: list[str] = []

    class Stream:
        def write(self, text: str) -> None:
            writes.append(text)

        def flush(self) -> None:
            pass

    handler = web.JSONLines()
    handler.setStream(Stream())

    async def one_turn() -> None:
        for n in range(3):
            handler.write_line(f'{{"n":{n}}}')
        handler.emit(logging.makeLogRecord({"msg": '{"n":3}'}))
        assert writes == []  # not yet: the turn is not over
        await asyncio.sleep(0)  # the next turn
        assert writes == ['{"n":0}\n{"n":1}\n{"n":2}\n{"n":3}\n']
        handler.write_line('{"n":4}')  # a new turn, a new write
        await asyncio.sleep(0)
        assert writes[1:] == ['{"n":4}\n']

    asyncio.run(one_turn())
    handler.write_line('{"n":5}')
    assert writes[2:] == ['{"n":5}\n']  # no loop running here: written at once


def test_a_log_write_that_fails_is_reported_as_logging_reports_one_and_raises_into_nobody(capsys):
    """A full disk or a closed pipe must not fail the request that logged, nor lose the handler:
    the failure goes to stderr the way `logging` reports a handler's error, and later lines go out."""
    writes: list[str] = []

    class Stream:
        broken = True

        def write(self, text: str) -> None:
            if self.broken:
                raise BrokenPipeError(32, "Broken pipe")
            writes.append(text)

        def flush(self) -> None:
            pass

    stream = Stream()
    handler = web.JSONLines()
    handler.setStream(stream)
    handler.write_line('{"n":0}')  # no loop: written at once, and fails

    async def on_a_loop() -> None:
        handler.write_line('{"n":1}')
        await asyncio.sleep(0)  # the failing write, in a callback of the loop's
        stream.broken = False
        handler.write_line('{"n":2}')
        await asyncio.sleep(0)

    asyncio.run(on_a_loop())
    assert writes == ['{"n":2}\n']
    assert capsys.readouterr().err.count("--- Logging error ---") == 2
    assert handler.pending == []


def test_log_times_are_utc_to_the_millisecond_across_seconds(monkeypatch):
    """The clock formats the part up to the second once a second: each line still gets its own time."""
    clock = web.UTCClock()
    moments = [1764700000.0, 1764700000.9994, 1764700001.0004, 1764700001.5, 1764703599.999, 1764703600.25]
    for moment in moments + moments[::-1]:  # and back: a clock set back must not keep a later prefix
        monkeypatch.setattr(web.time, "time", lambda: moment)
        expected = datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat(timespec="milliseconds")
        assert clock.now() == expected.replace("+00:00", "Z"), moment


# == Health =======================================================================================


def test_healthz_and_readyz_answer_200(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert response.headers["content-type"] == "application/json"
    assert client.get("/readyz").status_code == 200


def test_with_the_database_unreachable_healthz_is_200_and_the_rest_503(make_app):
    with TestClient(make_app(database_url="postgresql://postgres@127.0.0.1:1/nope")) as client:
        response = client.get("/healthz")
        assert response.status_code == 200 and response.json() == {"status": "ok"}
        for response in (client.get("/readyz"), client.get("/api/v1/books"),
                         client.post(USERS, json=user_body()),
                         client.post(TOKEN, json={"email": "ada@example.com", "password": PASSWORD})):
            assert_problem(response, 503)
            assert int(response.headers["retry-after"]) > 0
            assert response.headers["x-content-type-options"] == "nosniff"


def test_the_app_serves_as_soon_as_the_database_can_be_reached(tmp_path):
    # A SQLite file in a folder that does not exist yet cannot be opened: the database is
    # "down" until the folder appears.
    folder = tmp_path / "later"
    app = api.create_app(config=api.Config(environ={}), database_url=f"sqlite:///{folder}/quire.db", rate_limit=0)
    with TestClient(app) as client:
        assert_problem(client.get("/readyz"), 503)
        assert client.get("/healthz").status_code == 200
        folder.mkdir()
        deadline = time.monotonic() + 10
        while (response := client.get("/readyz")).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert response.status_code == 200, response.text
        register(client)


# == Migrations and the secret key ================================================================


def applied_migrations(client: TestClient) -> list[int]:
    store = client.app.state.quire.store
    rows = client.portal.call(store.query, "SELECT version FROM schema_migrations ORDER BY version")
    return [row["version"] for row in rows]


def test_starting_twice_applies_each_migration_once(make_app):
    with TestClient(make_app()) as client:
        user = register(client)
        assert applied_migrations(client) == list(range(1, len(storage.MIGRATIONS) + 1))
    with TestClient(make_app()) as client:
        assert applied_migrations(client) == list(range(1, len(storage.MIGRATIONS) + 1))
        assert client.get(ME, headers=bearer(token_for(client, user["email"]))).json() == user


CONNECT_SNIPPET = """
import asyncio, sys, time
import api

app = api.create_app(config=api.Config(environ={}), database_url=sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together

async def main():
    store = app.state.quire.store
    await store.connect()
    print(await store.secret_key())
    await store.disconnect()

asyncio.run(main())
"""


def test_several_workers_starting_at_once_on_a_fresh_database_all_succeed(make_app, database_url):
    start = str(time.time() + 2)
    workers = [subprocess.Popen([sys.executable, "-c", CONNECT_SNIPPET, database_url, start], cwd=HERE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [(worker.wait(timeout=60), *worker.communicate()) for worker in workers]
    for returncode, stdout, stderr in results:
        assert returncode == 0, stderr
    keys = {stdout.strip() for _, stdout, _ in results}
    assert len(keys) == 1, "every worker on a database shares one key"
    with TestClient(make_app()) as client:
        assert applied_migrations(client) == list(range(1, len(storage.MIGRATIONS) + 1))
        assert signing_key(client) == keys.pop().encode()


def test_without_a_configured_key_one_is_made_once_and_kept_in_the_database(make_app, tmp_path):
    with TestClient(make_app()) as client:
        user = register(client)
        token = token_for(client, user["email"])
        key = signing_key(client)
        rows = client.portal.call(client.app.state.quire.store.query, "SELECT name, value FROM settings")
    assert len(key) >= 32
    assert {"name": "secret_key", "value": key.decode()} in rows
    # A restart (or another worker) on the same database accepts the token.
    with TestClient(make_app()) as client:
        assert signing_key(client) == key
        assert client.get(ME, headers=bearer(token)).json() == user
    # Another database has a key of its own: nothing is hard-coded.
    with TestClient(make_app(database_url=f"sqlite:///{tmp_path / 'other.db'}")) as other:
        assert signing_key(other) != key
        assert_unauthorized(other.get(ME, headers=bearer(token)))


@pytest.mark.parametrize("secret_key", ["short", "x" * 31, "é" * 15])
def test_a_secret_key_under_32_bytes_is_refused(database_url, secret_key):
    with pytest.raises(ValueError, match="32"):
        api.create_app(config=api.Config(environ={}), database_url=database_url, secret_key=secret_key)
    with pytest.raises(ValueError, match="32"):
        api.create_app(config=api.Config(environ={"QUIRE_SECRET_KEY": secret_key}), database_url=database_url)
    assert api.create_app(config=api.Config(environ={}), database_url=database_url, secret_key="x" * 32)


@pytest.mark.parametrize("settings, named", [
    ({"database_url": "mysql://root:hunter2@db/quire"}, "DATABASE_URL"),
    ({"database_url": "quire.db"}, "DATABASE_URL"),
    ({"database_url": "root:hunter2@db/quire"}, "DATABASE_URL"),  # no scheme: none of it is repeated
    ({"cors_origins": "notanorigin"}, "QUIRE_CORS_ORIGINS"),
    ({"cors_origins": "https://app.example.com/"}, "QUIRE_CORS_ORIGINS"),  # a browser's Origin has no path
])
def test_a_database_url_or_cors_origin_quire_cannot_use_stops_the_app_naming_it(settings, named):
    with pytest.raises(ValueError, match=named) as refused:
        api.create_app(config=api.Config(environ={}), **settings)
    assert "hunter2" not in str(refused.value)  # a URL's password is never repeated


# == The command line =============================================================================


def create_admin(database_url: str, email: str, name: str, password: str) -> subprocess.CompletedProcess:
    return run_python(None, "create-admin", email, name, stdin=password + "\n", env={"DATABASE_URL": database_url})


def test_create_admin_makes_an_admin_and_prints_its_id_alone(client, database_url):
    result = create_admin(database_url, "Boss@Example.com", "The Boss", "the boss's password")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"\d+\n", result.stdout), result.stdout
    headers = bearer(token_for(client, "boss@example.com", "the boss's password"))
    me = client.get(ME, headers=headers).json()
    assert me["id"] == int(result.stdout)
    assert (me["email"], me["name"], me["role"]) == ("boss@example.com", "The Boss", "admin")
    assert client.get(USERS, headers=headers).status_code == 200


def test_create_admin_promotes_an_existing_user_and_keeps_its_password(client, database_url):
    user, headers = signed_in_user(client, email="ada@example.com")
    result = create_admin(database_url, "ADA@example.com", "Another Name", "another password")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{user['id']}\n"
    assert client.get(ME, headers=headers).json() == {**user, "role": "admin"}  # at once, same token
    assert token_for(client, "ada@example.com", PASSWORD)
    assert_unauthorized(client.post(TOKEN, json={"email": "ada@example.com", "password": "another password"}))


def test_create_admin_refuses_a_short_password_and_creates_nobody(client, database_url):
    result = create_admin(database_url, "boss@example.com", "Boss", "short")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "password" in result.stderr
    assert_unauthorized(client.post(TOKEN, json={"email": "boss@example.com", "password": "short"}))


# == Embedding ====================================================================================


def test_a_mounted_app_registers_with_a_location_under_its_prefix(make_app):
    parent = Starlette(routes=[Mount("/shop", app=make_app())])
    with TestClient(parent) as client:  # the child's lifespan does not run: it connects when needed
        response = client.post("/shop/api/v1/users", json=user_body(email="ada@example.com"))
        assert response.status_code == 201, response.text
        user = response.json()
        assert response.headers["location"] == f"/shop/api/v1/users/{user['id']}"
        assert response.headers["cache-control"] == "no-store"
        token = client.post("/shop/api/v1/auth/token", json={"email": "ada@example.com", "password": PASSWORD})
        found = client.get(response.headers["location"], headers=bearer(token.json()["access_token"]))
        assert found.status_code == 200 and found.json() == user
        assert found.headers["cache-control"] == "no-store"
        assert client.get("/shop/healthz").json() == {"status": "ok"}


def test_behind_a_server_that_gives_root_path_apart_from_the_path_the_prefix_is_kept(make_app):
    """Some servers (and Starlette's TestClient) report the prefix in `root_path` without putting
    it in `path`; Starlette's router accepts both, and so must the middleware's view of paths and
    the `next` links: no-store on accounts, the strict sign-in limit, the prefix in `next`."""
    with TestClient(make_app(rate_limit=100, auth_rate_limit=2), root_path="/shop") as client:
        response = client.post(USERS, json=user_body(email="ada@example.com"))
        assert response.status_code == 201 and response.headers["cache-control"] == "no-store"
        assert response.headers["location"] == f"/shop{USERS}/{response.json()['id']}"
        credentials = {"email": "ada@example.com", "password": PASSWORD}
        tokens = [client.post(TOKEN, json=credentials) for _ in range(3)]
        assert [token.status_code for token in tokens] == [200, 200, 429]
        assert tokens[0].headers["ratelimit-policy"] == '"general";q=100;w=60, "auth";q=2;w=60'
        headers = bearer(tokens[0].json()["access_token"])
        for n in range(2):
            new_book(client, headers, title=f"Book {n}")
        page = client.get(BOOKS, params={"limit": 1})
        assert page.json()["next"].startswith(f"/shop{BOOKS}?limit=1&cursor=")
        assert client.get(page.json()["next"].removeprefix("/shop")).json()["items"][0]["title"] == "Book 1"


def test_a_mounted_app_whose_first_request_is_a_refresh_connects_for_it(make_app):
    """A refresh starts with a transaction, not a query: it too must connect (and migrate) first."""
    parent = Starlette(routes=[Mount("/shop", app=make_app())])
    with TestClient(parent) as client:
        response = client.post("/shop/api/v1/auth/token", json={"refresh_token": "x" * 43})
        assert_unauthorized(response)
        assert response.json()["detail"] == "This refresh token is unknown, spent, expired or revoked: sign in again."


# == Books ========================================================================================

BOOKS = "/api/v1/books"
CLEAN_CODE = "9780132350884"  # a real ISBN-13, check digit 4
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")

# == Helpers for books ============================================================================


def isbn13(n: int) -> str:
    """A valid ISBN-13 made from `n`: 978, nine digits, then the check digit."""
    body = f"978{n:09d}"
    check = -sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body)) % 10
    return body + str(check)


def book_fields(**changes) -> dict:
    """A valid book body; `changes` override fields, and a value of `...` removes the field."""
    fields = {"title": "Clean Code", "author": "Robert C. Martin", "year": 2008, "pages": 464,
              "isbn": None}
    fields.update(changes)
    return {name: value for name, value in fields.items() if value is not ...}


def new_book(client: TestClient, headers: dict, **changes) -> tuple[dict, str]:
    """Create a book; return it and its ETag."""
    response = client.post(BOOKS, json=book_fields(**changes), headers=headers)
    assert response.status_code == 201, response.text
    return response.json(), response.headers["etag"]


def all_books(client: TestClient) -> list[dict]:
    """Every book, in id order (walking the pages)."""
    books, url = [], f"{BOOKS}?limit=100"
    while url:
        body = client.get(url).json()
        books += body["items"]
        url = body["next"]
    return books


def walk(client: TestClient, url: str) -> list[dict]:
    """Follow `next` from `url` to the last page; each `Link` must equal `next`."""
    seen = []
    while url:
        response = client.get(url)
        assert response.status_code == 200, response.text
        body = response.json()
        seen += body["items"]
        if body["next"]:
            assert response.headers["link"] == f'<{body["next"]}>; rel="next"'
        else:
            assert "link" not in response.headers
        url = body["next"]
    return seen


def send(client: TestClient, method: str, url: str, body=None, *, content_type: str | None = "application/json",
         headers: dict | None = None):
    """A request with a raw JSON body and an explicit Content-Type (None: no Content-Type at all)."""
    headers = dict(headers or {})
    if content_type:
        headers["Content-Type"] = content_type
    content = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return client.request(method, url, content=content, headers=headers)


def current(client: TestClient, book_id: int) -> tuple[dict, str]:
    """The book as it is now, and its ETag."""
    response = client.get(f"{BOOKS}/{book_id}")
    assert response.status_code == 200, response.text
    return response.json(), response.headers["etag"]


# == Creating =====================================================================================


def test_creating_a_book_answers_201_with_its_location_etag_and_the_caller_as_owner(client):
    user, headers = signed_in_user(client)
    response = client.post(BOOKS, json=book_fields(isbn=CLEAN_CODE), headers=headers)

    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    book = response.json()
    assert set(book) == {"id", "title", "author", "year", "pages", "isbn", "price_cents", "stock", "owner_id",
                         "created_at", "updated_at"}  # the shop's two fields: CONTRACT.md, Books
    assert isinstance(book["id"], int) and book["id"] > 0
    assert {key: book[key] for key in ("title", "author", "year", "pages", "isbn", "owner_id")} == {
        "title": "Clean Code", "author": "Robert C. Martin", "year": 2008, "pages": 464,
        "isbn": CLEAN_CODE, "owner_id": user["id"]}
    for stamp in ("created_at", "updated_at"):
        assert RFC3339_UTC.fullmatch(book[stamp]), book[stamp]
        assert datetime.datetime.fromisoformat(book[stamp]).utcoffset() == datetime.timedelta(0)
    assert book["created_at"] == book["updated_at"]
    assert response.headers["location"] == f"{BOOKS}/{book['id']}"
    etag = response.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')

    read = client.get(response.headers["location"])
    assert read.status_code == 200
    assert read.json() == book
    assert read.headers["etag"] == etag


def test_creating_a_book_needs_a_token_and_writes_nothing_without_one(client):
    response = client.post(BOOKS, json=book_fields())
    assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert all_books(client) == []


def test_creating_a_book_with_a_bad_token_is_401(client):
    response = client.post(BOOKS, json=book_fields(), headers=bearer("not.a.token"))
    assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert all_books(client) == []


@pytest.mark.parametrize("sent", ["978-0-13-235088-4", " 978 0 13-235088 4 "])
def test_an_isbn_is_stored_without_its_hyphens_and_spaces(client, sent):
    _, headers = signed_in_user(client)
    book, _ = new_book(client, headers, isbn=sent)
    assert book["isbn"] == CLEAN_CODE
    assert current(client, book["id"])[0]["isbn"] == CLEAN_CODE


@pytest.mark.parametrize("isbn, detail", [
    ("9780132350885", "The ISBN-13's check digit is wrong"),
    ("978013235088", "Expected an ISBN-13: 13 digits, hyphens and spaces allowed"),
    ("978013235088X", "Expected an ISBN-13: 13 digits, hyphens and spaces allowed"),
    ("٩٧٨٠١٣٢٣٥٠٨٨٤", "Expected an ISBN-13: 13 digits, hyphens and spaces allowed"),  # Arabic-Indic digits
])
def test_a_bad_isbn_is_refused_naming_the_field_and_nothing_is_written(client, isbn, detail):
    _, headers = signed_in_user(client)
    response = client.post(BOOKS, json=book_fields(isbn=isbn), headers=headers)
    body = assert_problem(response, 400, detail)
    assert body["errors"][0] == {"pointer": "#/isbn", "detail": detail}
    assert all_books(client) == []


def test_a_taken_isbn_is_a_conflict_on_create_even_when_spelt_differently(client):
    _, headers = signed_in_user(client)
    first, _ = new_book(client, headers, isbn=CLEAN_CODE)
    response = client.post(BOOKS, json=book_fields(title="Copy", isbn="978-0-13-235088-4"), headers=headers)
    body = assert_problem(response, 409, "isbn")
    assert body["errors"][0]["pointer"] == "#/isbn"
    assert all_books(client) == [first]


@pytest.mark.parametrize("method, body", [
    ("PUT", book_fields(title="Other", isbn="978-0-13-235088-4")),
    ("PATCH", {"isbn": CLEAN_CODE}),
])
def test_a_taken_isbn_is_a_conflict_on_put_and_patch_and_changes_nothing(client, method, body):
    _, headers = signed_in_user(client)
    new_book(client, headers, isbn=CLEAN_CODE)
    other, etag = new_book(client, headers, title="Other", isbn=isbn13(1))
    response = send(client, method, f"{BOOKS}/{other['id']}", body, headers=headers)
    problem = assert_problem(response, 409, "isbn")
    assert problem["errors"][0]["pointer"] == "#/isbn"
    assert current(client, other["id"]) == (other, etag)


# == Validation ===================================================================================

MISSING = ...
BAD_BOOKS = [
    # (changes to a valid book, pointer, detail)
    ({"title": MISSING}, "#/title", "Object missing required field `title`"),
    ({"author": MISSING}, "#/author", "Object missing required field `author`"),
    ({"title": ""}, "#/title", "Expected `str` of length >= 1"),
    ({"author": ""}, "#/author", "Expected `str` of length >= 1"),
    ({"title": " \t\n "}, "#/title", "Expected text that is not only whitespace"),
    ({"author": "   "}, "#/author", "Expected text that is not only whitespace"),
    ({"title": "x" * 201}, "#/title", "Expected `str` of length <= 200"),
    ({"author": "é" * 201}, "#/author", "Expected `str` of length <= 200"),
    ({"title": 42}, "#/title", "Expected `str`, got `int`"),
    ({"title": None}, "#/title", "Expected `str`, got `null`"),
    ({"year": "2008"}, "#/year", "Expected `int | null`, got `str`"),
    ({"year": True}, "#/year", "Expected `int | null`, got `bool`"),
    ({"isbn": 9780132350884}, "#/isbn", "Expected `str | null`, got `int`"),
    ({"year": 0}, "#/year", "Expected `int` >= 1"),
    ({"year": 2101}, "#/year", "Expected `int` <= 2100"),
    ({"pages": 0}, "#/pages", "Expected `int` >= 1"),
    ({"pages": 100001}, "#/pages", "Expected `int` <= 100000"),
    ({"subtitle": "A Handbook"}, "#/subtitle", "Object contains unknown field `subtitle`"),
    ({"id": 1}, "#/id", "Object contains unknown field `id`"),
    ({"owner_id": 1}, "#/owner_id", "Object contains unknown field `owner_id`"),
    ({"created_at": "2020-01-01T00:00:00Z"}, "#/created_at", "Object contains unknown field `created_at`"),
    ({"updated_at": "2020-01-01T00:00:00Z"}, "#/updated_at", "Object contains unknown field `updated_at`"),
    ({"version": 7}, "#/version", "Object contains unknown field `version`"),
]


@pytest.mark.parametrize("changes, pointer, detail", BAD_BOOKS, ids=[f"{pointer} {detail}" for _, pointer, detail in BAD_BOOKS])
def test_an_invalid_new_book_is_refused_naming_the_field_and_nothing_is_written(client, changes, pointer, detail):
    _, headers = signed_in_user(client)
    response = client.post(BOOKS, json=book_fields(**changes), headers=headers)
    body = assert_problem(response, 400, detail)
    assert body["detail"] == f"{detail} ({pointer})"
    assert body["errors"][0] == {"pointer": pointer, "detail": detail}
    assert all_books(client) == []


@pytest.mark.parametrize("body, detail", [
    (b"[]", "Expected `object`, got `array`"),
    (b'"Clean Code"', "Expected `object`, got `str`"),
    (b"{", "Input data was truncated"),
])
def test_a_body_that_is_malformed_or_not_an_object_is_refused(client, body, detail):
    _, headers = signed_in_user(client)
    response = send(client, "POST", BOOKS, body, headers=headers)
    problem = assert_problem(response, 400, detail)
    assert problem["errors"][0]["pointer"] == "#"
    assert all_books(client) == []


def test_the_boundary_values_of_every_field_are_accepted(client):
    _, headers = signed_in_user(client)
    for changes in [{"title": "x" * 200, "author": "y" * 200, "year": 1, "pages": 1},
                    {"title": "T", "author": "A", "year": 2100, "pages": 100000},
                    {"title": " padded ", "author": "\tA", "year": None, "pages": None, "isbn": None},
                    {"year": MISSING, "pages": MISSING, "isbn": MISSING}]:
        book, _ = new_book(client, headers, **changes)
        expected = {"year": None, "pages": None, "isbn": None, **book_fields(**changes)}
        assert {name: book[name] for name in expected} == expected  # stored as sent, whitespace included


@pytest.mark.parametrize("patch, pointer, detail", [
    ({"title": None}, "#/title", "Expected `str`, got `null`"),
    ({"author": None}, "#/author", "Expected `str`, got `null`"),
    ({"title": "  "}, "#/title", "Expected text that is not only whitespace"),
    ({"year": 2101}, "#/year", "Expected `int` <= 2100"),
    ({"pages": 0}, "#/pages", "Expected `int` >= 1"),
    ({"isbn": "9780132350885"}, "#/isbn", "The ISBN-13's check digit is wrong"),
    ({"owner_id": 99}, "#/owner_id", "Object contains unknown field `owner_id`"),
    ({"version": 99}, "#/version", "Object contains unknown field `version`"),
])
def test_an_invalid_patch_is_refused_naming_the_field_and_changes_nothing(client, patch, pointer, detail):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    response = client.patch(f"{BOOKS}/{book['id']}", json=patch, headers=headers)
    body = assert_problem(response, 400, detail)
    assert body["errors"][0] == {"pointer": pointer, "detail": detail}
    assert current(client, book["id"]) == (book, etag)


@pytest.mark.parametrize("changes, pointer, detail", [
    ({"author": MISSING}, "#/author", "Object missing required field `author`"),
    ({"title": "x" * 201}, "#/title", "Expected `str` of length <= 200"),
    ({"year": 0}, "#/year", "Expected `int` >= 1"),
    ({"created_at": "2020-01-01T00:00:00Z"}, "#/created_at", "Object contains unknown field `created_at`"),
])
def test_an_invalid_replacement_is_refused_naming_the_field_and_changes_nothing(client, changes, pointer, detail):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    response = client.put(f"{BOOKS}/{book['id']}", json=book_fields(**changes), headers=headers)
    body = assert_problem(response, 400, detail)
    assert body["errors"][0] == {"pointer": pointer, "detail": detail}
    assert current(client, book["id"]) == (book, etag)


# == Reading one book =============================================================================


def test_a_book_is_read_by_anyone_with_a_strong_etag(client):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    response = client.get(f"{BOOKS}/{book['id']}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == book
    assert response.headers["etag"] == etag
    assert re.fullmatch(r'"[^"]+"', etag), etag  # strong: no W/ prefix


@pytest.mark.parametrize("if_none_match", [
    "{tag}", '"a","b", {tag}', "W/{tag}", "*",
])
def test_if_none_match_that_matches_answers_304_without_a_body(client, if_none_match):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    response = client.get(f"{BOOKS}/{book['id']}", headers={"If-None-Match": if_none_match.format(tag=etag)})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag


@pytest.mark.parametrize("if_none_match", ['"nope"', 'W/"nope", "other"'])
def test_if_none_match_with_other_tags_gives_the_book(client, if_none_match):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    response = client.get(f"{BOOKS}/{book['id']}", headers={"If-None-Match": if_none_match})
    assert response.status_code == 200
    assert response.json() == book
    assert response.headers["etag"] == etag


def test_if_none_match_with_a_tag_from_before_a_change_gives_the_new_book(client):
    _, headers = signed_in_user(client)
    book, old_etag = new_book(client, headers)
    client.patch(f"{BOOKS}/{book['id']}", json={"year": 2009}, headers=headers)
    response = client.get(f"{BOOKS}/{book['id']}", headers={"If-None-Match": old_etag})
    assert response.status_code == 200
    assert response.json()["year"] == 2009


@pytest.mark.parametrize("book_id", ["12345", "0", "99999999999999999999"])
def test_reading_a_missing_book_is_404(client, book_id):
    assert_problem(client.get(f"{BOOKS}/{book_id}"), 404, book_id)


@pytest.mark.parametrize("method, book_id", [("PUT", "12345"), ("PATCH", "0"), ("DELETE", "99999999999999999999")])
def test_changing_a_missing_book_is_404(client, method, book_id):
    _, headers = signed_in_user(client)
    assert_problem(send(client, method, f"{BOOKS}/{book_id}", None if method == "DELETE" else book_fields(),
                        headers=headers), 404)


@pytest.mark.parametrize("path", [BOOKS, f"{BOOKS}/1"])
def test_a_presented_token_is_checked_even_on_public_book_reads(client, path):
    _, headers = signed_in_user(client)
    new_book(client, headers)
    response = client.get(path, headers=bearer("not.a.token"))
    assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_deleted_books_id_is_never_given_to_another_book(client):
    _, headers = signed_in_user(client)
    new_book(client, headers, title="First")
    second, _ = new_book(client, headers, title="Second")
    assert client.delete(f"{BOOKS}/{second['id']}", headers=headers).status_code == 204
    third, _ = new_book(client, headers, title="Third")
    assert third["id"] > second["id"]
    assert_problem(client.get(f"{BOOKS}/{second['id']}"), 404)


# == Replacing, patching, deleting ================================================================


def test_put_replaces_every_client_field_and_missing_optional_fields_become_null(client):
    user, headers = signed_in_user(client)
    book, etag = new_book(client, headers, isbn=CLEAN_CODE)
    response = client.put(f"{BOOKS}/{book['id']}", json={"title": "Refactoring", "author": "Martin Fowler"},
                          headers=headers)
    assert response.status_code == 200, response.text
    replaced = response.json()
    assert replaced == {**book, "title": "Refactoring", "author": "Martin Fowler", "year": None, "pages": None,
                        "isbn": None, "updated_at": replaced["updated_at"]}
    assert replaced["owner_id"] == user["id"] and replaced["created_at"] == book["created_at"]
    assert RFC3339_UTC.fullmatch(replaced["updated_at"]) and replaced["updated_at"] >= book["updated_at"]
    assert response.headers["etag"] != etag
    assert current(client, book["id"]) == (replaced, response.headers["etag"])


def test_patch_changes_the_fields_it_names_and_null_clears_an_optional_one(client):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers, isbn=CLEAN_CODE)
    response = client.patch(f"{BOOKS}/{book['id']}", json={"title": "Clean Code, 2nd ed.", "year": None,
                                                             "isbn": "978-0-13-235088-4"}, headers=headers)
    assert response.status_code == 200, response.text
    patched = response.json()
    assert patched == {**book, "title": "Clean Code, 2nd ed.", "year": None, "updated_at": patched["updated_at"]}
    assert response.headers["etag"] != etag
    assert current(client, book["id"]) == (patched, response.headers["etag"])


def test_an_empty_patch_changes_nothing(client):
    _, headers = signed_in_user(client)
    book, _ = new_book(client, headers)
    response = client.patch(f"{BOOKS}/{book['id']}", json={}, headers=headers)
    assert response.status_code == 200, response.text
    unchanged = response.json()
    assert {**unchanged, "updated_at": None} == {**book, "updated_at": None}
    assert current(client, book["id"])[0] == unchanged


@pytest.mark.parametrize("content_type", [
    "application/json", "application/merge-patch+json", "application/merge-patch+json; charset=utf-8"])
def test_patch_accepts_json_and_merge_patch_json(client, content_type):
    _, headers = signed_in_user(client)
    book, _ = new_book(client, headers)
    response = send(client, "PATCH", f"{BOOKS}/{book['id']}", {"pages": 500}, content_type=content_type,
                    headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["pages"] == 500


@pytest.mark.parametrize("method, content_type", [
    ("PATCH", "text/plain"), ("PATCH", None), ("PUT", "application/merge-patch+json"),
    ("PUT", "application/x-www-form-urlencoded"), ("POST", "application/merge-patch+json"), ("POST", None),
])
def test_a_body_of_another_media_type_is_415_and_writes_nothing(client, method, content_type):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    url = BOOKS if method == "POST" else f"{BOOKS}/{book['id']}"
    response = send(client, method, url, book_fields(title="Changed"), content_type=content_type, headers=headers)
    assert_problem(response, 415, "application/json")
    assert all_books(client) == [book]
    assert current(client, book["id"]) == (book, etag)


def test_every_write_answers_with_a_new_etag_even_within_one_timestamp(client, monkeypatch):
    # A frozen clock: every write lands in the same instant, so a tag built from the timestamp would repeat.
    monkeypatch.setattr(storage, "utc_now", lambda: "2026-11-20T10:00:00.000000Z")
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    url = f"{BOOKS}/{book['id']}"
    tags = [etag]
    for method, body in [("PATCH", {"pages": 1}), ("PATCH", {"pages": 2}), ("PUT", book_fields()),
                         ("PUT", book_fields()), ("PATCH", {"pages": 464})]:
        response = client.request(method, url, json=body, headers=headers)
        assert response.status_code == 200, response.text
        tags.append(response.headers["etag"])
        assert client.get(url).headers["etag"] == tags[-1]
    assert len(set(tags)) == len(tags), tags


def test_a_deleted_book_answers_204_then_404(client):
    _, headers = signed_in_user(client)
    book, _ = new_book(client, headers)
    kept, _ = new_book(client, headers, title="Kept")
    response = client.delete(f"{BOOKS}/{book['id']}", headers=headers)
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(client.get(f"{BOOKS}/{book['id']}"), 404)
    assert_problem(client.delete(f"{BOOKS}/{book['id']}", headers=headers), 404)
    assert_problem(client.patch(f"{BOOKS}/{book['id']}", json={"pages": 1}, headers=headers), 404)
    assert all_books(client) == [kept]


def test_deleting_a_book_needs_a_token(client):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    response = client.delete(f"{BOOKS}/{book['id']}")
    assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert current(client, book["id"]) == (book, etag)


# == Ownership ====================================================================================

WRITES = [pytest.param("PUT", book_fields(title="Mine now"), id="PUT"),
          pytest.param("PATCH", {"title": "Mine now"}, id="PATCH"),
          pytest.param("DELETE", None, id="DELETE")]


@pytest.mark.parametrize("method, body", WRITES)
def test_another_user_may_not_change_a_book(client, method, body):
    _, owner = signed_in_user(client)
    _, stranger = signed_in_user(client)
    book, etag = new_book(client, owner)
    response = send(client, method, f"{BOOKS}/{book['id']}", body, headers=stranger)
    assert_problem(response, 403)
    assert current(client, book["id"]) == (book, etag)


@pytest.mark.parametrize("method, body", WRITES)
def test_an_admin_may_change_anyones_book_from_the_moment_of_promotion(client, method, body):
    _, owner = signed_in_user(client)
    admin, admin_headers = signed_in_user(client)
    book, _ = new_book(client, owner)
    assert_problem(send(client, method, f"{BOOKS}/{book['id']}", body, headers=admin_headers), 403)

    make_admin(client, admin["email"])  # the token issued before the promotion is used on purpose
    response = send(client, method, f"{BOOKS}/{book['id']}", body, headers=admin_headers)
    if method == "DELETE":
        assert response.status_code == 204
        assert_problem(client.get(f"{BOOKS}/{book['id']}"), 404)
    else:
        assert response.status_code == 200, response.text
        assert response.json()["title"] == "Mine now"
        assert response.json()["owner_id"] == book["owner_id"]  # an admin's edit does not take the book


# == If-Match =====================================================================================


@pytest.mark.parametrize("method, body, if_match", [
    (*WRITES[0].values, "{tag}"), (*WRITES[1].values, "{tag}"), (*WRITES[2].values, "{tag}"),
    (*WRITES[0].values, "*"), (*WRITES[1].values, '"a","b" , {tag}'), (*WRITES[2].values, '"stale", {tag}')],
    ids=["PUT-tag", "PATCH-tag", "DELETE-tag", "PUT-star", "PATCH-list", "DELETE-list"])
def test_a_write_whose_if_match_matches_succeeds(client, method, body, if_match):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    response = send(client, method, f"{BOOKS}/{book['id']}", body,
                    headers={**headers, "If-Match": if_match.format(tag=etag)})
    assert response.status_code == (204 if method == "DELETE" else 200), response.text
    if method != "DELETE":
        assert response.headers["etag"] != etag
        assert current(client, book["id"]) == (response.json(), response.headers["etag"])


@pytest.mark.parametrize("method, body, if_match", [
    (*WRITES[0].values, "{stale}"), (*WRITES[1].values, "{stale}"), (*WRITES[2].values, "{stale}"),
    (*WRITES[1].values, '"nope", {stale}'), (*WRITES[0].values, "W/{tag}")],
    ids=["PUT-stale", "PATCH-stale", "DELETE-stale", "PATCH-list", "PUT-weak"])
def test_a_write_whose_if_match_does_not_match_is_412_and_changes_nothing(client, method, body, if_match):
    _, headers = signed_in_user(client)
    book, stale = new_book(client, headers)
    changed = client.patch(f"{BOOKS}/{book['id']}", json={"year": 2009}, headers=headers)
    book, etag = changed.json(), changed.headers["etag"]
    # W/ marks a weak tag, and If-Match compares strongly: a weak tag never matches (RFC 9110, 13.1.1).
    response = send(client, method, f"{BOOKS}/{book['id']}", body,
                    headers={**headers, "If-Match": if_match.format(tag=etag, stale=stale)})
    assert_problem(response, 412)
    assert current(client, book["id"]) == (book, etag)


@pytest.mark.parametrize("method, body, if_none_match", [
    (*WRITES[0].values, "*"), (*WRITES[1].values, "{tag}"), (*WRITES[2].values, '"stale", W/{tag}')],
    ids=["PUT-star", "PATCH-tag", "DELETE-weak-list"])
def test_a_write_whose_if_none_match_names_the_book_is_412_and_changes_nothing(client, method, body, if_none_match):
    """If-None-Match on a write (RFC 9110 §13.1.2): `*` means "only if it does not exist yet",
    a tag "only if it is no longer this one"; compared weakly."""
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    response = send(client, method, f"{BOOKS}/{book['id']}", body,
                    headers={**headers, "If-None-Match": if_none_match.format(tag=etag)})
    assert_problem(response, 412, "If-None-Match")
    assert current(client, book["id"]) == (book, etag)
    elsewhere = send(client, method, f"{BOOKS}/{book['id']}", body, headers={**headers, "If-None-Match": '"1.99"'})
    assert elsewhere.status_code == (204 if method == "DELETE" else 200), elsewhere.text


def test_a_read_whose_if_match_names_another_etag_is_412(client):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    assert_problem(client.get(f"{BOOKS}/{book['id']}", headers={"If-Match": '"nope"'}), 412, etag)
    for if_match in (etag, "*", f'"nope", {etag}'):
        response = client.get(f"{BOOKS}/{book['id']}", headers={"If-Match": if_match})
        assert response.status_code == 200 and response.json() == book
    order = place(client, headers, (new_book(client, headers, price_cents=100, stock=1)[0]["id"], 1))
    order_url = order.headers["location"]
    assert_problem(client.get(order_url, headers={**headers, "If-Match": '"nope"'}), 412, "order")
    assert client.get(order_url, headers={**headers, "If-Match": order.headers["etag"]}).status_code == 200


# == Which error answers first ====================================================================
# The contract's order: 413, 415, 401, 404, 403, 400, 412, 409.

BAD_BODY = {"year": 0}
PRECEDENCE = [
    # (method, caller, target, content type, body, If-Match, expected status)
    pytest.param("POST", "nobody", "new", "text/plain", b"x" * (1024 * 1024 + 1), None, 413,
                 id="413 before 415 and 401"),
    pytest.param("POST", "nobody", "new", "text/plain", BAD_BODY, None, 415, id="415 before 401 on POST"),
    pytest.param("POST", "nobody", "new", "application/json", BAD_BODY, None, 401, id="401 before 400 on POST"),
    pytest.param("PATCH", "other", "book", "text/plain", {"title": "x"}, None, 415,
                 id="415 before 403 for a non-owner"),
    pytest.param("PATCH", "nobody", "missing", "application/json", {"title": "x"}, None, 401,
                 id="401 before 404 on PATCH"),
    pytest.param("DELETE", "nobody", "missing", None, None, None, 401, id="401 before 404 on DELETE"),
    pytest.param("PUT", "other", "missing", "application/json", BAD_BODY, "stale", 404,
                 id="404 before 400 and 412"),
    pytest.param("PATCH", "other", "book", "application/json", BAD_BODY, None, 403,
                 id="403 before 400 for a non-owner"),
    pytest.param("DELETE", "other", "book", None, None, "stale", 403, id="403 before 412 for a non-owner"),
    pytest.param("PATCH", "owner", "book", "application/json", BAD_BODY, "stale", 400, id="400 before 412"),
    pytest.param("PATCH", "owner", "book", "application/json", {"isbn": "9780132350885"}, "stale", 400,
                 id="400 for a bad isbn before 412"),
    pytest.param("PUT", "owner", "book", "application/json", book_fields(isbn="9780132350885"), "stale", 400,
                 id="400 for a bad isbn before 412 on PUT"),
    pytest.param("PATCH", "owner", "book", "application/json", {"isbn": CLEAN_CODE}, "stale", 412,
                 id="412 before 409"),
    pytest.param("PUT", "owner", "book", "application/json", book_fields(isbn=CLEAN_CODE), "stale", 412,
                 id="412 before 409 on PUT"),
]


@pytest.mark.parametrize("method, caller, target, content_type, body, if_match, status", PRECEDENCE)
def test_when_several_things_are_wrong_the_first_in_the_contract_order_answers(
        client, method, caller, target, content_type, body, if_match, status):
    _, owner = signed_in_user(client)
    _, other = signed_in_user(client)
    new_book(client, owner, title="Taken", isbn=CLEAN_CODE)  # for the 409s
    book, stale = new_book(client, owner)
    client.patch(f"{BOOKS}/{book['id']}", json={"pages": 1}, headers=owner)  # `stale` is now out of date
    book, etag = current(client, book["id"])
    before = all_books(client)

    url = {"new": BOOKS, "book": f"{BOOKS}/{book['id']}", "missing": f"{BOOKS}/424242"}[target]
    headers = {"owner": owner, "other": other, "nobody": {}}[caller]
    if if_match:
        headers = {**headers, "If-Match": stale}
    response = send(client, method, url, body, content_type=content_type, headers=headers)

    assert_problem(response, status)
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert all_books(client) == before
    assert current(client, book["id"]) == (book, etag)


# == Concurrent writers ===========================================================================


def test_of_twenty_concurrent_patches_with_the_same_if_match_exactly_one_wins(client):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers)
    url = f"{BOOKS}/{book['id']}"

    start = threading.Barrier(20)

    def patch(n: int):
        start.wait()
        return client.patch(url, json={"title": f"Writer {n}"}, headers={**headers, "If-Match": etag})

    # Each thread's request runs as its own task on the TestClient's one event loop, so they interleave
    # at every await, as requests do in a server.
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(patch, range(20)))

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] + [412] * 19, statuses
    winner = next(response for response in responses if response.status_code == 200)
    for loser in responses:
        if loser is not winner:
            assert_problem(loser, 412)
    assert current(client, book["id"]) == (winner.json(), winner.headers["etag"])
    assert winner.json()["title"].startswith("Writer ")


# == Lists ========================================================================================


def test_a_list_has_twenty_books_by_default_and_links_to_the_next_page(client):
    _, headers = signed_in_user(client)
    ids = [new_book(client, headers, title=f"Book {n}")[0]["id"] for n in range(21)]
    response = client.get(BOOKS)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"items", "next"}
    assert [book["id"] for book in body["items"]] == ids[:20]
    assert body["next"].startswith(f"{BOOKS}?")
    assert parse_qs(urlsplit(body["next"]).query)["limit"] == ["20"]
    assert response.headers["link"] == f'<{body["next"]}>; rel="next"'

    last = client.get(body["next"])
    assert [book["id"] for book in last.json()["items"]] == ids[20:]
    assert last.json()["next"] is None
    assert "link" not in last.headers


def test_an_empty_list_has_no_items_and_no_next(client):
    response = client.get(BOOKS)
    assert response.status_code == 200
    assert response.json() == {"items": [], "next": None}
    assert "link" not in response.headers


@pytest.mark.parametrize("limit", [1, 100])
def test_limit_may_be_anything_from_1_to_100(client, limit):
    _, headers = signed_in_user(client)
    for n in range(3):
        new_book(client, headers, title=f"Book {n}")
    body = client.get(f"{BOOKS}?limit={limit}").json()
    assert len(body["items"]) == min(limit, 3)
    assert (body["next"] is None) == (limit == 100)


@pytest.mark.parametrize("query, parameter, detail", [
    ("limit=0", "limit", "Expected `int` >= 1"),
    ("limit=101", "limit", "Expected `int` <= 100"),
    ("limit=x", "limit", "Expected `int`, got `str`"),
    ("limit=5.0", "limit", "Expected `int`, got `str`"),  # msgspec alone reads these three as integers
    ("limit=1e1", "limit", "Expected `int`, got `str`"),
    ("limit=99.99999999999999999", "limit", "Expected `int`, got `str`"),
    ("limit=05", "limit", "Expected `int`, got `str`"),
    ("=1", "", "Object contains unknown field ``"),
    ("limit=1&limit=2", "limit", "Give this parameter once."),
    ("sort=year", "sort", "Invalid enum value 'year'"),
    ("page=2", "page", "Object contains unknown field `page`"),
    ("q=", "q", "Expected `str` of length >= 1"),
    ("q=" + "x" * 101, "q", "Expected `str` of length <= 100"),
    ("author=", "author", "Expected `str` of length >= 1"),
    ("cursor=", "cursor", "This cursor is not one this API made; use `next` as given."),
    # NUL reaches neither database (PostgreSQL cannot take it; SQLite's FTS5 read it as the end).
    ("q=%00abc", "q", "Expected a value without NUL characters."),
    ("q=ab%00", "q", "Expected a value without NUL characters."),
    ("q=a%00", "q", "Expected a value without NUL characters."),
    ("author=%00x", "author", "Expected a value without NUL characters."),
    ("cursor=%00", "cursor", "Expected a value without NUL characters."),
])
def test_a_bad_query_parameter_is_refused_naming_it(client, query, parameter, detail):
    response = client.get(f"{BOOKS}?{query}")
    body = assert_problem(response, 400, detail)
    assert body["errors"][0] == {"parameter": parameter, "detail": detail}


def test_q_may_be_100_characters_long(client):
    _, headers = signed_in_user(client)
    book, _ = new_book(client, headers, title="x" * 150)
    assert client.get(f"{BOOKS}?q={'X' * 100}").json()["items"] == [book]


def test_sorting_by_id_goes_either_way(client):
    _, headers = signed_in_user(client)
    ids = [new_book(client, headers, title=title)[0]["id"] for title in ("b", "a", "c")]
    assert [book["id"] for book in client.get(f"{BOOKS}?sort=id").json()["items"]] == ids
    assert [book["id"] for book in client.get(f"{BOOKS}?sort=-id").json()["items"]] == ids[::-1]


# Upper case before lower case before accented letters: code-point order, not a locale's.
TITLES = ["apple", "Banana", "Zebra", "éclair", "ärger", "Æ", "a", "apple", "Zebra", "Émile", "b", "A", "apple"]


@pytest.mark.parametrize("sort", ["title", "-title"])
def test_titles_sort_in_code_point_order_with_ties_broken_by_id(client, sort):
    _, headers = signed_in_user(client)
    books = [new_book(client, headers, title=title)[0] for title in TITLES]
    expected = sorted(books, key=lambda book: (book["title"], book["id"]), reverse=sort == "-title")
    response = client.get(f"{BOOKS}?sort={sort}&limit=100")
    assert [(book["title"], book["id"]) for book in response.json()["items"]] == \
        [(book["title"], book["id"]) for book in expected]


def test_the_author_filter_is_exact_and_case_insensitive(client):
    _, headers = signed_in_user(client)
    wanted = [new_book(client, headers, title=f"Earthsea {n}", author=author)[0]
              for n, author in enumerate(["Ursula K. Le Guin", "URSULA K. LE GUIN", "ursula k. le guin"])]
    for author in ["Ursula K. Le", "Ursula K. Le Guin Jr.", "Le Guin, Ursula K.", " Ursula K. Le Guin"]:
        new_book(client, headers, title="Not hers", author=author)
    for asked in ["Ursula K. Le Guin", "ursula k. le guin", "uRSULA k. lE gUIN"]:
        response = client.get(BOOKS, params={"author": asked})
        assert response.status_code == 200
        assert response.json()["items"] == wanted


def test_q_finds_a_case_insensitive_substring_of_the_title_or_the_author(client):
    _, headers = signed_in_user(client)
    by_title, _ = new_book(client, headers, title="The Left Hand of DARKNESS", author="Ursula K. Le Guin")
    by_author, _ = new_book(client, headers, title="Solaris", author="Stanisław Lem darkness-fan")
    new_book(client, headers, title="Dune", author="Frank Herbert")
    response = client.get(BOOKS, params={"q": "dArKnEsS"})
    assert response.json()["items"] == [by_title, by_author]
    assert client.get(BOOKS, params={"q": "t hand of d"}).json()["items"] == [by_title]
    assert client.get(BOOKS, params={"q": "LEM"}).json()["items"] == [by_author]
    assert client.get(BOOKS, params={"q": "Dune", "author": "frank herbert"}).json()["items"][0]["title"] == "Dune"
    assert client.get(BOOKS, params={"q": "Dune", "author": "Ursula K. Le Guin"}).json()["items"] == []


@pytest.mark.parametrize("q, found", [
    ("%", ["100% Pure"]),
    ("0%", ["100% Pure"]),
    ("_", ["snake_case"]),
    ("\\", ["back\\slash"]),
    ("\\%", []),
    ("Pl_in", []),
])
def test_q_matches_percent_underscore_and_backslash_literally(client, q, found):
    _, headers = signed_in_user(client)
    for title in ["100% Pure", "snake_case", "back\\slash", "Plain", "Plains", "1000 Pure"]:
        new_book(client, headers, title=title)
    response = client.get(BOOKS, params={"q": q})
    assert response.status_code == 200, response.text
    assert [book["title"] for book in response.json()["items"]] == found


SEARCH_ALPHABET = "ab %_\\\"'éÉßẞİıΣσς"


def random_text(rng, length: int) -> str:
    return "".join(rng.choice(SEARCH_ALPHABET) for _ in range(length)).strip() or "a"


def test_q_on_random_data_finds_exactly_what_a_substring_test_finds_after_writes_and_deletes(client):
    """The trigram index (3 characters and more) and the scan (1 or 2) against Python's own
    `casefold() in`, on text full of LIKE's and FTS5's special characters and of letters whose
    folding changes their length (ẞ → ss, İ → i̇): both paths answer the same as before the index."""
    rng = random.Random(14)
    _, headers = signed_in_user(client)
    books = {}
    for _ in range(120):
        book, _ = new_book(client, headers, title=random_text(rng, rng.randint(1, 12)),
                           author=random_text(rng, rng.randint(1, 8)))
        books[book["id"]] = book
    for book_id in rng.sample(sorted(books), 30):  # the index follows every change of a title or author
        patch = {"title": random_text(rng, rng.randint(1, 12))} if rng.random() < 0.5 else {"author": random_text(rng, 6)}
        response = client.patch(f"{BOOKS}/{book_id}", json=patch, headers=headers)
        assert response.status_code == 200, response.text
        books[book_id] = response.json()
    for book_id in rng.sample(sorted(books), 20):
        assert client.delete(f"{BOOKS}/{book_id}", headers=headers).status_code == 204
        del books[book_id]
    samples = [book[field] for book in books.values() for field in ("title", "author")]
    patterns = ([sample[start:start + length] for sample in rng.sample(samples, 40)
                 for start, length in [(rng.randrange(len(sample)), rng.randint(1, 6))]]
                + [random_text(rng, rng.randint(1, 5)) for _ in range(40)] + ["ss", "ssa", "ẞa", '"', '""', "%_\\"])
    for q in patterns:
        if not q.strip():
            continue
        folded = q.casefold()
        wanted = [book for _, book in sorted(books.items())
                  if folded in book["title"].casefold() or folded in book["author"].casefold()]
        found = walk(client, f"{BOOKS}?{urlencode({'q': q, 'limit': 7})}")
        assert found == wanted, q
        by_title = walk(client, f"{BOOKS}?{urlencode({'q': q, 'limit': 5, 'sort': '-title'})}")
        assert [book["id"] for book in by_title] == [book["id"] for book in
                                                     sorted(wanted, key=lambda b: (b["title"], b["id"]), reverse=True)]


def test_a_search_of_three_characters_or_more_is_looked_up_in_the_trigram_index(client):
    store = client.app.state.quire.store
    if store.is_sqlite:
        plan = client.portal.call(store.query, "EXPLAIN QUERY PLAN SELECT id FROM books WHERE id IN "
                                  "(SELECT rowid FROM books_fts WHERE books_fts MATCH :phrase)", {"phrase": '"dune"'})
        assert any("books_fts VIRTUAL TABLE INDEX" in row["detail"] for row in plan), plan
    else:
        async def explain() -> list:
            async with store.transaction() as run:  # the table is tiny: ask for the plan an index allows
                await run("SET LOCAL enable_seqscan = off", {})
                return await run("EXPLAIN SELECT id FROM books WHERE title_fold LIKE :p OR author_fold LIKE :p",
                                 {"p": "%dune%"})
        plan = " ".join(str(row) for row in client.portal.call(explain))
        assert "books_title_trigrams" in plan and "books_author_trigrams" in plan, plan


def searches_on_the_readers_thread(monkeypatch: pytest.MonkeyPatch, store: storage.Store) -> list[str]:
    """The SQL of every read that goes to aiosqlite's reader thread from now on."""
    threaded, real_sqlite = [], storage.Store._sqlite

    async def sqlite(self, connection, sql, values):
        if connection is store._reader:
            threaded.append(sql)
        return await real_sqlite(self, connection, sql, values)

    monkeypatch.setattr(storage.Store, "_sqlite", sqlite)
    return threaded


def test_a_search_within_the_loops_budget_is_answered_on_the_loop_and_a_costly_one_on_the_thread(
        tmp_path, monkeypatch):
    """On SQLite (whatever database the suite runs on), a `q` search starts on the event loop's
    reader; past LOOP_READ_BUDGET thousands of SQLite's instructions it is interrupted there and
    run again on the reader's thread, with the same answer, and the loop's reader is left without
    the budget for the reads after it."""
    app = api.create_app(config=api.Config(environ={}), database_url=f"sqlite:///{tmp_path / 'search.db'}",
                         rate_limit=0)
    with TestClient(app) as client:
        store = client.app.state.quire.store
        _, headers = signed_in_user(client)
        titles = [f"Volume {n} of the Archive" for n in range(60)] + ["The Quokka Papers"]
        for title in titles:
            new_book(client, headers, title=title, isbn=None)
        threaded = searches_on_the_readers_thread(monkeypatch, store)
        found = client.get(BOOKS, params={"q": "quokka"})
        assert found.status_code == 200
        assert [book["title"] for book in found.json()["items"]] == ["The Quokka Papers"]
        assert threaded == []  # a handful of matches: well within the budget
        everything = client.get(BOOKS, params={"q": "archive", "limit": 100}).json()["items"]
        assert len(everything) == 60 and threaded == []

        monkeypatch.setattr(storage, "LOOP_READ_BUDGET", 0)  # the first 1,000 instructions use it up
        costly = client.get(BOOKS, params={"q": "archive", "limit": 100})
        assert costly.status_code == 200 and costly.json()["items"] == everything
        assert len(threaded) == 1 and "books_fts MATCH" in threaded[0]
        short = client.get(BOOKS, params={"q": "ol", "limit": 100})  # too short for the index: a scan
        assert short.status_code == 200 and short.json()["items"] == everything
        assert len(threaded) == 2 and "LIKE" in threaded[1]
        # The budget went with the search: a read on the loop far past 1,000 instructions runs to its end.
        count = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10000) SELECT count(*) AS c FROM n"
        assert client.portal.call(store.query, count) == [{"c": 10000}] and len(threaded) == 2


def test_books_of_a_database_from_before_the_trigram_index_are_found_through_it(make_app, monkeypatch):
    with monkeypatch.context() as patched:
        patched.setattr(storage, "MIGRATIONS", storage.MIGRATIONS[:4])
        with TestClient(make_app()) as client:
            # A token made here: signing in needs a later migration's column.
            headers = bearer(auth.make_token(register(client)["id"], signing_key(client), 600)[0])
            old, _ = new_book(client, headers, title="The Dispossessed", author="Ursula K. Le Guin")
    with TestClient(make_app()) as client:
        assert applied_migrations(client) == list(range(1, len(storage.MIGRATIONS) + 1))
        assert client.get(BOOKS, params={"q": "POSSESS"}).json()["items"] == [old]
        assert client.get(BOOKS, params={"q": "le gu"}).json()["items"] == [old]


def test_next_keeps_limit_sort_author_and_q(client):
    _, headers = signed_in_user(client)
    mine = [new_book(client, headers, title=f"Dark {n}", author="Jo Walton")[0] for n in range(5)]
    new_book(client, headers, title="Dark Other", author="Someone Else")
    new_book(client, headers, title="Light", author="Jo Walton")
    response = client.get(BOOKS, params={"limit": 2, "sort": "-title", "author": "JO WALTON", "q": "dark"})
    body = response.json()
    query = parse_qs(urlsplit(body["next"]).query)
    assert {name: values for name, values in query.items() if name != "cursor"} == {
        "limit": ["2"], "sort": ["-title"], "author": ["JO WALTON"], "q": ["dark"]}
    assert len(query["cursor"]) == 1
    assert response.headers["link"] == f'<{body["next"]}>; rel="next"'

    seen = body["items"] + walk(client, body["next"])
    assert [book["title"] for book in seen] == [f"Dark {n}" for n in range(4, -1, -1)]
    assert sorted(book["id"] for book in seen) == [book["id"] for book in mine]


@pytest.mark.parametrize("count, limit", [(4, 2), (5, 2), (1, 1)])
def test_next_is_null_as_soon_as_no_book_is_left(client, count, limit):
    _, headers = signed_in_user(client)
    for n in range(count):
        new_book(client, headers, title=f"Book {n}")
    pages = []
    url = f"{BOOKS}?limit={limit}"
    while url:
        body = client.get(url).json()
        pages.append(len(body["items"]))
        url = body["next"]
    assert pages == [limit] * (count // limit) + ([count % limit] if count % limit else [])


def flip(cursor: str) -> str:
    """The cursor with one character in its middle changed."""
    middle = len(cursor) // 2
    return cursor[:middle] + ("A" if cursor[middle] != "A" else "B") + cursor[middle + 1:]


# The details' exact wording is still moving; these phrases tell the two kinds of refusal apart.
FORGED = "not one this API made"
MISMATCHED = "belongs to another"


@pytest.mark.parametrize("make_query, detail", [
    (lambda cursor: {"cursor": "garbage"}, FORGED),
    (lambda cursor: {"cursor": "eyJzb3J0IjoiaWQifQ"}, FORGED),  # {"sort":"id"}, unsigned
    (lambda cursor: {"cursor": flip(cursor), "author": "Ann Leckie"}, FORGED),
    (lambda cursor: {"cursor": cursor[:-1], "author": "Ann Leckie"}, FORGED),
    (lambda cursor: {"cursor": cursor, "author": "Ann Leckie", "sort": "-id"}, MISMATCHED),
    (lambda cursor: {"cursor": cursor}, MISMATCHED),
    (lambda cursor: {"cursor": cursor, "author": "Someone Else"}, MISMATCHED),
    (lambda cursor: {"cursor": cursor, "author": "Ann Leckie", "q": "a"}, MISMATCHED),
], ids=["garbage", "unsigned", "tampered", "truncated", "other sort",
        "filter dropped", "other author", "filter added"])
def test_a_cursor_that_is_not_this_lists_is_refused(client, make_query, detail):
    _, headers = signed_in_user(client)
    for n in range(3):
        new_book(client, headers, title=f"Ancillary {n}", author="Ann Leckie")
    first = client.get(BOOKS, params={"limit": 1, "author": "Ann Leckie"}).json()
    cursor = parse_qs(urlsplit(first["next"]).query)["cursor"][0]
    response = client.get(BOOKS, params={"limit": 1, **make_query(cursor)})
    body = assert_problem(response, 400, detail)
    assert body["errors"][0]["parameter"] == "cursor"
    assert detail in body["errors"][0]["detail"]


def test_a_cursor_from_the_users_list_is_refused_by_the_books_list(client):
    admin, headers = signed_in_user(client)
    register(client)
    make_admin(client, admin["email"])
    users = client.get("/api/v1/users", params={"limit": 1}, headers=headers)
    assert users.status_code == 200, users.text
    cursor = parse_qs(urlsplit(users.json()["next"]).query)["cursor"][0]
    body = assert_problem(client.get(BOOKS, params={"cursor": cursor}), 400)
    assert body["errors"][0]["parameter"] == "cursor"


def test_a_cursor_with_a_different_limit_is_fine(client):
    _, headers = signed_in_user(client)
    ids = [new_book(client, headers, title=f"Book {n}")[0]["id"] for n in range(5)]
    cursor = parse_qs(urlsplit(client.get(f"{BOOKS}?limit=2").json()["next"]).query)["cursor"][0]
    response = client.get(BOOKS, params={"limit": 3, "cursor": cursor})
    assert [book["id"] for book in response.json()["items"]] == ids[2:]


# == Walking every page ===========================================================================

SORT_KEYS = {
    "id": lambda book: book["id"],
    "-id": lambda book: -book["id"],
    "title": lambda book: (book["title"], book["id"]),
    "-title": lambda book: (book["title"], book["id"]),
}


def in_order(books: list[dict], sort: str) -> list[dict]:
    return sorted(books, key=SORT_KEYS[sort], reverse=sort == "-title")


@pytest.mark.parametrize("sort", ["id", "-id", "title", "-title"])
def test_a_walk_through_the_pages_sees_every_book_once_and_in_order(client, sort):
    _, headers = signed_in_user(client)
    books = [new_book(client, headers, title=title)[0] for title in TITLES + ["Zebra", "a", "Apple"]]
    seen = walk(client, f"{BOOKS}?limit=3&sort={sort}")
    assert [book["id"] for book in seen] == [book["id"] for book in in_order(books, sort)]


@pytest.mark.parametrize("sort", ["id", "-id", "title", "-title"])
def test_books_added_and_deleted_during_a_walk_do_not_upset_it(client, sort):
    _, headers = signed_in_user(client)
    books = [new_book(client, headers, title=title)[0] for title in TITLES]
    deleted: set[int] = set()
    seen: list[dict] = []

    def meanwhile(page: int) -> None:
        # Between pages: delete one book already seen and one not yet seen; for the first few pages
        # (so that the walk ends) add books that sort first, last, and equal to an existing title.
        seen_ids = {book["id"] for book in seen}
        remaining = [book for book in in_order(books, sort) if book["id"] not in seen_ids | deleted]
        for victim in [book for book in seen if book["id"] not in deleted][:1] + remaining[-1:]:
            assert client.delete(f"{BOOKS}/{victim['id']}", headers=headers).status_code == 204
            deleted.add(victim["id"])
        if page < 4:
            for title in (f"0 first {page}", f"~ last {page}", "apple"):
                new_book(client, headers, title=title)

    url, page = f"{BOOKS}?limit=3&sort={sort}", 0
    while url:
        body = client.get(url).json()
        seen += body["items"]
        url, page = body["next"], page + 1
        meanwhile(page)

    ids = [book["id"] for book in seen]
    assert len(ids) == len(set(ids)), "a book appeared twice"
    stayed = [book["id"] for book in in_order(books, sort) if book["id"] not in deleted]
    assert [book_id for book_id in ids if book_id in set(stayed)] == stayed
    assert [book["id"] for book in in_order(seen, sort)] == ids  # the walk never went back


# == Mounted in another app =======================================================================


def test_a_mounted_app_writes_its_prefix_into_location_next_and_link(make_app):
    shop = make_app()
    parent = Starlette(routes=[Mount("/shop", app=shop)])
    with TestClient(parent) as client:
        try:
            response = client.post("/shop/api/v1/users", json={"email": "shop@example.com", "name": "Shop",
                                                               "password": PASSWORD})
            assert response.status_code == 201, response.text
            token = client.post("/shop/api/v1/auth/token",
                                json={"email": "shop@example.com", "password": PASSWORD}).json()["access_token"]
            created = [client.post("/shop/api/v1/books", json=book_fields(title=f"Book {n}"), headers=bearer(token))
                       for n in range(3)]
            assert [response.status_code for response in created] == [201] * 3
            location = created[0].headers["location"]
            assert location == f"/shop/api/v1/books/{created[0].json()['id']}"
            assert client.get(location).json() == created[0].json()

            page = client.get("/shop/api/v1/books", params={"limit": 2, "sort": "-id"})
            next_url = page.json()["next"]
            assert next_url.startswith("/shop/api/v1/books?")
            assert page.headers["link"] == f'<{next_url}>; rel="next"'
            rest = client.get(next_url).json()
            assert [book["id"] for book in page.json()["items"] + rest["items"]] == \
                [response.json()["id"] for response in reversed(created)]
        finally:
            # The parent never runs the mounted app's lifespan, so nothing else closes its store.
            client.portal.call(shop.state.quire.store.disconnect)


def test_a_mount_prefix_with_reserved_characters_stays_escaped_in_next_and_link(make_app):
    """A parametrised mount takes its prefix from the client: `?`, `#` and a backslash in it must
    stay percent-encoded in the URLs the API writes (next, Link, Location, the document's server),
    or a URL would point somewhere else; so must a space, a `%`, a CR or LF and a character past
    Latin-1, which could not go into a header at all (a 500 after the write, or no answer)."""
    shop = make_app()
    parent = Starlette(routes=[Mount("/t/{tenant}", app=shop)])
    with TestClient(parent) as client:
        try:
            assert client.post("/t/x/api/v1/users", json={"email": "t@example.com", "name": "T",
                                                          "password": PASSWORD}).status_code == 201
            token = client.post("/t/x/api/v1/auth/token",
                                json={"email": "t@example.com", "password": PASSWORD}).json()["access_token"]
            for n in range(2):
                assert client.post("/t/x/api/v1/books", json=book_fields(title=f"Book {n}"),
                                   headers=bearer(token)).status_code == 201
            for n, prefix in enumerate(("/t/a%3Fb%23c", "/t/%5Cevil.example", "/t/%E2%82%AC", "/t/a%20b",
                                        "/t/100%25", "/t/x%0D%0AX-Evil:%201")):
                registered = client.post(f"{prefix}/api/v1/users", json={"email": f"t{n}@example.com", "name": "T",
                                                                        "password": PASSWORD})
                assert registered.status_code == 201, registered.text
                assert registered.headers["location"] == f"{prefix}/api/v1/users/{registered.json()['id']}"
                assert "x-evil" not in registered.headers
                created = client.post(f"{prefix}/api/v1/books", json=book_fields(title=f"In {prefix}"),
                                      headers=bearer(token))
                assert created.headers["location"] == f"{prefix}/api/v1/books/{created.json()['id']}"
                assert client.get(f"{prefix}/openapi.json").json()["servers"] == [{"url": prefix}]
                page = client.get(f"{prefix}/api/v1/books?limit=1")
                assert page.status_code == 200, page.text
                next_url = page.json()["next"]
                assert next_url.startswith(f"{prefix}/api/v1/books?limit=1&cursor="), next_url
                assert page.headers["link"] == f'<{next_url}>; rel="next"'
        finally:
            client.portal.call(shop.state.quire.store.disconnect)


@pytest.mark.parametrize("url", ["sqlite:///{tmp}/quire.db?cache=private", "sqlite:///file::memory:?cache=shared"])
def test_a_sqlite_url_with_a_query_string_reads_what_it_wrote(tmp_path, url):
    """`databases` opens the file named by the whole URL, query string included (or a shared
    in-memory database); the reads that run on the event loop must see that same database."""
    app = api.create_app(config=api.Config(environ={}), database_url=url.format(tmp=tmp_path), rate_limit=0)
    with TestClient(app) as client:
        _, headers = signed_in_user(client)
        book, _ = new_book(client, headers)
        assert client.get(f"{BOOKS}/{book['id']}").json() == book
        assert client.get(BOOKS).json()["items"] == [book]


# == The shop: prices and stock ===================================================================

ORDERS = "/api/v1/orders"


def test_a_book_has_a_price_in_cents_and_a_stock_which_default_to_not_for_sale_and_none(client):
    _, headers = signed_in_user(client)
    plain, _ = new_book(client, headers)
    assert (plain["price_cents"], plain["stock"]) == (None, 0)
    priced, _ = new_book(client, headers, price_cents=3999, stock=12)
    assert (priced["price_cents"], priced["stock"]) == (3999, 12)
    # PUT without them sets them back to their defaults; a merge patch changes only what it names.
    replaced = client.put(f"{BOOKS}/{priced['id']}", json=book_fields(), headers=headers).json()
    assert (replaced["price_cents"], replaced["stock"]) == (None, 0)
    patched = client.patch(f"{BOOKS}/{priced['id']}", json={"price_cents": 0, "stock": 5}, headers=headers).json()
    assert (patched["price_cents"], patched["stock"]) == (0, 5)
    cleared = client.patch(f"{BOOKS}/{priced['id']}", json={"price_cents": None}, headers=headers).json()
    assert (cleared["price_cents"], cleared["stock"]) == (None, 5)


@pytest.mark.parametrize("changes, pointer, detail", [
    ({"price_cents": -1}, "#/price_cents", "Expected `int` >= 0"),
    ({"price_cents": 10_000_001}, "#/price_cents", "Expected `int` <= 10000000"),
    ({"price_cents": 39.99}, "#/price_cents", "Expected `int | null`, got `float`"),
    ({"price_cents": "3999"}, "#/price_cents", "Expected `int | null`, got `str`"),
    ({"stock": -1}, "#/stock", "Expected `int` >= 0"),
    ({"stock": 1_000_001}, "#/stock", "Expected `int` <= 1000000"),
    ({"stock": 40.0}, "#/stock", "Expected `int`, got `float`"),
    ({"stock": None}, "#/stock", "Expected `int`, got `null`"),
])
def test_a_bad_price_or_stock_is_400_on_every_write(client, changes, pointer, detail):
    _, headers = signed_in_user(client)
    book, etag = new_book(client, headers, price_cents=100, stock=3)
    for method, url in (("POST", BOOKS), ("PUT", f"{BOOKS}/{book['id']}"), ("PATCH", f"{BOOKS}/{book['id']}")):
        body = changes if method == "PATCH" else book_fields(**changes)
        assert_bad_field(send(client, method, url, body, headers=headers), pointer, detail)
    assert current(client, book["id"]) == (book, etag)


def test_an_existing_database_gains_prices_and_stock_in_place(make_app, monkeypatch):
    """A database made before migration 3 keeps its books; they come out not for sale, stock 0."""
    with monkeypatch.context() as patched:
        patched.setattr(storage, "MIGRATIONS", storage.MIGRATIONS[:2])
        with TestClient(make_app()) as client:
            user = register(client)
            store = client.app.state.quire.store
            client.portal.call(functools.partial(store.query, (
                "INSERT INTO books (title, author, owner_id, title_fold, author_fold, created_at, updated_at) "
                "VALUES ('Old', 'Ada', :owner, 'old', 'ada', :now, :now)"), {"owner": user["id"], "now": storage.utc_now()},
                write=True))
    with TestClient(make_app()) as client:
        assert applied_migrations(client) == list(range(1, len(storage.MIGRATIONS) + 1))
        [book] = client.get(BOOKS).json()["items"]
        assert (book["title"], book["price_cents"], book["stock"]) == ("Old", None, 0)


# == Placing an order =============================================================================


def for_sale(client: TestClient, headers: dict, price_cents: int = 1000, stock: int = 10, **changes) -> dict:
    book, _ = new_book(client, headers, price_cents=price_cents, stock=stock, **changes)
    return book


def order_body(*lines: tuple[int, int]) -> dict:
    return {"items": [{"book_id": book_id, "quantity": quantity} for book_id, quantity in lines]}


def place(client: TestClient, headers: dict, *lines: tuple[int, int], key: str | None = None):
    extra = {"Idempotency-Key": key} if key is not None else {}
    return client.post(ORDERS, json=order_body(*lines), headers={**headers, **extra})


def stock(client: TestClient, book_id: int) -> int:
    return client.get(f"{BOOKS}/{book_id}").json()["stock"]


def order_count(client: TestClient) -> int:
    rows = client.portal.call(client.app.state.quire.store.query, "SELECT count(*) AS n FROM orders")
    return rows[0]["n"]


def admin(client: TestClient) -> dict[str, str]:
    user, headers = signed_in_user(client)
    make_admin(client, user["email"])
    return headers


def test_placing_an_order_takes_the_stock_and_answers_201_with_the_order(client):
    seller, seller_headers = signed_in_user(client)
    buyer, headers = signed_in_user(client)
    first = for_sale(client, seller_headers, price_cents=3999, stock=12, title="Clean Code")
    second = for_sale(client, seller_headers, price_cents=250, stock=3, title="Pamphlet")
    _, first_etag = current(client, first["id"])
    response = place(client, headers, (second["id"], 3), (first["id"], 2))  # not in id order
    assert response.status_code == 201, response.text
    order = response.json()
    assert response.headers["location"] == f"{ORDERS}/{order['id']}"
    assert response.headers["etag"] == f'"{order["id"]}.1"'
    assert order["buyer_id"] == buyer["id"] and order["status"] == "placed"
    assert order["items"] == [  # in the order sent
        {"book_id": second["id"], "title": "Pamphlet", "quantity": 3, "unit_price_cents": 250,
         "line_total_cents": 750},
        {"book_id": first["id"], "title": "Clean Code", "quantity": 2, "unit_price_cents": 3999,
         "line_total_cents": 7998}]
    assert order["total_cents"] == 8748 and isinstance(order["total_cents"], int)
    assert RFC3339.fullmatch(order["created_at"]) and order["created_at"] == order["updated_at"]
    assert (stock(client, first["id"]), stock(client, second["id"])) == (10, 0)
    # Taking stock is a change of the book: its version and ETag move on.
    assert current(client, first["id"])[1] != first_etag
    assert client.get(response.headers["location"], headers=headers).json() == order
    assert seller["id"] != buyer["id"]


@pytest.mark.parametrize("body, pointer, detail", [
    ({"items": []}, "#/items", "Expected `array` of length >= 1"),
    ({"items": [{"book_id": n, "quantity": 1} for n in range(1, 22)]}, "#/items", "Expected `array` of length <= 20"),
    ({}, "#/items", "Object missing required field `items`"),
    ({"items": [{"book_id": 1}]}, "#/items/0/quantity", "Object missing required field `quantity`"),
    ({"items": [{"book_id": 1, "quantity": 0}]}, "#/items/0/quantity", "Expected `int` >= 1"),
    ({"items": [{"book_id": 1, "quantity": 101}]}, "#/items/0/quantity", "Expected `int` <= 100"),
    ({"items": [{"book_id": 1, "quantity": 2.0}]}, "#/items/0/quantity", "Expected `int`, got `float`"),
    ({"items": [{"book_id": 1, "quantity": "2"}]}, "#/items/0/quantity", "Expected `int`, got `str`"),
    ({"items": [{"book_id": 0, "quantity": 1}]}, "#/items/0/book_id", "Expected `int` >= 1"),
    ({"items": [{"book_id": 2**63, "quantity": 1}]}, "#/items/0/book_id", "Expected `int` <= 9223372036854775807"),
    ({"items": [{"book_id": 1, "quantity": 1, "price": 1}]}, "#/items/0/price", "Object contains unknown field `price`"),
    ({"items": [{"book_id": 1, "quantity": 1}], "buyer_id": 1}, "#/buyer_id", "Object contains unknown field `buyer_id`"),
    ({"items": [{"book_id": 1, "quantity": 1}, {"book_id": 1, "quantity": 2}]}, "#/items/1/book_id",
     "Book 1 is in the order twice; give it once with the total quantity"),
])
def test_a_malformed_order_is_400_naming_the_line_and_changes_nothing(client, body, pointer, detail):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    assert book["id"] == 1
    assert_bad_field(client.post(ORDERS, json=body, headers=headers), pointer, detail)
    assert stock(client, book["id"]) == 5 and order_count(client) == 0


def test_an_order_needs_a_token(client):
    assert_unauthorized(client.post(ORDERS, json=order_body((1, 1))))
    assert_unauthorized(client.get(ORDERS))
    assert_unauthorized(client.get(f"{ORDERS}/1"))


def test_an_order_that_cannot_be_served_is_409_at_that_line_and_changes_nothing(client):
    _, headers = signed_in_user(client)
    plenty = for_sale(client, headers, stock=50)
    few = for_sale(client, headers, stock=2)
    unpriced = for_sale(client, headers, price_cents=None, stock=9)
    gone = for_sale(client, headers)
    assert client.delete(f"{BOOKS}/{gone['id']}", headers=headers).status_code == 204
    before = {book["id"]: current(client, book["id"]) for book in (plenty, few, unpriced)}
    cases = [
        ([(plenty["id"], 1), (few["id"], 3)], "#/items/1/quantity", "Only 2 of book"),
        ([(plenty["id"], 1), (unpriced["id"], 1)], "#/items/1/book_id", "is not for sale"),
        ([(gone["id"], 1), (plenty["id"], 1)], "#/items/0/book_id", "does not exist or is not for sale"),
        ([(plenty["id"], 1), (999_999, 1)], "#/items/1/book_id", "does not exist or is not for sale"),
    ]
    for lines, pointer, detail in cases:
        response = place(client, headers, *lines)
        body = assert_problem(response, 409, detail)
        assert body["errors"][0]["pointer"] == pointer, body
        assert "nothing was ordered" in body["detail"]
    assert {book_id: current(client, book_id) for book_id in before} == before  # not even the ETags moved
    assert order_count(client) == 0


def test_an_order_may_take_the_last_copies(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=3)
    assert place(client, headers, (book["id"], 3)).status_code == 201
    assert stock(client, book["id"]) == 0
    body = assert_problem(place(client, headers, (book["id"], 1)), 409, "Only 0 of book")
    assert body["errors"] == [{"pointer": "#/items/0/quantity", "detail": body["errors"][0]["detail"]}]


def test_an_order_keeps_the_title_and_price_of_its_moment(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, price_cents=1500, title="First title")
    order = place(client, headers, (book["id"], 2)).json()
    client.patch(f"{BOOKS}/{book['id']}", json={"price_cents": 9999, "title": "Renamed"}, headers=headers)
    assert client.get(f"{ORDERS}/{order['id']}", headers=headers).json() == order
    assert client.delete(f"{BOOKS}/{book['id']}", headers=headers).status_code == 204
    assert client.get(f"{ORDERS}/{order['id']}", headers=headers).json() == order


# == Reading orders ===============================================================================


def test_an_order_is_seen_by_its_buyer_and_admins_and_is_404_for_anyone_else(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers)
    response = place(client, headers, (book["id"], 1))
    order, etag = response.json(), response.headers["etag"]
    url = f"{ORDERS}/{order['id']}"
    mine = client.get(url, headers=headers)
    assert mine.status_code == 200 and mine.json() == order and mine.headers["etag"] == etag
    assert client.get(url, headers=admin(client)).json() == order
    _, stranger = signed_in_user(client)
    hidden = assert_problem(client.get(url, headers=stranger), 404, f"no order with id {order['id']}")
    missing = assert_problem(client.get(f"{ORDERS}/{order['id'] + 1}", headers=stranger), 404)
    assert hidden["detail"].replace(str(order["id"]), "N") == missing["detail"].replace(str(order["id"] + 1), "N")
    assert_problem(client.patch(url, json={"status": "cancelled"}, headers=stranger), 404)
    assert client.get(url, headers={**headers, "If-None-Match": etag}).status_code == 304
    assert_problem(client.get(f"{ORDERS}/99999999999999999999", headers=headers), 404)


class client_as:
    """The client with these headers on every GET (for `walk`)."""

    def __init__(self, client: TestClient, headers: dict) -> None:
        self.client, self.headers = client, headers

    def get(self, url: str):
        return self.client.get(url, headers=self.headers)


def test_orders_list_newest_first_each_buyer_its_own_and_an_admin_everyones(client):
    _, seller = signed_in_user(client)
    book = for_sale(client, seller, stock=100)
    ada, ada_headers = signed_in_user(client)
    bob, bob_headers = signed_in_user(client)
    ada_orders = [place(client, ada_headers, (book["id"], 1)).json() for _ in range(3)]
    bob_orders = [place(client, bob_headers, (book["id"], 1)).json() for _ in range(2)]
    assert walk(client_as(client, ada_headers), f"{ORDERS}?limit=2") == ada_orders[::-1]
    assert walk(client_as(client, bob_headers), f"{ORDERS}?sort=id") == bob_orders
    boss = admin(client)
    everyone = walk(client_as(client, boss), f"{ORDERS}?limit=2")
    assert everyone == (ada_orders + bob_orders)[::-1]
    assert walk(client_as(client, boss), f"{ORDERS}?buyer_id={bob['id']}&limit=1") == bob_orders[::-1]
    client.patch(f"{ORDERS}/{ada_orders[1]['id']}", json={"status": "cancelled"}, headers=ada_headers)
    cancelled = client.get(f"{ORDERS}?status=cancelled", headers=ada_headers).json()["items"]
    assert [order["id"] for order in cancelled] == [ada_orders[1]["id"]]
    assert client.get(f"{ORDERS}?status=placed", headers=bob_headers).json()["items"] == bob_orders[::-1]
    assert_bad_parameter(client.get(f"{ORDERS}?buyer_id={bob['id']}", headers=ada_headers), "buyer_id",
                         "Only admins may filter by buyer; you see your own orders.")
    assert_bad_parameter(client.get(f"{ORDERS}?status=lost", headers=ada_headers), "status",
                         "Invalid enum value 'lost'")
    assert ada["id"] != bob["id"]


def test_a_cursor_of_one_orders_list_is_refused_with_other_filters(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers)
    for _ in range(3):
        place(client, headers, (book["id"], 1))
    next_url = client.get(f"{ORDERS}?limit=1", headers=headers).json()["next"]
    cursor = parse_qs(urlsplit(next_url).query)["cursor"][0]
    assert_bad_parameter(client.get(f"{ORDERS}?limit=1&status=paid&cursor={cursor}", headers=headers), "cursor",
                         "This cursor belongs to another list, sort or filters.")


# == Moving an order along its life ===============================================================


def test_an_admin_moves_an_order_placed_paid_shipped(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=4)
    response = place(client, headers, (book["id"], 1))
    order, etag = response.json(), response.headers["etag"]
    url, boss = f"{ORDERS}/{order['id']}", admin(client)
    for status in ("paid", "shipped"):
        moved = send(client, "PATCH", url, {"status": status}, content_type="application/merge-patch+json",
                     headers={**boss, "If-Match": etag})
        assert moved.status_code == 200, moved.text
        assert moved.json()["status"] == status and moved.headers["etag"] != etag
        assert moved.json()["items"] == order["items"]
        etag = moved.headers["etag"]
        assert client.get(url, headers=headers).headers["etag"] == etag
    assert stock(client, book["id"]) == 3  # shipping does not touch the stock


def test_the_buyer_cancels_and_the_stock_comes_back(client):
    _, headers = signed_in_user(client)
    first, second = for_sale(client, headers, stock=5), for_sale(client, headers, stock=5)
    order = place(client, headers, (first["id"], 2), (second["id"], 5)).json()
    assert (stock(client, first["id"]), stock(client, second["id"])) == (3, 0)
    response = client.patch(f"{ORDERS}/{order['id']}", json={"status": "cancelled"}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert (stock(client, first["id"]), stock(client, second["id"])) == (5, 5)


def test_a_paid_order_may_be_cancelled_by_an_admin_and_the_stock_comes_back(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    order = place(client, headers, (book["id"], 4)).json()
    boss = admin(client)
    assert client.patch(f"{ORDERS}/{order['id']}", json={"status": "paid"}, headers=boss).status_code == 200
    assert client.patch(f"{ORDERS}/{order['id']}", json={"status": "cancelled"}, headers=boss).status_code == 200
    assert stock(client, book["id"]) == 5


def test_cancelling_an_order_whose_book_was_deleted_succeeds(client):
    _, headers = signed_in_user(client)
    kept, gone = for_sale(client, headers, stock=5), for_sale(client, headers, stock=5)
    order = place(client, headers, (kept["id"], 1), (gone["id"], 1)).json()
    assert client.delete(f"{BOOKS}/{gone['id']}", headers=headers).status_code == 204
    response = client.patch(f"{ORDERS}/{order['id']}", json={"status": "cancelled"}, headers=headers)
    assert response.status_code == 200, response.text
    assert stock(client, kept["id"]) == 5
    assert client.get(f"{BOOKS}/{gone['id']}").status_code == 404  # nothing came back to life


@pytest.mark.parametrize("to_status", ["paid", "shipped", "placed"])
def test_a_buyer_may_only_cancel(client, to_status):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers)
    response = place(client, headers, (book["id"], 1))
    order, etag = response.json(), response.headers["etag"]
    assert_problem(client.patch(f"{ORDERS}/{order['id']}", json={"status": to_status}, headers=headers), 403,
                   "A buyer may only cancel an order")
    assert client.get(f"{ORDERS}/{order['id']}", headers=headers).headers["etag"] == etag


@pytest.mark.parametrize("path, to_status", [
    ([], "placed"),                           # to the status it already has
    ([], "shipped"),                          # skipping a step
    (["paid"], "paid"),
    (["paid"], "placed"),                     # backwards
    (["paid", "shipped"], "cancelled"),       # too late
    (["paid", "shipped"], "paid"),
    (["cancelled"], "placed"),                # nothing follows cancelled
    (["cancelled"], "cancelled"),
])
def test_every_other_move_is_409_and_changes_nothing(client, path, to_status):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    order = place(client, headers, (book["id"], 2)).json()
    boss, url = admin(client), f"{ORDERS}/{order['id']}"
    for status in path:
        assert client.patch(url, json={"status": status}, headers=boss).status_code == 200
    before, left = client.get(url, headers=boss), stock(client, book["id"])
    body = assert_problem(client.patch(url, json={"status": to_status}, headers=boss), 409,
                          f"cannot become '{to_status}'")
    assert body["errors"][0]["pointer"] == "#/status"
    after = client.get(url, headers=boss)
    assert (after.json(), after.headers["etag"]) == (before.json(), before.headers["etag"])
    assert stock(client, book["id"]) == left


@pytest.mark.parametrize("body, pointer, detail", [
    ({"status": "lost"}, "#/status", "Invalid enum value 'lost'"),
    ({}, "#/status", "Object missing required field `status`"),
    ({"status": "paid", "total_cents": 0}, "#/total_cents", "Object contains unknown field `total_cents`"),
])
def test_a_bad_move_is_400(client, body, pointer, detail):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers)
    order = place(client, headers, (book["id"], 1)).json()
    assert_bad_field(client.patch(f"{ORDERS}/{order['id']}", json=body, headers=admin(client)), pointer, detail)


def test_a_move_with_a_stale_if_match_is_412_and_changes_nothing(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    response = place(client, headers, (book["id"], 2))
    order, stale = response.json(), response.headers["etag"]
    boss, url = admin(client), f"{ORDERS}/{order['id']}"
    paid = client.patch(url, json={"status": "paid"}, headers=boss)
    assert_problem(client.patch(url, json={"status": "cancelled"}, headers={**headers, "If-Match": stale}), 412,
                   f"its ETag is now {paid.headers['etag']}")
    assert client.get(url, headers=headers).json()["status"] == "paid" and stock(client, book["id"]) == 3


# == Idempotent requests ==========================================================================


@pytest.mark.parametrize("first, again", [("k-1", "k-1"), ('"k-1"', "k-1"), ("k-1", '"k-1"'),
                                          ('"a\\"b\\\\c"', '"a\\"b\\\\c"')])
def test_an_order_sent_again_with_its_key_is_answered_again_and_placed_once(client, first, again):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    placed = place(client, headers, (book["id"], 2), key=first)
    assert placed.status_code == 201, placed.text
    assert "idempotent-replayed" not in placed.headers
    replayed = place(client, headers, (book["id"], 2), key=again)
    assert replayed.status_code == 201
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == placed.json()
    assert replayed.headers["location"] == placed.headers["location"]
    assert replayed.headers["etag"] == placed.headers["etag"]
    assert replayed.headers["content-type"] == "application/json"
    assert stock(client, book["id"]) == 3 and order_count(client) == 1


def test_a_book_sent_again_with_its_key_is_created_once(client):
    _, headers = signed_in_user(client)
    keyed = {**headers, "Idempotency-Key": "book-1"}
    created = client.post(BOOKS, json=book_fields(isbn=isbn13(1)), headers=keyed)
    again = client.post(BOOKS, json=book_fields(isbn=isbn13(1)), headers=keyed)
    assert (created.status_code, again.status_code) == (201, 201)  # not a 409 for the ISBN: a replay
    assert again.headers["idempotent-replayed"] == "true" and again.json() == created.json()
    assert [book["id"] for book in all_books(client)] == [created.json()["id"]]


def test_a_key_reused_with_another_request_is_422_and_changes_nothing(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    assert place(client, headers, (book["id"], 1), key="k").status_code == 201
    for response in (place(client, headers, (book["id"], 2), key="k"),
                     client.post(BOOKS, json=book_fields(), headers={**headers, "Idempotency-Key": "k"})):
        body = assert_problem(response, 422, "was sent before with another request")
        assert body["errors"][0]["header"] == "Idempotency-Key"
    assert stock(client, book["id"]) == 4 and order_count(client) == 1 and len(all_books(client)) == 1


def test_keys_belong_to_their_user(client):
    _, ada = signed_in_user(client)
    _, bob = signed_in_user(client)
    book = for_sale(client, ada, stock=5)
    first, second = place(client, ada, (book["id"], 1), key="same"), place(client, bob, (book["id"], 1), key="same")
    assert (first.status_code, second.status_code) == (201, 201)
    assert "idempotent-replayed" not in second.headers and first.json()["id"] != second.json()["id"]
    assert stock(client, book["id"]) == 3


def test_a_refused_request_records_nothing_so_its_key_may_be_retried(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=1)
    assert_problem(place(client, headers, (book["id"], 2), key="retry-me"), 409)
    client.patch(f"{BOOKS}/{book['id']}", json={"stock": 2}, headers=headers)
    retried = place(client, headers, (book["id"], 2), key="retry-me")
    assert retried.status_code == 201 and "idempotent-replayed" not in retried.headers
    assert stock(client, book["id"]) == 0


@pytest.mark.parametrize("value", ["", "   ", "x" * 256, "ключ", "two words", '"unclosed', '"a"b"',
                                   '"bad \\x escape"', "tab\there"])
def test_a_malformed_idempotency_key_is_400_naming_the_header(client, value):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    for response in (client.post(ORDERS, json=order_body((book["id"], 1)),
                                 headers={**headers, "Idempotency-Key": value.encode()}),
                     client.post(BOOKS, json=book_fields(), headers={**headers, "Idempotency-Key": value.encode()})):
        body = assert_problem(response, 400, "Header `Idempotency-Key`")
        assert body["errors"][0]["header"] == "Idempotency-Key"
    assert stock(client, book["id"]) == 5 and order_count(client) == 0


def test_two_idempotency_keys_in_one_request_are_400(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    response = client.post(ORDERS, json=order_body((book["id"], 1)),
                           headers=[*headers.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")])
    assert_problem(response, 400, "Header `Idempotency-Key`")
    assert order_count(client) == 0


def test_a_key_of_255_characters_is_accepted(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    assert place(client, headers, (book["id"], 1), key="~" * 255).status_code == 201


def test_keys_are_forgotten_after_the_idempotency_ttl(make_app):
    with TestClient(make_app(idempotency_ttl=1)) as client:
        _, headers = signed_in_user(client)
        book = for_sale(client, headers, stock=5)
        assert place(client, headers, (book["id"], 1), key="short-lived").status_code == 201
        time.sleep(2.1)
        later = place(client, headers, (book["id"], 2), key="short-lived")  # another body: no 422 now
        assert later.status_code == 201 and "idempotent-replayed" not in later.headers
        assert stock(client, book["id"]) == 2
        store = client.app.state.quire.store
        rows = client.portal.call(store.query, "SELECT count(*) AS n FROM idempotency_keys")
        assert rows[0]["n"] == 1  # the expired record was replaced, not kept beside the new one


def test_a_retry_whose_key_is_purged_while_it_is_claimed_is_a_new_request_not_a_500(client, monkeypatch):
    """On PostgreSQL a retry's INSERT ... DO NOTHING can meet its key in the key's last second, and
    another request's purge delete it (committed) before the retry reads the record back. The key
    is free then: the retry claims it as a new request instead of failing on a row that is gone.
    (The purge is played here inside the retry's own transaction, which SQLite's lock also allows.)"""
    _, headers = signed_in_user(client)
    keyed, body = {**headers, "Idempotency-Key": "last-second"}, book_fields()
    first = client.post(BOOKS, json=body, headers=keyed)
    assert first.status_code == 201
    claim = storage.Store.claim_key

    async def claim_with_a_purge_between(self, run, **claimed):
        async def run_then_purge(sql: str, values: dict) -> list:
            rows = await run(sql, values)
            if sql.startswith("INSERT INTO idempotency_keys") and not rows:  # met the key: now it goes
                await run("DELETE FROM idempotency_keys WHERE user_id = :user_id AND key_hash = :key_hash",
                          {"user_id": values["user_id"], "key_hash": values["key_hash"]})
            return rows
        return await claim(self, run_then_purge, **claimed)

    monkeypatch.setattr(storage.Store, "claim_key", claim_with_a_purge_between)
    retry = client.post(BOOKS, json=body, headers=keyed)
    assert retry.status_code == 201, retry.text
    assert "idempotent-replayed" not in retry.headers and retry.json()["id"] != first.json()["id"]
    monkeypatch.undo()
    again = client.post(BOOKS, json=body, headers=keyed)  # the new claim holds the key now
    assert again.headers["idempotent-replayed"] == "true" and again.json() == retry.json()


def test_expired_keys_are_purged_now_and_then_not_on_every_request(make_app):
    with TestClient(make_app(idempotency_ttl=1)) as client:
        _, headers = signed_in_user(client)
        book = for_sale(client, headers, stock=50)
        store = client.app.state.quire.store
        count = lambda: client.portal.call(store.query, "SELECT count(*) AS n FROM idempotency_keys")[0]["n"]
        for n in range(3):
            assert place(client, headers, (book["id"], 1), key=f"old-{n}").status_code == 201
        time.sleep(2.1)
        assert place(client, headers, (book["id"], 1), key="new-0").status_code == 201
        assert count() == 4, "expired keys of other requests stay until the next purge"
        time.sleep(1.1)
        store._last_purge -= 600  # as if ten minutes had passed since the last purge
        assert place(client, headers, (book["id"], 1), key="new-1").status_code == 201
        assert count() == 1, "the purge removed every expired key"


# == Orders under concurrency =====================================================================


def at_once(count: int, request: Callable[[int], Any]) -> list:
    """`request(n)` for n in range(count), all started together, each on its own thread (and so
    as its own task on the TestClient's event loop)."""
    start = threading.Barrier(count)

    def run(n: int):
        start.wait()
        return request(n)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_of_thirty_concurrent_orders_for_the_last_seven_copies_exactly_seven_succeed(client):
    _, seller = signed_in_user(client)
    book = for_sale(client, seller, stock=7)
    buyers = [signed_in_user(client)[1] for _ in range(3)]
    responses = at_once(30, lambda n: place(client, buyers[n % 3], (book["id"], 1)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201] * 7 + [409] * 23, statuses
    for response in responses:
        if response.status_code == 409:
            assert response.json()["errors"][0]["pointer"] == "#/items/0/quantity"
    assert stock(client, book["id"]) == 0 and order_count(client) == 7


def test_concurrent_orders_over_the_same_books_in_opposite_orders_neither_deadlock_nor_fail(client):
    _, headers = signed_in_user(client)
    books = [for_sale(client, headers, stock=1000)["id"] for _ in range(4)]
    responses = at_once(24, lambda n: place(client, headers, *[(book_id, 1) for book_id in
                                                               (books if n % 2 else books[::-1])]))
    assert [response.status_code for response in responses] == [201] * 24, [r.text for r in responses if
                                                                             r.status_code != 201]
    assert [stock(client, book_id) for book_id in books] == [1000 - 24] * 4


def test_of_two_concurrent_cancels_one_wins_and_the_stock_comes_back_once(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    order = place(client, headers, (book["id"], 3)).json()
    responses = at_once(2, lambda n: client.patch(f"{ORDERS}/{order['id']}", json={"status": "cancelled"},
                                                 headers=headers))
    assert sorted(response.status_code for response in responses) == [200, 409]
    assert stock(client, book["id"]) == 5


def test_of_two_concurrent_moves_from_one_status_exactly_one_wins(client):
    """Two admins move one placed order, each having read it as placed (If-Match): one to paid, one
    to cancelled. Whichever order they run in, exactly one moves it; the other changes nothing."""
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    placed = place(client, headers, (book["id"], 3))
    order, etag = placed.json(), placed.headers["etag"]
    boss = admin(client)
    targets = ["paid", "cancelled"]
    responses = at_once(2, lambda n: client.patch(f"{ORDERS}/{order['id']}", json={"status": targets[n]},
                                                 headers={**boss, "If-Match": etag}))
    assert sorted(response.status_code for response in responses) == [200, 412]
    winner = next(response for response in responses if response.status_code == 200).json()["status"]
    assert client.get(f"{ORDERS}/{order['id']}", headers=boss).json()["status"] == winner
    assert stock(client, book["id"]) == (5 if winner == "cancelled" else 2)


def test_of_two_concurrent_identical_moves_one_wins_and_the_other_is_409(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=5)
    order = place(client, headers, (book["id"], 3)).json()
    boss = admin(client)
    responses = at_once(2, lambda n: client.patch(f"{ORDERS}/{order['id']}", json={"status": "paid"},
                                                 headers=boss))
    assert sorted(response.status_code for response in responses) == [200, 409]


def test_ten_concurrent_requests_with_one_key_place_one_order(client):
    _, headers = signed_in_user(client)
    book = for_sale(client, headers, stock=50)
    responses = at_once(10, lambda n: place(client, headers, (book["id"], 2), key="once"))
    assert all(response.status_code in (201, 409) for response in responses), [r.text for r in responses]
    placed = [response for response in responses if response.status_code == 201]
    assert len({response.json()["id"] for response in placed}) == 1
    assert sum("idempotent-replayed" not in response.headers for response in placed) == 1
    assert stock(client, book["id"]) == 48 and order_count(client) == 1


def test_orders_and_cancels_killed_mid_flight_leave_the_stock_adding_up(tmp_path, database_url):
    """SIGKILL during a mix of orders and cancels; after a restart, for every book, its initial
    stock is its stock now plus the quantities of its lines in orders that are not cancelled."""
    initial = {}
    with uvicorn_server(tmp_path, database_url) as server:
        server.wait_ready()
        with httpx2.Client(base_url=server.url, timeout=10) as http:
            headers = sign_up(http)
            for n in range(5):
                book = http.post(BOOKS, json={**BOOK, "price_cents": 100, "stock": 400}, headers=headers).json()
                initial[book["id"]] = 400
        ids = list(initial)
        stop = threading.Event()

        def shop(seed: int) -> None:
            with httpx2.Client(base_url=server.url, timeout=10) as http:
                for n in itertools.count(seed):
                    if stop.is_set():
                        return
                    try:
                        lines = [(ids[(n + k) % 5], 1 + (n + k) % 3) for k in range(1 + n % 3)]
                        order = http.post(ORDERS, json=order_body(*lines), headers=headers)
                        if order.status_code == 201 and n % 2:
                            http.patch(f"{ORDERS}/{order.json()['id']}", json={"status": "cancelled"},
                                       headers=headers)
                    except httpx2.TransportError:
                        return

        threads = [threading.Thread(target=shop, args=(seed * 1000,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(timeout=10) == -signal.SIGKILL
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
    with uvicorn_server(tmp_path, database_url) as server:
        server.wait_ready()
        with httpx2.Client(base_url=server.url, timeout=10) as http:
            now = {book_id: http.get(f"{BOOKS}/{book_id}").json()["stock"] for book_id in ids}
            ordered = collections.Counter()
            url = f"{ORDERS}?limit=100"
            while url:
                page = http.get(url, headers=headers).json()
                for order in page["items"]:
                    if order["status"] != "cancelled":
                        for item in order["items"]:
                            ordered[item["book_id"]] += item["quantity"]
                url = page["next"]
    assert sum(ordered.values()) > 0, "the load placed no order before the kill"
    assert {book_id: now[book_id] + ordered[book_id] for book_id in ids} == initial

# == Problem types ================================================================================


def provoke_every_kind(client: TestClient) -> dict[str, Any]:
    """One response for each kind of problem, made through the API as a client would meet it."""
    _, headers = signed_in_user(client)
    user = register(client)
    book = for_sale(client, headers, stock=1)
    store = client.app.state.quire.store
    stale = current(client, book["id"])[1]
    client.patch(f"{BOOKS}/{book['id']}", json={"pages": 2}, headers=headers)
    order = place(client, headers, (book["id"], 1)).json()
    client.post(BOOKS, json=book_fields(), headers={**headers, "Idempotency-Key": "reused"})
    revoked = bearer(token_for(client, user["email"]))
    client.post(LOGOUT, headers=revoked)
    expired = bearer(forge(signing_key(client), claims(user["id"], exp=int(time.time()) - 120)))
    responses = {
        "validation": client.post(USERS, json={"email": "nobody"}),
        "unauthenticated": client.get(ME),
        "forbidden": client.get(USERS, headers=headers),
        "not-found": client.get(f"{BOOKS}/999999"),
        "method-not-allowed": client.put(ME, headers=headers),
        "version-mismatch": client.patch(f"{BOOKS}/{book['id']}", json={"pages": 3},
                                         headers={**headers, "If-Match": stale}),
        "too-large": client.post(BOOKS, content=b"x" * 5000, headers={**headers, **JSON_HEADERS}),
        "range-not-satisfiable": client.get("/docs/assets/swagger-ui.css", headers={"Range": "bytes=99999999-"}),
        "unsupported-media-type": client.post(BOOKS, content=b"{}", headers={**headers, "Content-Type": "text/plain"}),
        "taken": client.post(USERS, json=user_body(email=user["email"])),
        "out-of-stock": place(client, headers, (book["id"], 1)),
        "not-for-sale": place(client, headers, (999_999, 1)),
        "invalid-transition": client.patch(f"{ORDERS}/{order['id']}", json={"status": "shipped"},
                                           headers=admin(client)),
        "idempotency-key-reused": client.post(BOOKS, json=book_fields(title="Another"),
                                              headers={**headers, "Idempotency-Key": "reused"}),
        "token-expired": client.get(ME, headers=expired),
        "token-revoked": client.get(ME, headers=revoked),
        "invalid-grant": client.post(TOKEN, data={"grant_type": "password", "username": "x@example.com",
                                                  "password": "wrong password"}),
        "too-many-failed-sign-ins": [client.post(TOKEN, json={"email": "guess@example.com", "password": "nope"})
                                     for _ in range(2)][-1],
        "rate-limited": [client.post(TOKEN, json={"email": user["email"], "password": PASSWORD})
                         for _ in range(4)][-1],
    }
    for name, failure in (("internal", fail_with_internals), ("unavailable", unreachable)):
        store.get_book = failure  # an instance attribute, shadowing the method until deleted
        try:
            responses[name] = client.get(f"{BOOKS}/{book['id']}")
        finally:
            del store.get_book
    return responses


def unreachable(*args, **kwargs):
    raise storage.Unavailable("the database is away, for the test")


def test_the_readmes_table_of_problem_kinds_is_the_apis():
    """A client branches on `type` from the README's table: it must list every kind, as served."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
        rows = re.findall(r"^\| `([a-z-]+)` \| (\d{3}) \| ([^|]+?) \| ", readme.read(), re.M)
    assert sorted((name, int(status), title) for name, status, title in rows) == \
        sorted((kind.name, kind.status, kind.title) for kind in api.KINDS.values())


@pytest.mark.parametrize("prefix", ["", "/shop"])
def test_every_kind_of_problem_has_its_own_type_and_title_described_at_that_url(make_app, prefix):
    app = make_app(max_body=2000, rate_limit=1000, auth_rate_limit=7, login_failures=1)
    outer = Starlette(routes=[Mount(prefix, app=app)]) if prefix else app
    with TestClient(outer, base_url=f"http://testserver{prefix}") as client:
        client.app = app  # the helpers reach quire's store through client.app; requests go through `outer`
        responses = provoke_every_kind(client)
        assert set(responses) == set(api.KINDS), "every kind is provoked once"
        for name, response in responses.items():
            kind = api.KINDS[name]
            body = assert_problem(response, kind.status)
            assert body["type"] == f"{prefix}/problems/{name}", (name, body)
            assert body["title"] == kind.title, (name, body)
            described = client.get(f"http://testserver{body['type']}")
            assert described.status_code == 200, (name, described.text)
            assert described.json() == {"type": body["type"], "title": kind.title, "status": kind.status,
                                        "description": kind.advice}
            check_against_openapi(outer, response)
        titles = [kind.title for kind in api.KINDS.values()]
        assert len(set(titles)) == len(titles), "a title names one kind"


def test_an_unknown_kind_of_problem_is_404(client):
    assert_problem(client.get("/problems/oops"), 404, "no kind of problem called 'oops'")


def test_problem_descriptions_are_not_rate_limited(make_app):
    with TestClient(make_app(rate_limit=2)) as client:
        assert all(client.get("/problems/validation").status_code == 200 for _ in range(5))


def test_the_document_lists_every_kind_as_a_problem_type():
    for prefix in ("", "/shop"):
        schema = openapi_for(prefix)["components"]["schemas"]["Problem"]["properties"]["type"]
        assert schema["enum"] == [f"{prefix}/problems/{name}" for name in api.KINDS]


# == Query strings where none is taken =============================================================
# Every operation without query parameters of its own refuses any (the contract: unknown query
# parameters are 400), at the point of its other 400s, so 401, 404 and 403 still answer first.

NO_QUERY_REQUESTS = [  # (method, path, body); {book}, {order}, {user} are filled in
    ("POST", BOOKS, book_fields(title="Never made")),
    ("GET", f"{BOOKS}/{{book}}", None),
    ("PUT", f"{BOOKS}/{{book}}", book_fields(title="Never replaced")),
    ("PATCH", f"{BOOKS}/{{book}}", {"pages": 1}),
    ("DELETE", f"{BOOKS}/{{book}}", None),
    ("POST", "/api/v1/orders", {"items": [{"book_id": "{book}", "quantity": 1}]}),
    ("GET", "/api/v1/orders/{order}", None),
    ("PATCH", "/api/v1/orders/{order}", {"status": "cancelled"}),
    ("POST", USERS, {"email": "never@example.com", "name": "Never", "password": PASSWORD}),
    ("GET", ME, None),
    ("POST", f"{ME}/password", {"current_password": PASSWORD, "new_password": "never this one"}),
    ("GET", f"{USERS}/{{user}}", None),
    ("POST", LOGOUT, None),
    ("GET", "/healthz", None),
    ("GET", "/readyz", None),
    ("GET", "/metrics", None),
    ("GET", "/problems/validation", None),
]


def test_every_operation_without_query_parameters_refuses_one_and_does_nothing(client):
    user, headers = signed_in_user(client)
    book, etag = new_book(client, headers, price_cents=100, stock=5)
    order = client.post("/api/v1/orders", json={"items": [{"book_id": book["id"], "quantity": 1}]}, headers=headers)
    names = {"book": book["id"], "order": order.json()["id"], "user": user["id"]}
    before = current(client, book["id"])
    for method, path, body in NO_QUERY_REQUESTS:
        if body is not None:
            body = json.loads(json.dumps(body).replace('"{book}"', str(book["id"])))
        response = send(client, method, path.format(**names) + "?bogus=1", body, headers=headers)
        assert_bad_parameter(response, "bogus", "Object contains unknown field `bogus`")
    assert current(client, book["id"]) == before
    assert [item["id"] for item in client.get(BOOKS).json()["items"]] == [book["id"]]
    assert client.get(f"/api/v1/orders/{names['order']}", headers=headers).json()["status"] == "placed"
    assert client.get(ME, headers=headers).status_code == 200  # not logged out, password unchanged
    assert client.post(TOKEN, json={"email": user["email"], "password": PASSWORD}).status_code == 200
    assert_unauthorized(client.post(TOKEN, json={"email": "never@example.com", "password": PASSWORD}))
    # The list covers every operation that takes no query, but the token endpoint (next test).
    covered = {(method, re.sub(r"\{\w+\}", "{}", path)) for method, path, _ in NO_QUERY_REQUESTS}
    expected = {(op.method, re.sub(r"\{[\w:]+\}", "{}", op.path).replace("/problems/{}", "/problems/validation"))
                for op in api.OPERATIONS if op.query is None and op.handler is not api.issue_token}
    assert covered == expected


def test_the_token_endpoint_ignores_a_query_string_as_rfc_6749_says(client):
    user = register(client)
    response = client.post(f"{TOKEN}?bogus=1", json={"email": user["email"], "password": PASSWORD})
    assert response.status_code == 200 and response.json()["access_token"]


@pytest.mark.parametrize("who, method, target, status", [
    ("nobody", "POST", "orders", 401), ("nobody", "GET", "me", 401), ("owner", "GET", "missing", 404),
    ("other", "PATCH", "book", 403), ("other", "DELETE", "book", 403), ("other", "GET", "owner", 403)])
def test_a_query_parameter_where_none_is_taken_answers_after_401_404_and_403(client, who, method, target, status):
    owner, owner_headers = signed_in_user(client)
    _, other_headers = signed_in_user(client)
    book, _ = new_book(client, owner_headers)
    path = {"orders": "/api/v1/orders", "me": ME, "missing": f"{BOOKS}/424242", "book": f"{BOOKS}/{book['id']}",
            "owner": f"{USERS}/{owner['id']}"}[target]
    headers = {"nobody": {}, "owner": owner_headers, "other": other_headers}[who]
    body = {"items": [{"book_id": book["id"], "quantity": 1}]} if target == "orders" else (
        {"pages": 1} if method == "PATCH" else None)
    assert_problem(send(client, method, path + "?bogus=1", body, headers=headers), status)


# == Operations: limits, CORS, faults, durability, embedding =======================================

BOOK = {"title": "Clean Code", "author": "Robert C. Martin"}
PG_SERVER = os.environ.get("TEST_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"

# == Helpers for operations ======================================================================================


def padded(body: dict, size: int) -> bytes:
    """`body` as JSON of exactly `size` bytes (trailing whitespace is still valid JSON)."""
    text = json.dumps(body).encode()
    assert len(text) <= size
    return text + b" " * (size - len(text))


def in_chunks(data: bytes, size: int = 100) -> Iterator[bytes]:
    """A generator body: TestClient sends it chunked, without Content-Length."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


def assert_retry_after(response) -> int:
    """A Retry-After of whole seconds, at least one."""
    value = response.headers["retry-after"]
    assert re.fullmatch(r"[1-9][0-9]*", value), value
    return int(value)


def header_items(response, name: str) -> set[str]:
    """A comma-separated header's items, lower-case."""
    return {item.strip().lower() for item in response.headers.get(name, "").split(",") if item.strip()}


def limited(client: TestClient, path: str, tries: int = 100):
    """GET `path` until the rate limit answers; its 429 response."""
    for _ in range(tries):
        response = client.get(path)
        if response.status_code == 429:
            return response
    raise AssertionError(f"{path} was not limited after {tries} requests")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres_database() -> Iterator[str]:
    """The name of a new, empty PostgreSQL database, dropped afterwards."""
    name = f"quire_ops_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"', PG_SERVER))
    try:
        yield name
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', PG_SERVER))


@pytest.fixture
def other_database_url(tmp_path) -> Iterator[str]:
    """A second database, of the same kind as `database_url`."""
    if not POSTGRES:
        yield f"sqlite:///{tmp_path / 'other.db'}"
        return
    with throwaway_postgres_database() as name:
        yield POSTGRES.rsplit("/", 1)[0] + "/" + name


def poll(check: Callable[[], bool], *, timeout: float = 10, interval: float = 0.1) -> bool:
    """True as soon as `check()` is, False if it never is within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


# == Body limits and media types ==================================================================


def test_a_2000_byte_body_over_a_1000_byte_limit_is_a_413_problem_with_a_request_id(make_app):
    with TestClient(make_app(max_body=1000)) as client:
        response = client.post(USERS, content=padded(user_body(), 2000), headers=JSON_HEADERS)
        assert response.request.headers["content-length"] == "2000"
        assert_problem(response, 413, "1000")
        assert REQUEST_ID_SHAPE.fullmatch(response.headers["x-request-id"])
        assert response.headers["x-content-type-options"] == "nosniff"
        # Nothing was written.
        assert client.post(TOKEN, json={"email": "nobody@example.com", "password": PASSWORD}).status_code == 401


def test_a_declared_content_length_over_the_limit_is_refused_before_reading_a_byte(make_app):
    app = make_app(max_body=1000)
    reads, messages = 0, []

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b" " * 100, "more_body": reads < 20}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = asgi_scope("POST", USERS, "127.0.0.1")
    scope["headers"] += [(b"content-type", b"application/json"), (b"content-length", b"2000")]
    asyncio.run(app(scope, receive, send))
    assert messages[0]["status"] == 413
    assert (b"content-type", b"application/problem+json") in messages[0]["headers"]
    assert reads == 0, f"read {reads} chunks of a body whose declared length was already too large"


def test_a_chunked_2000_byte_body_over_a_1000_byte_limit_is_413_too(make_app):
    with TestClient(make_app(max_body=1000)) as client:
        response = client.post(USERS, content=in_chunks(padded(user_body(), 2000)), headers=JSON_HEADERS)
        assert "content-length" not in response.request.headers
        assert_problem(response, 413, "1000")
        assert REQUEST_ID_SHAPE.fullmatch(response.headers["x-request-id"])


def test_a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not(make_app):
    with TestClient(make_app(max_body=1000)) as client:
        exact = client.post(USERS, content=padded(user_body(), 1000), headers=JSON_HEADERS)
        assert exact.status_code == 201, exact.text
        exact_chunked = client.post(USERS, content=in_chunks(padded(user_body(), 1000)), headers=JSON_HEADERS)
        assert exact_chunked.status_code == 201, exact_chunked.text
        assert_problem(client.post(USERS, content=padded(user_body(), 1001), headers=JSON_HEADERS), 413)
        assert_problem(client.post(USERS, content=in_chunks(padded(user_body(), 1001)), headers=JSON_HEADERS), 413)


@pytest.mark.parametrize("path, content_type", [
    (USERS, "text/plain"),
    (USERS, "application/x-www-form-urlencoded"),
    (USERS, None),
    (TOKEN, "text/plain"),
    (USERS, "application/merge-patch+json"),  # only PATCH takes a merge patch
    (BOOKS, "text/plain"),  # 415 comes before 401
], ids=["text", "form", "none", "token-text", "merge-patch-on-post", "book-without-token"])
def test_a_body_that_is_not_json_is_a_415_problem(client, path, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(path, content=json.dumps(user_body()).encode(), headers=headers)
    assert_problem(response, 415, "application/json")
    assert response.headers["x-content-type-options"] == "nosniff"


# == Rate limits ==================================================================================


def test_the_sixth_request_in_a_burst_over_a_limit_of_five_is_429_with_retry_after(make_app):
    with TestClient(make_app(rate_limit=5, auth_rate_limit=2)) as client:
        statuses = [client.get(BOOKS).status_code for _ in range(5)]
        assert statuses == [200] * 5
        response = client.get(BOOKS)
        assert_problem(response, 429)
        assert 1 <= assert_retry_after(response) <= 60
        assert REQUEST_ID_SHAPE.fullmatch(response.headers["x-request-id"])
        assert response.headers["x-content-type-options"] == "nosniff"
        assert_problem(client.get(f"{BOOKS}/1"), 429)  # the limit is per client, not per path


def test_probes_and_docs_are_never_rate_limited(make_app):
    with TestClient(make_app(rate_limit=5, auth_rate_limit=2)) as client:
        limited(client, BOOKS)
        for _ in range(10):
            for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/docs/init.js",
                         "/docs/assets/swagger-ui.css"):
                response = client.get(path)
                assert response.status_code == 200, (path, response.status_code)
        assert_problem(client.get(BOOKS), 429)


def test_signing_in_is_limited_after_two_and_registering_has_a_bucket_of_its_own(make_app):
    with TestClient(make_app(rate_limit=100, auth_rate_limit=2)) as client:
        user = register(client)
        wrong = {"email": user["email"], "password": "wrong password"}
        assert [client.post(TOKEN, json=wrong).status_code for _ in range(2)] == [401, 401]
        response = client.post(TOKEN, json={"email": user["email"], "password": PASSWORD})
        assert_problem(response, 429)
        assert_retry_after(response)
        assert response.headers["cache-control"] == "no-store"
        # Registering drew on its own bucket: one used above, one left, then limited.
        assert client.post(USERS, json=user_body()).status_code == 201
        assert_problem(client.post(USERS, json=user_body()), 429)
        # The general limit is untouched by either.
        assert client.get(BOOKS).status_code == 200


def test_a_rate_limit_of_zero_turns_both_limits_off(make_app):
    # The sign-in throttle is no rate limit and stays on; here it is set high enough not to show.
    with TestClient(make_app(rate_limit=0, auth_rate_limit=1, login_failures=100)) as client:
        user = register(client)
        for _ in range(15):
            assert client.post(TOKEN, json={"email": user["email"], "password": "wrong password"}).status_code == 401
            assert client.post(USERS, json=user_body(name="")).status_code == 400
        assert all(client.get(BOOKS).status_code == 200 for _ in range(100))


def test_rate_limits_are_read_from_the_environment(database_url):
    environ = {"QUIRE_RATE_LIMIT": "3", "QUIRE_AUTH_RATE_LIMIT": "1"}
    app = api.create_app(config=api.Config(environ=environ), database_url=database_url)
    with TestClient(app) as client:
        assert client.post(USERS, json=user_body()).status_code == 201
        assert_problem(client.post(USERS, json=user_body()), 429)  # refused: spends none of the 3
        assert [client.get(BOOKS).status_code for _ in range(2)] == [200, 200]
        assert_problem(client.get(BOOKS), 429)
    off = api.create_app(config=api.Config(environ={"QUIRE_RATE_LIMIT": "0"}), database_url=database_url)
    with TestClient(off) as client:
        assert all(client.get(BOOKS).status_code == 200 for _ in range(20))


def test_retry_after_is_honest_a_request_after_waiting_it_out_is_served(make_app):
    with TestClient(make_app(rate_limit=60)) as client:  # a burst of 60, then one a second
        response = limited(client, "/api/v1/nothing", tries=61)
        wait = assert_retry_after(response)
        assert wait == 1
        time.sleep(wait + 0.05)
        assert client.get("/api/v1/nothing").status_code == 404


def test_each_client_address_has_its_own_bucket(tmp_path):
    # A 404 is counted without touching the database, so any database will do.
    app = api.create_app(config=api.Config(environ={}), database_url=f"sqlite:///{tmp_path / 'q.db'}", rate_limit=2)
    # No `with`: no lifespan is needed for a 404.
    first = TestClient(app, client=("203.0.113.1", 40000))
    second = TestClient(app, client=("203.0.113.2", 40000))
    assert [first.get("/api/v1/nothing").status_code for _ in range(3)] == [404, 404, 429]
    assert second.get("/api/v1/nothing").status_code == 404
    # The address counts, not the port.
    assert TestClient(app, client=("203.0.113.1", 40001)).get("/api/v1/nothing").status_code == 429


def test_two_apps_in_one_process_do_not_share_rate_limit_state(tmp_path):
    first, second = (api.create_app(config=api.Config(environ={}), database_url=f"sqlite:///{tmp_path / name}",
                                    rate_limit=2) for name in ("first.db", "second.db"))
    with TestClient(first) as client:
        assert [client.get("/api/v1/nothing").status_code for _ in range(3)] == [404, 404, 429]
    with TestClient(second) as client:
        assert [client.get("/api/v1/nothing").status_code for _ in range(3)] == [404, 404, 429]


def asgi_scope(method: str, path: str, address: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"host", b"testserver")], "client": (address, 50000), "server": ("testserver", 80),
            "state": {}}


def test_a_flood_of_50000_client_addresses_leaves_at_most_max_clients_buckets():
    statuses: collections.Counter = collections.Counter()

    async def ok(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] += 1

    limiter = web.RateLimitMiddleware(ok, per_minute=5, auth_per_minute=2, strict=[("POST", TOKEN)])

    async def flood() -> None:
        # Sign-in requests draw on both the general and the strict buckets.
        for n in range(50_000):
            await limiter(asgi_scope("POST", TOKEN, f"10.{n >> 16}.{n >> 8 & 255}.{n & 255}"), receive, send)
        for _ in range(6):
            await limiter(asgi_scope("GET", BOOKS, "192.0.2.1"), receive, send)

    asyncio.run(flood())
    assert statuses == {200: 50_005, 429: 1}, "each new address starts with a full bucket; the limit still works"
    for buckets in (limiter.general, limiter.strict):
        assert buckets.max_clients < 50_000
        assert len(buckets.buckets) <= buckets.max_clients


# == RateLimit fields =============================================================================


def ratelimit_fields(response) -> tuple[dict[str, dict], tuple[str, dict]]:
    """`RateLimit-Policy` and `RateLimit`, parsed as RFC 8941 structured-field Lists of Items:
    ({policy: params}, (the policy RateLimit names, its params))."""
    policies, standing = http_sfv.List(), http_sfv.List()
    policies.parse(response.headers["ratelimit-policy"].encode())
    standing.parse(response.headers["ratelimit"].encode())
    assert len(standing) == 1, response.headers["ratelimit"]
    assert all(isinstance(item.value, str) for item in [*policies, *standing])
    return ({item.value: dict(item.params) for item in policies},
            (standing[0].value, dict(standing[0].params)))


def test_every_counted_answer_says_where_the_client_stands_and_the_quota_comes_back(make_app):
    with TestClient(make_app(rate_limit=60)) as client:  # a token a second
        remaining = []
        for _ in range(3):
            response = client.get(BOOKS)
            policies, (name, params) = ratelimit_fields(response)
            assert policies == {"general": {"q": 60, "w": 60}}
            assert name == "general" and set(params) == {"r", "t"}
            remaining.append(params["r"])
            assert 1 <= params["t"] <= 60
        assert remaining == [59, 58, 57]
        time.sleep(2.1)
        _, (_, params) = ratelimit_fields(client.get(f"{BOOKS}/1"))  # a 404 counts and says so too
        assert params["r"] >= 58, params


def test_the_last_allowed_request_says_when_the_next_one_will_be(make_app):
    with TestClient(make_app(rate_limit=3)) as client:  # a token every 20 s
        last = [client.get(BOOKS) for _ in range(3)][-1]
        refused = client.get(BOOKS)
    _, (_, params) = ratelimit_fields(last)
    assert last.status_code == 200 and params["r"] == 0
    assert params["t"] >= int(refused.headers["retry-after"]) - 1 > 0  # not t=0: the next one waits


def test_the_sign_in_route_lists_both_policies_and_names_the_closer(make_app):
    with TestClient(make_app(rate_limit=100, auth_rate_limit=3)) as client:
        user = register(client)
        seen = []
        for _ in range(4):
            response = client.post(TOKEN, json={"email": user["email"], "password": PASSWORD})
            policies, standing = ratelimit_fields(response)
            assert policies == {"general": {"q": 100, "w": 60}, "auth": {"q": 3, "w": 60}}
            seen.append((response.status_code, standing))
        assert [status for status, _ in seen] == [200, 200, 200, 429]
        assert [(name, params["r"]) for _, (name, params) in seen] == [("auth", 2), ("auth", 1), ("auth", 0),
                                                                       ("auth", 0)]
        # On the 429, `t` is when the next request is allowed: Retry-After, not earlier.
        assert seen[-1][1][1]["t"] == int(response.headers["retry-after"])


def test_a_request_one_bucket_refuses_spends_nothing_from_the_other_and_the_refuser_is_named(monkeypatch):
    """On the strict routes both buckets must allow a request, and a refused request costs
    nothing: not from the bucket that refused, nor from the other. A 429's `RateLimit` names the
    bucket that refuses, with the `t` that Retry-After gives. (Driven on a clock of our own.)"""
    now = [1000.0]
    monkeypatch.setattr(web, "time", types.SimpleNamespace(monotonic=lambda: now[0]))

    async def ok(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    def run(limiter, method: str, path: str) -> tuple[int, dict[str, str]]:
        answer: dict[str, Any] = {}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer.update(status=message["status"],
                              headers={k.decode(): v.decode() for k, v in message["headers"]})
        asyncio.run(limiter(asgi_scope(method, path, "192.0.2.7"), receive, send))
        return answer["status"], answer["headers"]

    def limiter(general: int, auth: int) -> web.RateLimitMiddleware:
        return web.RateLimitMiddleware(ok, per_minute=general, auth_per_minute=auth, strict=[("POST", TOKEN)])

    # The strict bucket refuses three sign-ins: the general one still has 5 - 2 for the books.
    strict_refuses = limiter(general=5, auth=2)
    assert [run(strict_refuses, "POST", TOKEN)[0] for _ in range(5)] == [200, 200, 429, 429, 429]
    assert [run(strict_refuses, "GET", BOOKS)[0] for _ in range(4)] == [200, 200, 200, 429]

    # The general bucket refuses a sign-in: the strict one keeps its token for later.
    general_refuses = limiter(general=2, auth=1)
    assert [run(general_refuses, "GET", BOOKS)[0] for _ in range(2)] == [200, 200]
    status, headers = run(general_refuses, "POST", TOKEN)
    assert status == 429 and headers["ratelimit"] == '"general";r=0;t=30' and headers["retry-after"] == "30"
    now[0] += 30  # a general token is back (2 a minute); the strict bucket was never spent
    assert run(general_refuses, "POST", TOKEN)[0] == 200

    # The strict bucket refuses while the general one, refilled to 1.17, would be lower after a spend.
    named = limiter(general=10, auth=2)
    assert [run(named, "POST", TOKEN)[0] for _ in range(2)] + [run(named, "GET", BOOKS)[0] for _ in range(8)] \
        == [200] * 10
    now[0] += 7  # general: 7/6 = 1.17 tokens; auth: 7/30 = 0.23
    status, headers = run(named, "POST", TOKEN)
    assert status == 429 and headers["retry-after"] == "23"  # (1 - 7/30) * 30 s, rounded up
    assert headers["ratelimit"] == '"auth";r=0;t=23'


def test_uncounted_answers_and_an_app_without_limits_carry_no_ratelimit_fields(make_app):
    with TestClient(make_app(rate_limit=100)) as client:
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/problems/validation"):
            assert "ratelimit" not in client.get(path).headers, path
    with TestClient(make_app(rate_limit=0)) as client:
        response = client.get(BOOKS)
        assert "ratelimit" not in response.headers and "ratelimit-policy" not in response.headers


# == CORS =========================================================================================

ORIGIN = "https://a.example"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "PUT",
             "Access-Control-Request-Headers": "authorization, content-type, if-match, if-none-match"}
ALLOWED_HEADERS = {"authorization", "content-type", "if-match", "if-none-match", "x-request-id"}
EXPOSED_HEADERS = {"etag", "location", "link", "x-request-id", "retry-after"}


def test_cors_is_off_by_default(client):
    response = client.get(BOOKS, headers={"Origin": ORIGIN})
    assert response.status_code == 200
    assert not any(name.startswith("access-control-") for name in response.headers)
    response = client.options(f"{BOOKS}/1", headers=PREFLIGHT)
    assert_problem(response, 405)
    assert "OPTIONS" not in header_items(response, "allow") and "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("cors_origins", ["https://a.example, https://b.example",
                                          ["https://a.example", "https://b.example"]], ids=["string", "list"])
def test_a_preflight_from_a_listed_origin_allows_the_apis_headers(make_app, cors_origins):
    with TestClient(make_app(cors_origins=cors_origins)) as client:
        for origin in ("https://a.example", "https://b.example"):
            response = client.options(f"{BOOKS}/1", headers={**PREFLIGHT, "Origin": origin})
            assert response.status_code == 200, response.text
            assert response.headers["access-control-allow-origin"] == origin
            assert ALLOWED_HEADERS <= header_items(response, "access-control-allow-headers")
            assert {"get", "post", "put", "patch", "delete"} <= header_items(response, "access-control-allow-methods")
            assert "origin" in header_items(response, "vary")
            assert response.headers["x-content-type-options"] == "nosniff"


def test_a_simple_request_from_a_listed_origin_exposes_the_apis_headers(make_app):
    with TestClient(make_app(cors_origins="https://a.example, https://b.example")) as client:
        response = client.get(BOOKS, headers={"Origin": ORIGIN})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert EXPOSED_HEADERS <= header_items(response, "access-control-expose-headers")
        assert "origin" in header_items(response, "vary")


def test_an_unlisted_origin_gets_no_allow_header(make_app):
    with TestClient(make_app(cors_origins="https://a.example, https://b.example")) as client:
        for origin in ("https://evil.example", "https://a.example.evil.example", "http://a.example", "null"):
            response = client.get(BOOKS, headers={"Origin": origin})
            assert response.status_code == 200
            assert "access-control-allow-origin" not in response.headers, origin
            preflight = client.options(f"{BOOKS}/1", headers={**PREFLIGHT, "Origin": origin})
            assert_problem(preflight, 400, "The CORS preflight is refused; not allowed here: origin.")
            assert "access-control-allow-origin" not in preflight.headers, origin


def test_a_refused_preflight_is_a_problem_naming_what_is_not_allowed(make_app):
    """Starlette's CORS layer answers a refused preflight in text/plain; quire's refusals are all
    problems. The CORS headers it would have sent stay, so a browser can read the answer."""
    with TestClient(make_app(cors_origins=ORIGIN)) as client:
        asked = {**PREFLIGHT, "Access-Control-Request-Method": "TRACE", "Access-Control-Request-Headers": "x-secret"}
        response = client.options(f"{BOOKS}/1", headers=asked)
        body = assert_problem(response, 400, "The CORS preflight is refused; not allowed here: method, headers.")
        assert body["type"] == "/problems/validation"
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "origin" in header_items(response, "vary")
        assert response.headers["x-request-id"] and int(response.headers["content-length"]) == len(response.content)
        assert client.options(f"{BOOKS}/1", headers=PREFLIGHT).status_code == 200  # the allowed one still passes


def test_a_rate_limited_cross_origin_request_can_read_its_retry_after(make_app):
    with TestClient(make_app(cors_origins=ORIGIN, rate_limit=1)) as client:
        assert client.get(BOOKS, headers={"Origin": ORIGIN}).status_code == 200
        response = client.get(BOOKS, headers={"Origin": ORIGIN})
        assert_problem(response, 429)
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "retry-after" in header_items(response, "access-control-expose-headers")
        assert_retry_after(response)


def test_a_listed_origin_can_read_a_413_and_a_500_with_its_request_id(make_app, monkeypatch):
    # A browser hides any response without Access-Control-Allow-Origin from the page, so without
    # it a web client cannot show a 500's request id (what support needs) nor a 413's detail.
    with TestClient(make_app(cors_origins=ORIGIN, max_body=1000)) as client:
        monkeypatch.setattr(client.app.state.quire.store, "list_books", fail_with_internals)
        responses = {
            413: client.post(USERS, content=b"x" * 2000, headers={"Origin": ORIGIN, **JSON_HEADERS}),
            500: client.get(BOOKS, headers={"Origin": ORIGIN}),
        }
    for status, response in responses.items():
        assert_problem(response, status)
        assert response.headers.get("access-control-allow-origin") == ORIGIN, status
        assert "x-request-id" in header_items(response, "access-control-expose-headers"), status


# == Security headers =============================================================================


def test_errors_of_every_kind_say_nosniff(make_app, monkeypatch):
    with TestClient(make_app(max_body=1000, rate_limit=50)) as client:
        monkeypatch.setattr(client.app.state.quire.store, "get_book", fail_with_internals)
        responses = {
            404: client.get("/no/such/route"),
            405: client.delete(BOOKS),
            413: client.post(BOOKS, content=b"x" * 2000, headers=JSON_HEADERS),
            415: client.post(BOOKS, content=b"{}", headers={"Content-Type": "text/plain"}),
            500: client.get(f"{BOOKS}/1"),
        }
        responses[429] = limited(client, "/no/such/route")
    for status, response in responses.items():
        assert_problem(response, status)
        assert response.headers["x-content-type-options"] == "nosniff", status


def test_user_and_token_responses_say_no_store_even_when_they_fail(make_app, monkeypatch):
    with TestClient(make_app(max_body=1000, rate_limit=100, auth_rate_limit=2)) as client:
        user, headers = signed_in_user(client)
        responses = [
            client.post(USERS, content=b"x" * 2000, headers=JSON_HEADERS),          # 413
            client.post(TOKEN, content=b"{}", headers={"Content-Type": "text/plain"}),  # 415
            client.get(f"{USERS}/{user['id']}"),                                      # 401
            client.get(f"{USERS}/{user['id'] + 1}", headers=headers),                 # 403
            client.get(f"{USERS}/x", headers=headers),                                # 404
            client.put(ME, headers=headers),                                          # 405
            client.post(TOKEN, json={"email": user["email"], "password": PASSWORD}),  # 429: the third
        ]
        monkeypatch.setattr(client.app.state.quire.store, "get_token_user", fail_with_internals)
        responses.append(client.get(ME, headers=headers))                           # 500
    assert [r.status_code for r in responses] == [413, 415, 401, 403, 404, 405, 429, 500]
    for response in responses:
        assert response.headers.get("cache-control") == "no-store", (response.request.url, response.status_code)


def test_docs_forbid_framing_with_a_content_security_policy(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = {directive.strip().split(" ", 1)[0]: directive.strip()
              for directive in response.headers["content-security-policy"].split(";")}
    assert policy["frame-ancestors"] == "frame-ancestors 'none'"
    assert "default-src" in policy
    assert "'unsafe-inline'" not in policy.get("script-src", "script-src")
    assert response.headers["x-content-type-options"] == "nosniff"


# == Faults =======================================================================================


def fail_with_internals(*args, **kwargs):
    raise RuntimeError("secret internals")


class Records(logging.Handler):
    """Collects what the `quire` logger writes, as parsed JSON lines."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


def test_an_unexpected_exception_is_a_500_naming_the_request_id_and_the_traceback_is_logged(client, monkeypatch):
    monkeypatch.setattr(client.app.state.quire.store, "list_books", fail_with_internals)
    records = Records()
    logging.getLogger("quire").addHandler(records)
    try:
        response = client.get(BOOKS)
    finally:
        logging.getLogger("quire").removeHandler(records)
    body = assert_problem(response, 500)
    request_id = response.headers["x-request-id"]
    assert body["request_id"] == request_id
    assert set(body) == {"type", "title", "status", "detail", "request_id"}
    for internal in ("secret internals", "Traceback", "RuntimeError", "store.py", "api.py", "list_books"):
        assert internal not in response.text
    errors = [line for line in records.lines if "error" in line]
    assert len(errors) == 1 and errors[0]["request_id"] == request_id
    assert "Traceback (most recent call last)" in errors[0]["error"]
    assert "RuntimeError: secret internals" in errors[0]["error"]
    request_lines = [line for line in records.lines if line.get("request_id") == request_id and "status" in line]
    assert [line["status"] for line in request_lines] == [500]
    monkeypatch.undo()
    assert client.get(BOOKS).status_code == 200


def test_a_client_that_leaves_mid_body_is_logged_and_counted_as_499_not_as_a_500(make_app):
    """The connection closes while the body is being read (uvicorn then sends `http.disconnect`):
    nothing went wrong in the app, so no traceback and no 500, and there is nobody to answer."""
    app = make_app()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": USERS, "raw_path": USERS.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": {}}
    messages = iter([{"type": "http.request", "body": b'{"email": "ada@exa', "more_body": True},
                     {"type": "http.disconnect"}])
    sent = []

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    with logged_lines() as lines:
        asyncio.run(app(scope, receive, send))
    assert sent == []
    assert [line for line in lines if "error" in line] == []
    assert [(line["path"], line["status"]) for line in lines] == [(USERS, 499)]
    with TestClient(app) as client:
        samples = scrape(client)
    assert value(samples, "http_requests_total", method="POST", route=USERS, status="499") == 1
    assert value(samples, "http_requests_total", method="POST", route=USERS, status="500") is None


class Relay:
    """A TCP relay from a local port to PostgreSQL: a database link a test can cut and restore
    without touching the server, which other suites may be using."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._accepting.start()

    def stop(self) -> None:
        """Stop listening (new connections are refused) and cut every open connection."""
        listener, self._listener = self._listener, None
        if listener is not None:
            self._accepting.join(timeout=5)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                downstream, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                downstream.close()
                continue
            downstream.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {downstream, upstream}
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def relayed_postgres() -> Iterator[tuple[Relay, str]]:
    """A not yet started relay to PostgreSQL and the URL of a new database through it."""
    host, port = re.search(r"@([^:/]+):?(\d*)/", PG_SERVER).groups()
    relay = Relay((host, int(port or 5432)))
    with throwaway_postgres_database() as name:
        try:
            yield relay, f"postgresql://postgres@127.0.0.1:{relay.port}/{name}"
        finally:
            relay.stop()


def assert_unavailable(response) -> None:
    assert_problem(response, 503)
    assert_retry_after(response)
    assert response.headers["x-content-type-options"] == "nosniff"


def test_when_the_database_goes_away_and_comes_back_the_same_app_recovers(make_app, relayed_postgres):
    relay, url = relayed_postgres
    relay.start()
    with TestClient(make_app(database_url=url)) as client:
        assert client.get("/readyz").status_code == 200
        _, headers = signed_in_user(client)
        created = client.post(BOOKS, json=BOOK, headers=headers)
        assert created.status_code == 201, created.text

        relay.stop()
        assert_unavailable(client.get("/readyz"))
        assert_unavailable(client.get(BOOKS))
        assert_unavailable(client.post(BOOKS, json=BOOK, headers=headers))
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200

        relay.start()
        assert poll(lambda: client.get("/readyz").status_code == 200), "no recovery within 10 s"
        response = client.get(BOOKS)
        assert response.status_code == 200 and [book["id"] for book in response.json()["items"]] == [
            created.json()["id"]]
        assert client.post(BOOKS, json=BOOK, headers=headers).status_code == 201  # the same token still works


def test_an_app_started_while_the_database_is_down_serves_once_it_comes_up(make_app, relayed_postgres):
    relay, url = relayed_postgres
    with TestClient(make_app(database_url=url)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/docs").status_code == 200
        assert_unavailable(client.get("/readyz"))
        assert_unavailable(client.get(BOOKS))
        assert_unavailable(client.post(USERS, json=user_body()))

        relay.start()
        assert poll(lambda: client.get("/readyz").status_code == 200), "no connection within 10 s"
        _, headers = signed_in_user(client)
        assert client.post(BOOKS, json=BOOK, headers=headers).status_code == 201
        assert len(client.get(BOOKS).json()["items"]) == 1


@pytest.mark.parametrize("error", [asyncpg.AdminShutdownError, asyncpg.CrashShutdownError,
                                   asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError])
def test_postgresql_shutting_down_starting_or_out_of_connections_is_a_503_not_a_500(make_app, monkeypatch, error):
    """What PostgreSQL answers a query in a restart (57P01-57P03) or when its connections are all
    taken (53300) is a reason to retry, as a lost connection is."""
    with throwaway_postgres_database() as name, \
            TestClient(make_app(database_url=PG_SERVER.rsplit("/", 1)[0] + "/" + name)) as client:
        _, headers = signed_in_user(client)
        book, _ = new_book(client, headers)

        async def refuse(*args, **kwargs):
            raise error("the database system is shutting down")

        with monkeypatch.context() as patch:
            patch.setattr(storage.Store, "_postgres", staticmethod(refuse))
            assert_unavailable(client.get(f"{BOOKS}/{book['id']}"))
        assert client.get(f"{BOOKS}/{book['id']}").json() == book


def test_a_sqlite_write_lock_held_past_the_busy_timeout_is_a_503_and_reads_go_on(tmp_path):
    """Another process (here a plain sqlite3 connection) holds SQLite's write lock for longer
    than the 5 s busy timeout: the write is answered 503 with Retry-After, not a 500, reads are
    served meanwhile (WAL), and once the lock is gone the same write succeeds."""
    path = tmp_path / "locked.db"
    app = api.create_app(config=api.Config(environ={}), database_url=f"sqlite:///{path}", rate_limit=0)
    with TestClient(app) as client:
        _, headers = signed_in_user(client)
        book, _ = new_book(client, headers)
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            assert_unavailable(client.post(BOOKS, json=book_fields(title="Blocked"), headers=headers))
            assert time.monotonic() - started >= 4.5  # it waited for the busy timeout first
            assert client.get(f"{BOOKS}/{book['id']}").json() == book
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert [item["title"] for item in client.get(BOOKS).json()["items"]] == ["Clean Code"]
        assert client.post(BOOKS, json=book_fields(title="Blocked"), headers=headers).status_code == 201


def sent_while_another_process_briefly_holds_the_write_lock(path: Path, client: TestClient, book: dict,
                                                            send: Callable[[], Any]) -> Any:
    """`send()`'s response, sent while another process (a plain sqlite3 connection) holds SQLite's
    write lock for 0.5 s: it waits for the lock, not for the 5 s busy timeout, and the loop serves
    reads meanwhile."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.5, lambda: other.execute("ROLLBACK"))
    release.start()
    try:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(send)
            time.sleep(0.2)
            assert client.get(f"{BOOKS}/{book['id']}").json() == book  # the loop is not stopped
            assert not waiting.done()
            response = waiting.result()
        assert 0.4 <= time.monotonic() - started < 4.5  # it waited for the lock, not for the timeout
        return response
    finally:
        release.join()
        other.close()


def test_a_write_while_another_process_briefly_holds_sqlites_write_lock_waits_for_it(tmp_path):
    """Single writes run on the event loop's own connection, which never waits for a lock with the
    loop stopped: while another process writes, the statement goes to the writer's thread and
    waits there (the busy timeout)."""
    path = tmp_path / "briefly-locked.db"
    app = api.create_app(config=api.Config(environ={}), database_url=f"sqlite:///{path}", rate_limit=0)
    with TestClient(app) as client:
        _, headers = signed_in_user(client)
        book, _ = new_book(client, headers)
        response = sent_while_another_process_briefly_holds_the_write_lock(
            path, client, book, lambda: client.post(BOOKS, json=book_fields(title="Waited"), headers=headers))
        assert response.status_code == 201, response.text
        with contextlib.closing(sqlite3.connect(path)) as reader:
            assert reader.execute("SELECT title FROM books WHERE id = ?", (response.json()["id"],)).fetchall() \
                == [("Waited",)]


def test_a_transaction_while_another_process_briefly_holds_sqlites_write_lock_waits_for_it(tmp_path):
    """Transactions run on the loop's connection too; one whose BEGIN finds the lock taken runs on
    the writer's thread instead, waits there, and commits."""
    path = tmp_path / "briefly-locked-order.db"
    app = api.create_app(config=api.Config(environ={}), database_url=f"sqlite:///{path}", rate_limit=0)
    with TestClient(app) as client:
        _, headers = signed_in_user(client)
        book, _ = new_book(client, headers, price_cents=250, stock=3)
        response = sent_while_another_process_briefly_holds_the_write_lock(
            path, client, book, lambda: place(client, headers, (book["id"], 2)))
        assert response.status_code == 201, response.text
        assert response.json()["total_cents"] == 500
        assert stock(client, book["id"]) == 1
        assert place(client, headers, (book["id"], 1)).status_code == 201  # and the next one, on the loop
        with contextlib.closing(sqlite3.connect(path)) as reader:  # committed: another connection sees both
            assert reader.execute("SELECT stock FROM books WHERE id = ?", (book["id"],)).fetchall() == [(0,)]


def test_a_write_cancelled_while_waiting_for_sqlites_write_lock_leaves_the_writer_usable(tmp_path):
    """A request cancelled (a shutdown's grace period running out, a parent app's timeout) while
    its BEGIN IMMEDIATE waits for another process's lock must not leave SQLite's one writer inside
    that transaction: the BEGIN still finishes in aiosqlite's thread, and without a ROLLBACK after
    it every later order would fail and every later write would stay uncommitted."""
    path = tmp_path / "cancelled.db"
    app = api.create_app(config=api.Config(environ={}), database_url=f"sqlite:///{path}", rate_limit=0)
    with TestClient(app) as client:
        _, headers = signed_in_user(client)
        book, _ = new_book(client, headers, price_cents=100, stock=5)
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")

        async def cancel_a_waiting_transaction() -> None:
            async def empty_the_shelf() -> None:
                async with app.state.quire.store.transaction() as run:
                    await run("UPDATE books SET stock = 0", {})
            task = asyncio.create_task(empty_the_shelf())
            await asyncio.sleep(0.3)  # its BEGIN IMMEDIATE is waiting for `other`'s lock
            task.cancel()
            other.execute("ROLLBACK")  # the lock is free: the BEGIN goes through in aiosqlite's thread
            with pytest.raises(asyncio.CancelledError):
                await task

        try:
            client.portal.call(cancel_a_waiting_transaction)
        finally:
            other.close()
        assert place(client, headers, (book["id"], 1)).status_code == 201  # an order is a transaction
        after, _ = new_book(client, headers, title="After")
        with contextlib.closing(sqlite3.connect(path)) as reader:  # committed: another connection sees it
            assert reader.execute("SELECT title FROM books WHERE id = ?", (after["id"],)).fetchall() == [("After",)]
            assert reader.execute("SELECT stock FROM books WHERE id = ?", (book["id"],)).fetchall() == [(4,)]


# == Durability: real server processes ============================================================


@dataclasses.dataclass
class Server:
    process: subprocess.Popen
    url: str
    port: int
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        """Until /readyz answers 200; fails at once if the server died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited ({self.process.returncode}):\n{self.log()}"
            with contextlib.suppress(httpx2.TransportError):
                if httpx2.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"not ready within {timeout} s:\n{self.log()}")


@contextlib.contextmanager
def uvicorn_server(tmp_path: Path, database_url: str, *options: str, environment: dict[str, str] | None = None,
                   launcher: list[str] = (), stdout: Path | None = None) -> Iterator[Server]:
    """`python -m uvicorn api:app` (after `launcher`, if given) in a process group of its own,
    killed with its workers afterwards."""
    port = free_port()
    environ = {name: value for name, value in os.environ.items()
               if not name.startswith(("QUIRE_", "OTEL_", "PROMETHEUS_")) and name != "DATABASE_URL"}
    environ.update(DATABASE_URL=database_url, QUIRE_RATE_LIMIT="0", **(environment or {}))
    stderr = tmp_path / f"uvicorn-{port}.log"
    with open(stderr, "wb") as errors, open(stdout or os.devnull, "wb") as output:
        process = subprocess.Popen(
            [*launcher, sys.executable, "-m", "uvicorn", "api:app", "--host", "127.0.0.1", "--port", str(port),
             *options], cwd=HERE, env=environ, stdout=output, stderr=errors, start_new_session=True)
    try:
        yield Server(process, f"http://127.0.0.1:{port}", port, stderr)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # the group: workers too
            process.wait(timeout=10)


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def sign_up(http: httpx2.Client) -> dict[str, str]:
    """Register a new user on a live server and return headers that sign its requests in."""
    email = f"ops-{uuid.uuid4().hex[:8]}@example.com"
    assert http.post(USERS, json={"email": email, "name": "Ops", "password": PASSWORD}).status_code == 201
    response = http.post(TOKEN, json={"email": email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return bearer(response.json()["access_token"])


def test_fifty_books_answered_201_survive_a_sigkill_right_after(tmp_path):
    # Always SQLite: this is about its journal (WAL with synchronous=NORMAL), whatever the pass.
    database = f"sqlite:///{tmp_path / 'quire.db'}"
    with uvicorn_server(tmp_path, database) as server:
        server.wait_ready()
        with httpx2.Client(base_url=server.url, timeout=10) as http:
            headers = sign_up(http)
            created = []
            for n in range(50):
                response = http.post(BOOKS, json={"title": f"Book {n}", "author": "Ada"}, headers=headers)
                assert response.status_code == 201, response.text
                created.append(response.json())
        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(timeout=10) == -signal.SIGKILL
    with uvicorn_server(tmp_path, database) as server:
        server.wait_ready()
        with httpx2.Client(base_url=server.url, timeout=10) as http:
            for book in created:
                response = http.get(f"{BOOKS}/{book['id']}")
                assert response.status_code == 200 and response.json() == book
            assert http.get(BOOKS, params={"limit": 100}).json()["items"] == created
            # The generated key was kept in the database too: the token from before still works.
            assert http.post(BOOKS, json=BOOK, headers=headers).status_code == 201


def test_three_workers_on_a_fresh_database_start_cleanly_and_serve(tmp_path, database_url):
    with uvicorn_server(tmp_path, database_url, "--workers", "3") as server:
        server.wait_ready()
        assert poll(lambda: server.log().count("Application startup complete.") == 3, timeout=20), server.log()
        # New connections each, so that the requests spread over the workers.
        for _ in range(30):
            assert httpx2.get(server.url + "/readyz", timeout=5).status_code == 200
        with httpx2.Client(base_url=server.url, timeout=10, headers={"Connection": "close"}) as http:
            headers = sign_up(http)
            ids = [http.post(BOOKS, json=BOOK, headers=headers).json()["id"] for _ in range(6)]
            assert [book["id"] for book in http.get(BOOKS).json()["items"]] == ids
            assert all(http.get(ME, headers=headers).status_code == 200 for _ in range(6))
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=20)
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log
    requests = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert requests and all(line.get("status", 200) < 500 and "error" not in line for line in requests), log


def test_a_request_in_flight_at_sigterm_is_finished_before_the_server_exits(tmp_path, database_url):
    with uvicorn_server(tmp_path, database_url, "--timeout-graceful-shutdown", "10") as server:
        server.wait_ready()
        body = json.dumps(user_body(email="slow@example.com")).encode()
        head = (f"POST {USERS} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as connection:
            connection.sendall(head + body[:10])
            time.sleep(0.2)
            server.process.send_signal(signal.SIGTERM)
            # The server has begun shutting down: it soon stops taking new connections.
            assert poll(lambda: refuses_connections(server.port), timeout=5), "still listening after SIGTERM"
            rest = body[10:]
            for start in range(0, len(rest), len(rest) // 5 + 1):  # the rest, dribbled over ~0.5 s
                connection.sendall(rest[start:start + len(rest) // 5 + 1])
                time.sleep(0.1)
            reply = b""
            while chunk := connection.recv(65536):
                reply += chunk
        returncode = server.process.wait(timeout=15)
    status_line, _, rest = reply.partition(b"\r\n")
    raw_headers, _, payload = rest.partition(b"\r\n\r\n")
    headers = dict(line.decode().lower().split(": ", 1) for line in raw_headers.split(b"\r\n"))
    assert status_line == b"HTTP/1.1 201 Created", reply
    assert int(headers["content-length"]) == len(payload)
    assert json.loads(payload)["email"] == "slow@example.com"
    # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly, so a clean exit is
    # "terminated by SIGTERM", not 0 (a crash would be 1, a forced one SIGKILL).
    assert returncode in (0, -signal.SIGTERM), (returncode, server.log())
    assert "Traceback" not in server.log() and "ERROR" not in server.log(), server.log()


# == Metrics ======================================================================================
# /metrics is read as Prometheus reads it: prometheus-client's own parser turns the text into samples.

BOOK_ROUTE = "/api/v1/books/{id:int}"


def scrape(client) -> dict[tuple[str, tuple], float]:
    """Every sample of a GET /metrics, by (name, sorted labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def series(samples: dict, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


@contextlib.contextmanager
def logged_lines() -> Iterator[list[dict]]:
    """The JSON lines the `quire` logger writes meanwhile."""
    records = Records()
    logging.getLogger("quire").addHandler(records)
    try:
        yield records.lines
    finally:
        logging.getLogger("quire").removeHandler(records)


def test_requests_are_counted_exactly_by_method_route_template_and_status(client):
    _, headers = signed_in_user(client)
    book, _ = new_book(client, headers)
    for _ in range(3):
        assert client.get(f"{BOOKS}/{book['id']}").status_code == 200
    assert client.get(f"{BOOKS}/999999").status_code == 404
    assert client.patch(f"{BOOKS}/{book['id']}", json={"title": "T"}, headers=headers).status_code == 200
    samples = scrape(client)
    assert value(samples, "http_requests_total", method="GET", route=BOOK_ROUTE, status="200") == 3
    assert value(samples, "http_requests_total", method="GET", route=BOOK_ROUTE, status="404") == 1
    assert value(samples, "http_requests_total", method="PATCH", route=BOOK_ROUTE, status="200") == 1
    assert value(samples, "http_requests_total", method="POST", route=BOOKS, status="201") == 1
    assert value(samples, "http_requests_total", method="POST", route=TOKEN, status="200") == 1
    assert value(samples, "http_requests_total", method="GET", route="/metrics", status="200") is None  # not yet
    assert scrape(client)[("http_requests_total", (("method", "GET"), ("route", "/metrics"), ("status", "200")))] == 1


def test_a_hundred_ids_and_fifty_unknown_paths_leave_a_small_label_set(client):
    for book_id in range(1, 101):
        assert client.get(f"{BOOKS}/{book_id}").status_code == 404
    for _ in range(50):
        assert client.get(f"/scan/{uuid.uuid4().hex}/admin.php").status_code == 404
    assert client.request("BREW", BOOKS).status_code == 405  # a made-up method is "other"
    samples = scrape(client)
    labels = series(samples, "http_requests_total")
    assert sorted(labels, key=lambda label: label["route"]) == [
        {"method": "other", "route": BOOKS, "status": "405"},
        {"method": "GET", "route": BOOK_ROUTE, "status": "404"},
        {"method": "GET", "route": "<unmatched>", "status": "404"}]
    assert value(samples, "http_requests_total", method="GET", route=BOOK_ROUTE, status="404") == 100
    assert value(samples, "http_requests_total", method="GET", route="<unmatched>", status="404") == 50
    text = client.get("/metrics").text
    assert "/scan/" not in text and "/api/v1/books/7" not in text and "BREW" not in text


def test_the_latency_histogram_has_buckets_for_a_fast_api_and_counts_each_request(client, monkeypatch):
    for _ in range(4):
        client.get(f"{BOOKS}/1")
    get_book = client.app.state.quire.store.get_book

    async def slow_get_book(*args, **kwargs):
        await asyncio.sleep(0.03)
        return await get_book(*args, **kwargs)

    monkeypatch.setattr(client.app.state.quire.store, "get_book", slow_get_book)
    client.get(f"{BOOKS}/1")
    samples = scrape(client)
    route = {"method": "GET", "route": BOOK_ROUTE}
    buckets = {labels["le"]: value(samples, "http_request_duration_seconds_bucket", **labels)
               for labels in series(samples, "http_request_duration_seconds_bucket") if labels["route"] == BOOK_ROUTE}
    assert list(buckets) == ["0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
                             "0.1", "0.25", "0.5", "1.0", "+Inf"]
    counts = list(buckets.values())
    assert counts == sorted(counts), "buckets are cumulative"
    assert buckets["+Inf"] == value(samples, "http_request_duration_seconds_count", **route) == 5
    assert buckets["0.025"] <= 4 and buckets["0.25"] == 5  # the slow one is over 25 ms
    assert 0.03 < value(samples, "http_request_duration_seconds_sum", **route) < 5 * 0.25


def test_the_in_flight_gauge_counts_requests_being_answered_and_returns_to_zero(client, monkeypatch):
    release = threading.Event()
    get_book = client.app.state.quire.store.get_book

    async def held_get_book(*args, **kwargs):
        while not release.is_set():
            await asyncio.sleep(0.005)
        return await get_book(*args, **kwargs)

    monkeypatch.setattr(client.app.state.quire.store, "get_book", held_get_book)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        held = [pool.submit(client.get, f"{BOOKS}/1") for _ in range(3)]
        assert poll(lambda: value(scrape(client), "http_requests_in_flight") == 4)  # three held and the scrape
        release.set()
        assert [future.result().status_code for future in held] == [404] * 3
    assert value(scrape(client), "http_requests_in_flight") == 1  # the scrape alone


def test_the_shops_counters_move_when_an_order_is_placed_or_refused_and_a_sign_in_fails(client):
    _, headers = signed_in_user(client)
    zero = scrape(client)
    assert value(zero, "quire_orders_placed_total") == 0
    assert value(zero, "quire_orders_refused_total", kind="out-of-stock") == 0
    assert value(zero, "quire_orders_refused_total", kind="not-for-sale") == 0
    assert value(zero, "quire_sign_in_failures_total") == 0
    book = for_sale(client, headers, stock=2)
    unpriced, _ = new_book(client, headers)
    assert place(client, headers, (book["id"], 1), key="k-1").status_code == 201
    assert place(client, headers, (book["id"], 1), key="k-1").headers["idempotent-replayed"] == "true"
    assert place(client, headers, (book["id"], 1)).status_code == 201
    assert place(client, headers, (book["id"], 1)).status_code == 409  # none left
    assert place(client, headers, (unpriced["id"], 1)).status_code == 409
    assert place(client, headers, (unpriced["id"], 1)).status_code == 409
    email = client.get(ME, headers=headers).json()["email"]
    assert fail_sign_in(client, email).status_code == 401
    assert fail_sign_in(client, "nobody@example.com").status_code == 401
    wrong = {"current_password": "wrong password", "new_password": "a new long password"}
    assert client.post(PASSWORD_URL, json=wrong, headers=headers).status_code == 403
    samples = scrape(client)
    assert value(samples, "quire_orders_placed_total") == 2  # the replay placed nothing
    assert value(samples, "quire_orders_refused_total", kind="out-of-stock") == 1
    assert value(samples, "quire_orders_refused_total", kind="not-for-sale") == 2
    assert value(samples, "quire_sign_in_failures_total") == 3


def test_answers_given_before_routing_are_counted_under_their_route(make_app):
    with TestClient(make_app(rate_limit=2, max_body=100)) as client:
        statuses = [client.get(f"{BOOKS}/1").status_code for _ in range(3)]
        assert statuses == [404, 404, 429]
        too_large = client.post(BOOKS, content=b"{" + b" " * 200 + b"}", headers={"Content-Type": "application/json"})
        assert too_large.status_code == 413  # refused on its Content-Length, before the rate limit or the router
        samples = scrape(client)
    assert value(samples, "http_requests_total", method="GET", route=BOOK_ROUTE, status="429") == 1
    assert value(samples, "http_requests_total", method="POST", route=BOOKS, status="413") == 1
    assert series(samples, "http_requests_total") and all(
        labels["route"] != "<unmatched>" for labels in series(samples, "http_requests_total"))


def test_metrics_are_not_rate_limited_and_are_served_with_the_database_down(make_app):
    with TestClient(make_app(rate_limit=1, database_url="postgresql://postgres@127.0.0.1:1/nope")) as client:
        for _ in range(10):
            response = client.get("/metrics")
            assert response.status_code == 200 and "ratelimit" not in response.headers
        assert_problem(client.get("/readyz"), 503)
        assert_problem(client.get(BOOKS), 503)  # the one request the limit allows: the scrapes spent none
        assert_problem(client.get(BOOKS), 429)
        samples = scrape(client)
    assert value(samples, "http_requests_total", method="GET", route="/readyz", status="503") == 1
    assert value(samples, "http_requests_total", method="GET", route="/metrics", status="200") == 10


def test_two_apps_in_one_process_count_only_their_own_requests(tmp_path):
    first = api.create_app(config=api.Config(environ={}), database_url=f"sqlite:///{tmp_path / 'a.db'}")
    second = api.create_app(config=api.Config(environ={}), database_url=f"sqlite:///{tmp_path / 'b.db'}")
    with TestClient(first) as one, TestClient(second) as other:
        for _ in range(3):
            one.get(BOOKS)
        other.get(BOOKS)
        assert value(scrape(one), "http_requests_total", method="GET", route=BOOKS, status="200") == 3
        assert value(scrape(other), "http_requests_total", method="GET", route=BOOKS, status="200") == 1


def counts_by_file(directory: Path, route: str) -> dict[str, float]:
    """Each worker's count of 200s on `route`, read from its own counter file in the multiprocess directory."""
    counts = {}
    for path in directory.glob("counter_*.db"):
        alone = directory.parent / f"alone-{path.stem}"
        alone.mkdir(exist_ok=True)
        shutil.copy(path, alone / path.name)
        registry = prometheus_client.CollectorRegistry()
        prometheus_client.multiprocess.MultiProcessCollector(registry, path=str(alone))
        counts[path.stem] = registry.get_sample_value(
            "http_requests_total", {"method": "GET", "route": route, "status": "200"}) or 0
        shutil.rmtree(alone)
    return counts


def test_two_workers_with_a_multiprocess_directory_are_summed_on_metrics(tmp_path, database_url):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    with uvicorn_server(tmp_path, database_url, "--workers", "2",
                        environment={"PROMETHEUS_MULTIPROC_DIR": str(directory)}) as server:
        server.wait_ready()
        made = 0
        with httpx2.Client(base_url=server.url, timeout=10, headers={"Connection": "close"}) as http:
            # Sixteen new connections at a time, until each worker has answered some.
            while made < 800 and (made < 48 or len([n for n in counts_by_file(directory, "/healthz").values() if n]) < 2):
                assert at_once(16, lambda _: http.get("/healthz").status_code) == [200] * 16
                made += 16
            per_worker = counts_by_file(directory, "/healthz")
            assert len(per_worker) == 2 and all(per_worker.values()), per_worker
            assert sum(per_worker.values()) == made
            for _ in range(10):  # whichever worker answers the scrape, it reports both
                response = http.get("/metrics")
                samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                           for family in text_string_to_metric_families(response.text) for s in family.samples}
                assert value(samples, "http_requests_total", method="GET", route="/healthz", status="200") == made
                assert value(samples, "http_requests_in_flight") == 1


# == Trace context ================================================================================
# W3C Trace Context: `traceparent` in, `traceresponse` out (Level 2), the trace id in the log line.

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACERESPONSE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[0-3])")


def traced(response) -> tuple[str, str, str]:
    match = TRACERESPONSE.fullmatch(response.headers["traceresponse"])
    assert match, response.headers["traceresponse"]
    return match.groups()


def test_a_traceparent_continues_its_trace_in_the_log_and_the_traceresponse(client):
    with logged_lines() as lines:
        response = client.get(BOOKS, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert response.status_code == 200
    trace_id, span_id, flags = traced(response)
    assert (trace_id, flags) == (TRACE_ID, "01") and span_id not in (PARENT_ID, "0" * 16)
    [line] = [line for line in lines if line.get("path") == BOOKS]
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, span_id)
    unsampled = client.get(BOOKS, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    assert traced(unsampled)[0::2] == (TRACE_ID, "00")
    later = client.get(BOOKS, headers={"traceparent": f"cc-{TRACE_ID}-{PARENT_ID}-01-a-future-field"})
    assert traced(later)[0] == TRACE_ID  # a later version is read as far as version 00 goes


def test_without_a_traceparent_each_request_starts_a_trace_of_its_own(client):
    with logged_lines() as lines:
        responses = [client.get(BOOKS) for _ in range(3)]
    ids = [traced(response) for response in responses]
    # Not sampled (no tracer records it); the trace id is random (Level 2's flag 02).
    assert len({trace_id for trace_id, _, _ in ids}) == 3 and all(flags == "02" for _, _, flags in ids)
    assert [line["trace_id"] for line in lines if line.get("path") == BOOKS] == [trace_id for trace_id, _, _ in ids]


@pytest.mark.parametrize("traceparent", [
    f"00-{TRACE_ID}-{PARENT_ID}",  # no flags
    f"00-{TRACE_ID}-{PARENT_ID}-01-extra",  # version 00 has nothing after the flags
    f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # upper case
    f"ff-{TRACE_ID}-{PARENT_ID}-01",  # the forbidden version
    f"00-{'0' * 32}-{PARENT_ID}-01",  # an all-zero trace id
    f"00-{TRACE_ID}-{'0' * 16}-01",  # an all-zero parent id
    f"00-{TRACE_ID}-{PARENT_ID}-0g",
    f"cc-{TRACE_ID}-{PARENT_ID}-01x",  # a later version, but no dash after the flags
    f" 00-{TRACE_ID}-{PARENT_ID}-01",
    "", "garbage", "00-" + "é" * 40])
def test_a_malformed_traceparent_is_ignored_never_an_error_never_echoed(client, traceparent):
    response = client.get(BOOKS, headers=[("traceparent", traceparent.encode())])
    assert response.status_code == 200
    trace_id, _, flags = traced(response)
    assert trace_id != TRACE_ID.lower() and flags == "02"


def test_two_traceparent_headers_are_ignored(client):
    response = client.get(BOOKS, headers=[("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),
                                          ("traceparent", f"00-{'1' * 32}-{PARENT_ID}-01")])
    assert response.status_code == 200 and traced(response)[0] not in (TRACE_ID, "1" * 32)


def test_a_cross_origin_client_may_send_traceparent_and_read_traceresponse(make_app):
    with TestClient(make_app(cors_origins="https://shop.example")) as client:
        preflight = client.options(BOOKS, headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "GET",
                                                   "Access-Control-Request-Headers": "traceparent"})
        assert preflight.status_code == 200 and "traceparent" in header_items(preflight, "access-control-allow-headers")
        response = client.get(BOOKS, headers={"Origin": "https://shop.example"})
        assert "traceresponse" in header_items(response, "access-control-expose-headers")


def test_under_the_opentelemetry_sdk_each_request_is_a_server_span_named_by_its_route_with_quires_ids(make_app):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = make_app()
    StarletteInstrumentor.instrument_app(app, tracer_provider=provider)
    with TestClient(app) as client, logged_lines() as lines:
        _, headers = signed_in_user(client)
        book, _ = new_book(client, headers)
        exporter.clear()
        lines.clear()
        responses = [client.get(f"{BOOKS}/{book['id']}", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}),
                     client.get(f"{BOOKS}/{book['id']}"), client.get("/no/such/path")]
    servers = [span for span in exporter.get_finished_spans() if span.kind is SpanKind.SERVER]
    assert [span.name for span in servers] == [f"GET {BOOK_ROUTE}", f"GET {BOOK_ROUTE}", "GET"]
    logged = [line for line in lines if "status" in line]
    for span, response, line in zip(servers, responses, logged, strict=True):
        trace_id, span_id, flags = traced(response)
        assert (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}") == (trace_id, span_id)
        assert (line["trace_id"], line["span_id"]) == (trace_id, span_id)
        assert int(flags, 16) & 1  # the SDK sampled it
    assert f"{servers[0].context.trace_id:032x}" == TRACE_ID
    assert f"{servers[0].parent.span_id:016x}" == PARENT_ID
    assert f"{servers[1].context.trace_id:032x}" != TRACE_ID


def exported_spans(text: str) -> list[dict]:
    """The spans the console exporter printed: one indented JSON object per span."""
    return [json.loads(block) for block in re.findall(r"^\{\n.*?^\}$", text, re.M | re.S)]


def test_opentelemetry_instrument_traces_quire_with_no_code_change(tmp_path, database_url):
    command = str(Path(sys.executable).with_name("opentelemetry-instrument"))
    stdout = tmp_path / "spans.txt"
    environment = {"OTEL_SERVICE_NAME": "quire", "OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none",
                   "OTEL_LOGS_EXPORTER": "none", "OTEL_BSP_SCHEDULE_DELAY": "100"}  # export spans every 0.1 s
    with uvicorn_server(tmp_path, database_url, "--no-access-log", environment=environment, launcher=[command],
                        stdout=stdout) as server:
        server.wait_ready()
        response = httpx2.get(f"{server.url}{BOOKS}/7", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        assert response.status_code == 404

        def server_spans() -> list[dict]:
            return [span for span in exported_spans(stdout.read_text()) if span["kind"] == "SpanKind.SERVER"
                    and span["attributes"].get("http.target", span["attributes"].get("url.path")) == f"{BOOKS}/7"]

        assert poll(server_spans), stdout.read_text()
        log = server.log()
    trace_id, span_id, _ = traced(response)
    [span] = server_spans()
    assert span["name"] == f"GET {BOOK_ROUTE}"  # named by its route template, like quire's metrics
    assert span["context"]["trace_id"] == f"0x{TRACE_ID}" == f"0x{trace_id}"
    assert span["context"]["span_id"] == f"0x{span_id}" and span["parent_id"] == f"0x{PARENT_ID}"
    [line] = [json.loads(line) for line in log.splitlines() if line.startswith("{") and f"{BOOKS}/7" in line]
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, span_id)


def test_the_containers_command_empties_the_metrics_directory_and_serves_two_summed_workers(tmp_path):
    """The image cannot be built here (no registry), so its CMD and HEALTHCHECK run on this machine."""
    dockerfile = Path(HERE, "Dockerfile").read_text()
    command = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    healthcheck = json.loads(re.search(r"^    CMD (\[.*\])$", dockerfile, re.M).group(1))
    directory = Path(re.search(r"^ENV PROMETHEUS_MULTIPROC_DIR=(\S+)$", dockerfile, re.M).group(1))
    port = str(free_port())
    stale = tmp_path / "metrics"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"an earlier run's numbers")
    assert command[:2] == ["sh", "-c"] and "--port 8000" in command[2] and str(directory).startswith("/tmp/")
    environ = {**{name: value for name, value in os.environ.items() if not name.startswith(("QUIRE_", "OTEL_"))},
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PROMETHEUS_MULTIPROC_DIR": str(stale),
               "DATABASE_URL": f"sqlite:///{tmp_path / 'quire.db'}"}
    process = subprocess.Popen([*command[:2], command[2].replace("--port 8000", f"--port {port}")], cwd=HERE,
                               env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert poll(lambda: not refuses_connections(int(port)), timeout=30)
        check = [healthcheck[0] if healthcheck[0] != "python" else sys.executable, *healthcheck[1:]]
        check[-1] = check[-1].replace(":8000/", f":{port}/")
        assert poll(lambda: subprocess.run(check, timeout=10).returncode == 0, timeout=30)
        assert not (stale / "counter_1.db").exists()
        with httpx2.Client(base_url=url, timeout=10, headers={"Connection": "close"}) as http:
            assert all(status == 200 for status in at_once(16, lambda _: http.get("/healthz").status_code))
            assert poll(lambda: len(list(stale.glob("counter_*.db"))) == 2)  # one file per worker
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(http.get("/metrics").text) for s in family.samples}
            assert value(samples, "http_requests_total", method="GET", route="/healthz", status="200") >= 16
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


# == Embedding ====================================================================================


def mount(kind: str, prefixes: dict[str, api.Starlette]):
    """A parent app of `kind` (Starlette or FastAPI) with each app mounted under its prefix."""
    if kind == "starlette":
        return Starlette(routes=[Mount(prefix, app=child) for prefix, child in prefixes.items()])
    parent = FastAPI()
    for prefix, child in prefixes.items():
        parent.mount(prefix, child)
    return parent


def shop_app(database_url: str, **overrides) -> api.Starlette:
    return api.create_app(config=api.Config(environ={}), database_url=database_url,
                          secret_key=overrides.pop("secret_key", "x" * 40), **overrides)


@pytest.mark.parametrize("kind", ["starlette", "fastapi"])
def test_mounted_under_shop_every_url_the_api_writes_carries_the_prefix(database_url, kind):
    shop = shop_app(database_url)
    with TestClient(mount(kind, {"/shop": shop})) as client:  # the child's lifespan never runs
        try:
            assert client.get("/shop/healthz").json() == {"status": "ok"}
            response = client.post("/shop/api/v1/users", json=user_body(email="ada@example.com"))
            assert response.status_code == 201, response.text
            assert response.headers["location"] == f"/shop/api/v1/users/{response.json()['id']}"
            token = client.post("/shop/api/v1/auth/token", json={"email": "ada@example.com", "password": PASSWORD})
            assert token.status_code == 200, token.text
            headers = bearer(token.json()["access_token"])
            books = []
            for n in range(3):
                response = client.post("/shop/api/v1/books", json={**BOOK, "title": f"Book {n}"}, headers=headers)
                assert response.status_code == 201, response.text
                assert response.headers["location"] == f"/shop/api/v1/books/{response.json()['id']}"
                assert client.get(response.headers["location"]).json() == response.json()
                books.append(response.json())

            first = client.get("/shop/api/v1/books", params={"limit": 2})
            next_url = first.json()["next"]
            assert next_url.startswith("/shop/api/v1/books?")
            assert first.headers["link"] == f'<{next_url}>; rel="next"'
            second = client.get(next_url)
            assert second.status_code == 200 and second.json()["next"] is None
            assert first.json()["items"] + second.json()["items"] == books

            assert client.get("/shop/openapi.json").json()["servers"] == [{"url": "/shop"}]
            page = client.get("/shop/docs")
            assert page.status_code == 200 and 'data-spec-url="/shop/openapi.json"' in page.text
            assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
            assert assets and all(asset.startswith("/shop/docs/") for asset in assets), assets
            for asset in assets:
                assert client.get(asset).status_code == 200, asset
            assert client.get("/shop/readyz").status_code == 200
        finally:
            client.portal.call(shop.state.quire.store.disconnect)


def test_two_mounted_apps_on_two_databases_share_neither_data_nor_rate_limits(database_url, other_database_url):
    first = shop_app(database_url, secret_key="a" * 40, rate_limit=6)
    second = shop_app(other_database_url, secret_key="b" * 40, rate_limit=6)
    with TestClient(mount("starlette", {"/a": first, "/b": second})) as client:
        try:
            assert client.post("/a/api/v1/users", json=user_body(email="ada@example.com")).status_code == 201
            token = client.post("/a/api/v1/auth/token", json={"email": "ada@example.com", "password": PASSWORD})
            headers = bearer(token.json()["access_token"])
            book = client.post("/a/api/v1/books", json=BOOK, headers=headers).json()
            assert client.get(f"/a/api/v1/books/{book['id']}").status_code == 200
            assert_problem(client.get(f"/b/api/v1/books/{book['id']}"), 404)
            assert client.get("/b/api/v1/books").json() == {"items": [], "next": None}
            assert client.get("/b/api/v1/users/me", headers=headers).status_code == 401
            # /a has used 4 of its 6; /b 3 of its own 6.
            assert [client.get("/a/api/v1/books").status_code for _ in range(2)] == [200, 200]
            assert_problem(client.get("/a/api/v1/books"), 429)
            assert [client.get("/b/api/v1/books").status_code for _ in range(3)] == [200, 200, 200]
            assert_problem(client.get("/b/api/v1/books"), 429)
        finally:
            client.portal.call(first.state.quire.store.disconnect)
            client.portal.call(second.state.quire.store.disconnect)


# == The OpenAPI document and the docs page =========================================================

DOCS_FILES = ("/docs/init.js", "/docs/assets")  # Swagger UI's own files: routes, not operations
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# == Checking a response against the document =====================================================


@functools.cache
def openapi_for(prefix: str = "") -> dict:
    """The document the app serves under `prefix` (the one GET {prefix}/openapi.json answers)."""
    return json.loads(api.DOCS.document(prefix))


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("date-time")
def is_rfc3339(value: object) -> bool:
    return not isinstance(value, str) or RFC3339.fullmatch(value) is not None


@functools.cache
def schema_validator(prefix: str, schema_json: str) -> jsonschema.Draft202012Validator:
    """A validator for one schema of the document (OpenAPI 3.1 schemas are JSON Schema 2020-12);
    the document's components sit next to it, so `#/components/schemas/...` refs resolve."""
    root = {**json.loads(schema_json), "components": openapi_for(prefix)["components"]}
    return jsonschema.Draft202012Validator(root, format_checker=FORMATS)


def assert_valid(prefix: str, schema: dict, value: Any, what: str) -> None:
    errors = sorted(schema_validator(prefix, json.dumps(schema, sort_keys=True)).iter_errors(value),
                    key=lambda error: list(error.absolute_path))
    assert not errors, f"{what} does not match {schema}: " + "; ".join(
        f"at #/{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in errors[:5])


def route_template(path: str) -> str:
    """`/api/v1/books/{id:int}` as OpenAPI writes it: `/api/v1/books/{id}`."""
    return re.sub(r"\{(\w+)(?::\w+)?\}", r"{\1}", path)


def find_operation(app: Starlette, method: str, path: str) -> tuple[str, dict] | None:
    """(templated path, operation) for a request to `app` (path without any mount prefix), or
    None when no documented operation takes it (an unknown route, a 405, Swagger UI's files)."""
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "path_params": {}}
    for route in app.routes:
        match, _ = route.matches(scope)
        if match is Match.NONE:
            continue
        if match is Match.PARTIAL or not isinstance(route, Route):
            return None  # the method is not allowed here (405), or a Mount (Swagger UI's assets)
        template = route_template(route.path)
        operations = openapi_for()["paths"].get(template, {})
        operation = operations.get("get" if method == "HEAD" else method.lower())
        return (template, operation) if operation is not None else None
    return None


def media_type(response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip().lower()


def check_problem(prefix: str, response, what: str) -> None:
    assert media_type(response) == "application/problem+json", f"{what}: {response.headers.get('content-type')}"
    assert_valid(prefix, {"$ref": "#/components/schemas/Problem"}, response.json(), what)


def mounted_quire(app: Any) -> tuple[Starlette, str] | None:
    """The quire app in `app` (itself, or mounted in it, at any depth) and its mount prefix."""
    if hasattr(getattr(app, "state", None), "quire"):
        return app, ""
    for route in getattr(app, "routes", []):
        if isinstance(route, Mount) and (found := mounted_quire(route.app)):
            return found[0], route.path + found[1]
    return None


def check_against_openapi(app: Starlette, response, *, prefix: str | None = None) -> dict | None:
    """Check `response` (an httpx response from a TestClient on `app`: a quire app, or a parent
    app that mounts one) against the document: its status is one the operation lists, its media
    type is the documented one, its JSON body validates against the documented schema, the
    documented headers are there. Returns the operation, or None for requests that are no
    documented operation (unknown routes, 405s, Swagger UI's files, a parent app's own routes);
    their errors must still be problem+json. `prefix`: the mount prefix, found when not given."""
    if prefix is None:
        found = mounted_quire(app)
        assert found is not None, f"no quire app in {app!r}"
        app, prefix = found
    request = response.request
    method, path = request.method.upper(), request.url.path
    if not path.startswith(prefix + "/"):
        return None  # a route of the parent app, not of quire
    path = path[len(prefix):]
    response.read()
    what = f"{method} {path} -> {response.status_code}"
    found = find_operation(app, method, path)
    if found is None:
        if response.status_code >= 400:
            check_problem(prefix, response, what)
        return None
    template, operation = found
    responses = operation["responses"]
    status = str(response.status_code)
    assert status in responses, (f"{method} {template} answered {status}, which the document does not list "
                                 f"(it lists {', '.join(responses)}): {response.text[:300]}")
    documented = responses[status]
    content = documented.get("content", {})
    if response.status_code >= 400:
        assert set(content) == {"application/problem+json"}, f"{what}: documented as {list(content)}"
    for name, header in documented.get("headers", {}).items():
        if name == "Link":  # only while there is a next page
            assert (name in response.headers) == bool(response.json().get("next")), f"{what}: {name}"
        elif header.get("required"):
            assert name in response.headers, f"{what}: no {name} header although the document promises it"
        elif name in response.headers:  # an optional one (Idempotent-Replayed) has its documented values
            assert_valid(prefix, header["schema"], response.headers[name], f"{what}: {name}")
    if not content:
        assert response.content == b"", f"{what}: a body the document does not describe: {response.text[:200]}"
        return operation
    if method == "HEAD":
        return operation
    assert media_type(response) in content, (f"{what}: Content-Type {response.headers.get('content-type')}, "
                                             f"documented {list(content)}")
    schema = content[media_type(response)].get("schema")
    if schema is not None and media_type(response).endswith("json"):
        assert_valid(prefix, schema, response.json(), what)
    return operation


@pytest.fixture
def checked(make_app) -> Iterator[tuple[TestClient, list]]:
    """A client whose every response is checked against the document, and the (operationId,
    status) pairs it saw, to show which parts of the document a test exercised."""
    seen: list[tuple[str, int]] = []
    with TestClient(make_app()) as client:
        def check(response) -> None:
            operation = check_against_openapi(client.app, response)
            if operation is not None:
                seen.append((operation["operationId"], response.status_code))
        client.event_hooks["response"].append(check)
        yield client, seen


# == Helpers ======================================================================================


def operations(document: dict) -> Iterator[tuple[str, str, dict]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method.upper(), path, operation


def app_operations(app: Starlette) -> set[tuple[str, str]]:
    """(method, templated path) of every route the app serves, Swagger UI's files aside."""
    found = set()
    for route in app.routes:
        if isinstance(route, Mount):
            assert route.path in DOCS_FILES, f"an undocumented mount: {route.path}"
            continue
        assert isinstance(route, Route), route
        if route.path in DOCS_FILES:
            continue
        found |= {(method, route_template(route.path)) for method in route.methods - {"HEAD"}}
    return found


class PageLinks(HTMLParser):
    """The URLs a page loads (src, href, data-spec-url) and the text of its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        self.urls += [attrs[name] for name in ("src", "href", "data-spec-url") if attrs.get(name)]
        self._in_script = tag == "script"
        if self._in_script and not attrs.get("src"):
            self.inline_scripts.append("")
        for name, value in attrs.items():
            assert not name.startswith("on"), f"an inline event handler: {name}={value}"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


def csp(header: str) -> dict[str, list[str]]:
    directives = [part.split() for part in header.split(";") if part.strip()]
    return {directive[0].lower(): directive[1:] for directive in directives}


# == The document =================================================================================


def test_the_document_says_a_sign_in_is_an_email_and_password_or_a_refresh_token_not_both(client):
    schema = {"$ref": "#/components/schemas/Credentials"}
    for body in ({"email": "a@example.com", "password": "p"}, {"refresh_token": "r"}):
        assert_valid("", schema, body, "a sign-in body")
    for body in ({}, {"email": "a@example.com"}, {"email": "a@example.com", "password": "p", "refresh_token": "r"}):
        assert list(schema_validator("", json.dumps(schema)).iter_errors(body)), body
        assert client.post(TOKEN, json=body).status_code in (400, 401), body  # and the API refuses it too


def test_the_document_is_valid_openapi_3_1(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document["openapi"].startswith("3.1.")
    validate_openapi(document)  # raises, naming the first problem, if it is not valid


def test_every_route_and_method_of_the_app_is_documented_and_nothing_else(client):
    documented = {(method, path) for method, path, _ in operations(client.get("/openapi.json").json())}
    served = app_operations(client.app)
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"
    assert ("GET", "/api/v1/books/{id}") in served and ("PATCH", "/api/v1/books/{id}") in served


def test_every_operation_has_a_unique_id_a_tag_a_summary_and_a_success_status(client):
    document = client.get("/openapi.json").json()
    tags = {tag["name"] for tag in document["tags"]}
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))
    for method, path, operation in operations(document):
        assert operation["tags"] and set(operation["tags"]) <= tags, (method, path)
        summary = operation["summary"]
        assert summary and summary[0].isupper() and summary.endswith("."), (method, path, summary)
        assert any(status.startswith("2") for status in operation["responses"]), (method, path)


def test_every_path_parameter_is_declared_and_required(client):
    document = client.get("/openapi.json").json()
    for method, path, operation in operations(document):
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{(\w+)\}", path)), (method, path)
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":
                assert parameter["required"] is True
                if parameter["name"] == "id":
                    assert parameter["schema"]["type"] == "integer" and parameter["schema"]["minimum"] == 1
                else:  # /problems/{kind}
                    assert (parameter["name"], parameter["schema"]) == ("kind", {"type": "string"})


def test_every_error_response_is_a_problem_and_every_api_operation_lists_429_and_503(client):
    document = client.get("/openapi.json").json()
    problem = document["components"]["schemas"]["Problem"]
    assert set(problem["required"]) >= {"type", "title", "status", "detail"}
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert response["content"] == {"application/problem+json": {
                    "schema": {"$ref": "#/components/schemas/Problem"}}}, (method, path, status)
        if path.startswith("/api/"):
            assert {"429", "503"} <= set(operation["responses"]), (method, path)


def test_readyz_documents_its_503(client):
    """/readyz answers 503 while the database is down (see the test below); the document says so."""
    responses = client.get("/openapi.json").json()["paths"]["/readyz"]["get"]["responses"]
    assert "503" in responses and "application/problem+json" in responses["503"]["content"]


def test_the_docs_and_the_document_describe_their_own_bodies(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "text/html" in paths["/docs"]["get"]["responses"]["200"].get("content", {})
    assert "application/json" in paths["/openapi.json"]["get"]["responses"]["200"].get("content", {})


def test_the_bearer_scheme_is_required_by_exactly_the_operations_that_answer_401_without_a_token(client):
    """Asked without a token (and with a body and an id that would otherwise do), an operation
    answers 401 if and only if the document puts it behind the bearer scheme."""
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
        "oauth2": {"type": "oauth2", "flows": {"password": {"tokenUrl": "/api/v1/auth/token", "scopes": {}}}}}
    owner, headers = signed_in_user(client, email="ada@example.com")  # the examples' user
    book = client.post(BOOKS, json={"title": "Dune", "author": "Frank Herbert"}, headers=headers).json()
    ids = {"/api/v1/books/{id}": book["id"], "/api/v1/users/{id}": owner["id"]}
    for method, path, operation in operations(document):
        url = path.replace("{id}", str(ids.get(path, 1)))
        kwargs = {}
        if "requestBody" in operation:
            kwargs = {"content": json.dumps(operation["requestBody"]["content"]["application/json"]["example"]),
                      "headers": JSON_HEADERS}
        response = client.request(method, url, **kwargs)
        secured = operation.get("security") == [{"bearer": []}, {"oauth2": []}]
        needs_token = response.status_code == 401 and "Sign in" in response.json()["detail"]
        assert secured == needs_token, (method, path, response.status_code, response.text[:200])
        if secured:
            assert "401" in operation["responses"], (method, path)
    assert "security" not in document  # no global requirement: public operations stay public


def test_the_server_url_is_the_root_or_the_mount_prefix(make_app):
    app = make_app()
    with TestClient(app) as client:
        assert client.get("/openapi.json").json()["servers"] == [{"url": "/"}]
    with TestClient(Starlette(routes=[Mount("/shop", app=make_app())])) as client:
        document = client.get("/shop/openapi.json").json()
        assert document["servers"] == [{"url": "/shop"}]
        validate_openapi(document)
        # "Try it out" joins the server URL and a path: that is where the API answers.
        assert client.get(document["servers"][0]["url"] + "/api/v1/books").status_code == 200


# == Request examples =============================================================================

EXAMPLE_ORDER = ["register", "issue_token", "create_book", "replace_book", "patch_book", "place_order",
                 "move_order", "change_password"]  # last: it revokes the examples' token


def test_every_request_body_example_matches_its_schema_and_is_accepted_by_its_endpoint(checked):
    client, seen = checked
    document = openapi_for()
    with_bodies = [(method, path, operation) for method, path, operation in operations(document)
                   if "requestBody" in operation]
    assert sorted(operation["operationId"] for *_, operation in with_bodies) == sorted(EXAMPLE_ORDER), \
        "a new operation with a body: add it to EXAMPLE_ORDER"
    with_bodies.sort(key=lambda item: EXAMPLE_ORDER.index(item[2]["operationId"]))
    headers: dict[str, str] = {}
    book_id = None
    for method, path, operation in with_bodies:
        assert operation["requestBody"]["required"] is True
        success = next(status for status in operation["responses"] if status.startswith("2"))
        for content_type, media in operation["requestBody"]["content"].items():
            example = media["example"]
            assert_valid("", media["schema"], example, f"the example of {method} {path}")
            if operation["operationId"] == "move_order":  # cancel a fresh order each time
                order = client.post("/api/v1/orders", json={"items": [{"book_id": book_id, "quantity": 1}]},
                                    headers=headers)
                url = path.replace("{id}", str(order.json()["id"]))
            else:
                url = path.replace("{id}", str(book_id))
            body = urlencode(example) if content_type == "application/x-www-form-urlencoded" else json.dumps(example)
            response = client.request(method, url, content=body,
                                      headers={"Content-Type": content_type, **headers})
            assert response.status_code == int(success), (method, path, content_type, response.text)
            if operation["operationId"] == "issue_token":
                headers = bearer(response.json()["access_token"])
            if operation["operationId"] == "create_book":
                book_id = response.json()["id"]
    patch_types = document["paths"]["/api/v1/books/{id}"]["patch"]["requestBody"]["content"]
    assert set(patch_types) == {"application/json", "application/merge-patch+json"}
    assert ("patch_book", 200) in seen and ("register", 201) in seen


# == The documented constraints are the enforced ones =============================================


def probes(schema: dict) -> Iterator[tuple[str, bool]]:
    """Query-string values at and just past the schema's limits, each with whether it is valid."""
    if "minimum" in schema:
        yield str(schema["minimum"]), True
        yield str(schema["minimum"] - 1), False
    if "maximum" in schema:
        yield str(schema["maximum"]), True
        yield str(schema["maximum"] + 1), False
    if schema.get("type") == "integer":
        yield "ten", False
    if "minLength" in schema:
        yield "x" * schema["minLength"], True
        if schema["minLength"] > 0:
            yield "x" * (schema["minLength"] - 1), False
    if "maxLength" in schema:
        yield "x" * schema["maxLength"], True
        yield "x" * (schema["maxLength"] + 1), False
    for value in schema.get("enum", []):
        yield value, True
    if "enum" in schema:
        yield "bogus", False


def test_every_documented_query_parameter_limit_is_the_one_enforced(checked):
    client, seen = checked
    admin, headers = signed_in_user(client)
    make_admin(client, admin["email"])
    document = openapi_for()
    tried = 0
    for method, path, operation in operations(document):
        for parameter in operation.get("parameters", []):
            if parameter["in"] != "query":
                continue
            assert parameter["required"] is False
            for value, valid in probes(parameter["schema"]):
                response = client.request(method, path, params={parameter["name"]: value}, headers=headers)
                assert response.status_code == (200 if valid else 400), (path, parameter["name"], value, response.text)
                if not valid:
                    assert response.json()["errors"][0]["parameter"] == parameter["name"]
                tried += 1
        # A parameter the document does not list is refused.
        if any(parameter["in"] == "query" for parameter in operation.get("parameters", [])):
            assert_problem(client.request(method, path, params={"nope": "1"}, headers=headers), 400)
    assert tried >= 20


# == Every response of a session matches the document =============================================


def test_a_whole_session_answers_exactly_as_documented(checked):
    client, seen = checked
    # Users and tokens.
    ada = client.post(USERS, json=user_body(email="ada@example.com")).json()
    client.post(USERS, json=user_body(email="ADA@example.com"))  # 409
    client.post(USERS, json=user_body(password="short"))  # 400
    client.post(USERS, content="{}", headers={"Content-Type": "text/plain"})  # 415
    client.post(TOKEN, json={"email": "ada@example.com", "password": "wrong password"})  # 401
    client.post(TOKEN, json={"email": "ada@example.com"})  # 400
    ada_headers = bearer(client.post(TOKEN, json={"email": "ada@example.com", "password": PASSWORD})
                         .json()["access_token"])
    client.get(ME)  # 401
    client.get(ME, headers=bearer("not.a.token"))  # 401
    client.get(ME, headers=ada_headers)
    client.head(ME, headers=ada_headers)
    client.get(f"{USERS}/{ada['id']}", headers=ada_headers)
    bob, bob_headers = signed_in_user(client)
    client.get(f"{USERS}/{ada['id']}", headers=bob_headers)  # 403
    client.get(USERS, headers=bob_headers)  # 403
    make_admin(client, bob["email"])
    client.get(USERS, params={"limit": 1}, headers=bob_headers)  # with a next page and a Link
    client.get(USERS, params={"limit": 0}, headers=bob_headers)  # 400
    client.get(USERS, params={"cursor": "garbage"}, headers=bob_headers)  # 400
    client.get(f"{USERS}/999999", headers=bob_headers)  # 404
    # Books.
    created = client.post(BOOKS, json={"title": "Clean Code", "author": "Robert C. Martin",
                                       "isbn": "978-0-13-235088-4"}, headers=ada_headers)
    book, url = created.json(), created.headers["location"]
    client.post(BOOKS, json={"title": "Copy", "author": "X", "isbn": "9780132350884"}, headers=ada_headers)  # 409
    client.post(BOOKS, json={"title": " ", "author": "X"}, headers=ada_headers)  # 400
    client.post(BOOKS, json={"title": "T", "author": "A"})  # 401
    client.post(BOOKS, json={"title": "T", "author": "A", "id": 7}, headers=ada_headers)  # 400
    for n in range(3):
        client.post(BOOKS, json={"title": f"Book {n}", "author": "Ann Author", "year": 2000 + n}, headers=ada_headers)
    etag = client.get(url).headers["etag"]
    client.get(url, headers={"If-None-Match": etag})  # 304
    client.head(url)
    client.get(f"{BOOKS}/999999")  # 404
    client.get(url, headers=bearer("not.a.token"))  # 401: a presented token is checked
    client.get(BOOKS, headers=bearer("not.a.token"))  # 401
    client.get(f"{BOOKS}/99999999999999999999")  # 404
    client.get(BOOKS)
    first = client.get(BOOKS, params={"limit": 2, "sort": "-title", "author": "ann author"}).json()
    client.get(first["next"])
    client.get(BOOKS, params={"q": "book", "limit": 100})
    client.get(BOOKS, params={"sort": "year"})  # 400
    client.get(BOOKS, params={"cursor": first["next"].split("cursor=")[1], "sort": "id"})  # 400
    client.patch(url, json={"pages": 464}, headers=ada_headers)
    client.patch(url, content='{"year": null}', headers={**ada_headers, "Content-Type": "application/merge-patch+json"})
    client.patch(url, json={"pages": 0}, headers=ada_headers)  # 400
    client.patch(url, content="pages=1", headers={**ada_headers, "Content-Type": "text/plain"})  # 415
    client.patch(url, json={"pages": 1}, headers={**ada_headers, "If-Match": '"0.0"'})  # 412
    client.patch(url, json={"pages": 1}, headers=bob_headers)  # an admin may
    client.put(url, json={"title": "Clean Code", "author": "Robert C. Martin"}, headers=ada_headers)
    client.put(url, json={"title": "Clean Code"}, headers=ada_headers)  # 400
    carol, carol_headers = signed_in_user(client)
    client.put(url, json={"title": "Mine", "author": "Carol"}, headers=carol_headers)  # 403
    client.delete(url, headers=carol_headers)  # 403
    client.delete(url, headers={**ada_headers, "If-Match": '"0.0"'})  # 412
    client.delete(url, headers=ada_headers)  # 204
    client.get(url)  # 404
    client.delete(url, headers=ada_headers)  # 404
    client.put(f"{BOOKS}/999999", json={"title": "T", "author": "A"}, headers=ada_headers)  # 404
    # Operations, docs, and requests that are no operation.
    client.get("/healthz"), client.get("/readyz"), client.get("/openapi.json"), client.get("/docs")
    client.get("/docs/init.js"), client.get("/docs/assets/swagger-ui.css")
    client.get("/nope"), client.delete(ME), client.post("/healthz")  # 404, 405, 405
    client.post(LOGOUT, headers=ada_headers)  # 204
    client.get(ME, headers=ada_headers)  # 401: revoked
    client.post(LOGOUT)  # 401

    statuses = {(operation, status) for operation, status in seen}
    for expected in [("register", 201), ("register", 409), ("register", 400), ("register", 415),
                     ("issue_token", 200), ("issue_token", 401), ("issue_token", 400), ("me", 200), ("me", 401),
                     ("get_user", 200), ("get_user", 403), ("get_user", 404), ("list_users", 200),
                     ("list_users", 403), ("list_users", 400), ("create_book", 201), ("create_book", 409),
                     ("create_book", 400), ("create_book", 401), ("get_book", 200), ("get_book", 304),
                     ("get_book", 404), ("get_book", 401), ("list_books", 200), ("list_books", 400), ("list_books", 401), ("patch_book", 200),
                     ("patch_book", 400), ("patch_book", 415), ("patch_book", 412), ("replace_book", 200),
                     ("replace_book", 400), ("replace_book", 403), ("replace_book", 404), ("delete_book", 204),
                     ("delete_book", 403), ("delete_book", 412), ("delete_book", 404), ("logout", 204),
                     ("logout", 401), ("healthz", 200), ("readyz", 200), ("openapi", 200), ("docs", 200)]:
        assert expected in statuses, f"the session never saw {expected}"


def test_limits_and_failures_answer_as_documented(make_app, monkeypatch):
    """413, 429 and 500 are documented for the API's operations; their answers match."""
    def checked_client(app: Starlette) -> TestClient:
        client = TestClient(app)
        client.event_hooks["response"].append(lambda response: check_against_openapi(app, response))
        return client

    with checked_client(make_app(max_body=100)) as client:
        assert client.post(USERS, json=user_body(name="x" * 200)).status_code == 413
        assert client.post(TOKEN, json={"email": "a@b.co", "password": "x" * 200}).status_code == 413
    with checked_client(make_app(rate_limit=2, auth_rate_limit=1)) as client:
        statuses = [client.post(TOKEN, json={"email": "a@b.co", "password": "x"}).status_code for _ in range(2)]
        statuses += [client.get(BOOKS).status_code for _ in range(3)]
        assert 429 in statuses
    with checked_client(make_app()) as client:
        monkeypatch.setattr(client.app.state.quire.store, "list_books", _fail)
        assert client.get(BOOKS).status_code == 500


def _fail(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("boom")


def test_with_the_database_down_every_operation_answers_as_documented(make_app):
    """Every operation, the database unreachable: /healthz, /docs and /openapi.json still answer,
    the rest 503 (a secured one may say 401 first, with no token) - each as documented."""
    app = make_app(database_url="postgresql://postgres@127.0.0.1:1/nope")
    with TestClient(app) as client:
        client.event_hooks["response"].append(lambda response: check_against_openapi(app, response))
        for method, path, operation in operations(openapi_for()):
            kwargs = {}
            if "requestBody" in operation:
                kwargs = {"json": operation["requestBody"]["content"]["application/json"]["example"]}
            response = client.request(method, path.replace("{id}", "1").replace("{kind}", "unavailable"), **kwargs)
            assert response.status_code in (200, 401, 503), (method, path, response.status_code)


def test_a_mounted_app_answers_as_documented_under_its_prefix(make_app):
    app = make_app()
    with TestClient(Starlette(routes=[Mount("/shop", app=app)])) as client:
        outer = client.app
        client.event_hooks["response"].append(lambda response: check_against_openapi(outer, response))
        client.post("/shop" + USERS, json=user_body(email="ada@example.com"))
        headers = bearer(client.post("/shop" + TOKEN, json={"email": "ada@example.com", "password": PASSWORD})
                         .json()["access_token"])
        client.post("/shop" + BOOKS, json={"title": "Dune", "author": "Frank Herbert"}, headers=headers)
        client.post("/shop" + BOOKS, json={"title": "Emma", "author": "Jane Austen"}, headers=headers)
        page = client.get("/shop" + BOOKS, params={"limit": 1}).json()
        assert page["next"].startswith("/shop/")
        client.get(page["next"])
        client.get("/shop" + ME, headers=headers)
        client.get("/shop/openapi.json"), client.get("/shop/docs"), client.get("/shop/nope")


def test_the_checker_catches_what_the_document_does_not_say(client):
    """The checker itself: an undocumented status, a body off its schema, a wrong media type."""
    response = client.get("/healthz")
    check_against_openapi(client.app, response)
    for status, content, content_type in [
        (418, b'{"status": "ok"}', "application/json"),            # not a documented status
        (200, b'{"status": 1}', "application/json"),               # off the schema
        (200, b'{"status": "ok"}', "text/plain"),                  # not the documented media type
    ]:
        fake = type(response)(status, content=content, headers={"content-type": content_type},
                              request=response.request)
        with pytest.raises(AssertionError):
            check_against_openapi(client.app, fake)
    problem = type(response)(404, json={"title": "Not Found"}, request=client.get("/nope").request)
    with pytest.raises(AssertionError):  # an unknown route's 404 must still be a full problem
        check_against_openapi(client.app, problem)


# == /docs ========================================================================================


@pytest.mark.parametrize("prefix", ["", "/shop"])
def test_the_docs_page_loads_only_the_apps_own_files_under_its_prefix(make_app, prefix):
    app = make_app()
    outer = Starlette(routes=[Mount(prefix, app=app)]) if prefix else app
    with TestClient(outer) as client:
        response = client.get(f"{prefix}/docs")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        page = PageLinks()
        page.feed(response.text)
        assert page.inline_scripts == []
        assert sorted(page.urls) == sorted([
            f"{prefix}/docs/assets/swagger-ui.css", f"{prefix}/docs/assets/swagger-ui-bundle.js",
            f"{prefix}/docs/init.js", f"{prefix}/openapi.json"])
        types = {".css": "text/css", ".js": "text/javascript", ".json": "application/json"}
        for url in page.urls:
            asset = client.get(url)
            assert asset.status_code == 200, url
            assert media_type(asset) == types[os.path.splitext(url)[1]], (url, asset.headers["content-type"])
            assert asset.headers["x-content-type-options"] == "nosniff"
            assert len(asset.content) > 100 or url.endswith("init.js"), url
        assert client.get(f"{prefix}/openapi.json").json()["servers"] == [{"url": prefix or "/"}]
        assert client.get(f"{prefix}/docs/assets/nope.js").status_code == 404


def test_a_range_the_docs_files_cannot_serve_is_a_problem(client):
    """StaticFiles answers a bad or unsatisfiable `Range` in text/plain; here it is a problem, with
    the Content-Range that says the file's size. A good range is still served."""
    url = "/docs/assets/swagger-ui.css"
    size = len(client.get(url).content)
    part = client.get(url, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and len(part.content) == 10
    beyond = client.get(url, headers={"Range": f"bytes={size + 10}-"})
    body = assert_problem(beyond, 416, "The Range starts past the end of the file")
    assert body["type"] == "/problems/range-not-satisfiable"
    assert beyond.headers["content-range"] == f"bytes */{size}"
    assert beyond.headers["x-content-type-options"] == "nosniff"
    bad = client.get(url, headers={"Range": "items=0-9"})
    assert_problem(bad, 400, "The Range header cannot be served: Only support bytes range")


def test_the_docs_page_needs_no_other_host():
    """Nothing Swagger UI is started with points off the app (no CDN, no validator badge)."""
    for text in (openapi.DOCS_PAGE, openapi.DOCS_SCRIPT):
        assert "http:" not in text and "https:" not in text and "//" not in text.replace("<!DOCTYPE", "")


def test_the_docs_pages_content_security_policy_allows_only_what_swagger_ui_needs(client):
    policy = csp(client.get("/docs").headers["content-security-policy"])
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"]  # no inline script, no eval, no other host
    assert policy["connect-src"] == ["'self'"]  # the document and "Try it out"
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]
    assert policy["form-action"] == ["'none'"]
    # Swagger UI sets styles through the DOM (allowed), never with inline <style> or style="":
    # in Chromium it renders and works the same without 'unsafe-inline' (the browser test checks).
    assert policy["style-src"] == ["'self'"]
    assert "data:" in policy["img-src"] and set(policy["img-src"]) <= {"'self'", "data:"}  # its icons
    for directive, sources in policy.items():
        for source in sources:
            assert source in ("'self'", "'none'", "data:"), (directive, source)
    # The API's own answers carry no such policy: they are not pages.
    assert "content-security-policy" not in client.get("/healthz").headers


# == In a real browser ============================================================================
# Chromium, headless, driven over the DevTools protocol on a pipe (--remote-debugging-pipe): no
# port to pick and no package beyond the standard library. The app runs in uvicorn in a thread of
# this process, on the test's database.

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    """One headless Chromium and one page in it; `events` collects what the page reports."""

    def __init__(self, executable: str) -> None:
        self.profile = tempfile.TemporaryDirectory()
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-dev-shm-usage", "--window-size=1280,1600", f"--user-data-dir={self.profile.name}",
                "--remote-debugging-pipe", "about:blank"]
        # The protocol wants its pipe on fds 3 and 4: a tiny exec trampoline puts it there.
        trampoline = "import os,sys; os.dup2(int(sys.argv[1]),3); os.dup2(int(sys.argv[2]),4); os.execv(sys.argv[3], sys.argv[3:])"
        self.process = subprocess.Popen(
            [sys.executable, "-c", trampoline, str(to_browser_read), str(from_browser_write), *args],
            pass_fds=(to_browser_read, from_browser_write), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._ids = iter(range(1, 1_000_000))
        self._replies: dict[int, queue.Queue] = {}
        self.events: list[dict] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._from_browser, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._replies[message["id"]].put(message)
                    else:
                        with self._lock:
                            self.events.append(message)

    def call(self, method: str, params: dict | None = None, *, session: bool = False, timeout: float = 10) -> dict:
        call_id = next(self._ids)
        self._replies[call_id] = queue.Queue()
        message = {"id": call_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        try:
            reply = self._replies[call_id].get(timeout=timeout)
        finally:
            del self._replies[call_id]
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=True)
        assert "exceptionDetails" not in result, (expression, result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10) -> Any:
        """The value of `expression` once it is truthy, polling the page."""
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)
        return value

    def click(self, selector: str, within: str = "document") -> None:
        self.wait_for(f"!!{within}.querySelector({json.dumps(selector)})")
        self.js(f"{within}.querySelector({json.dumps(selector)}).click()")

    def type(self, selector: str, text: str) -> None:
        """Focus the field and type into it, as a person would (React sees real input events)."""
        self.wait_for(f"!!document.querySelector({json.dumps(selector)})")
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", {"text": text}, session=True)

    def problems(self, origin: str) -> list[str]:
        """Errors the page reported (CSP violations included), and requests that left `origin`."""
        found = []
        with self._lock:
            events = list(self.events)
        for event in events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                entry = params["entry"]
                if not entry.get("url", "").endswith("/favicon.ico"):
                    found.append(f"{entry['source']}: {entry['text']}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('exception', {}).get('description')}")
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning", "assert"):
                found.append(f"console.{params['type']}: {[a.get('value') for a in params['args']]}")
            elif method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                if not url.startswith((origin + "/", "data:", "blob:")):
                    found.append(f"a request off the app: {url}")
        return found

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout=2)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        self.profile.cleanup()


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """`app` served by uvicorn in a thread on a free local port; yields its origin."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def execute(browser: Browser, block: str) -> tuple[str, str, str]:
    """Expand an operation, press "Try it out" and "Execute"; its (status, body, request URL)."""
    browser.click(".opblock-summary-control", block)
    browser.click(".try-out__btn", block)
    browser.click(".execute", block)
    status = browser.wait_for(f"{block}.querySelector('.live-responses-table tbody .response-col_status')"
                              f"?.textContent.trim()")
    body = browser.js(f"{block}.querySelector('.live-responses-table tbody .response-col_description pre')"
                      f"?.textContent ?? ''")
    url = browser.js(f"{block}.querySelector('.request-url pre')?.textContent ?? ''")
    return status, body, url


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (CI installs it)")
@pytest.mark.parametrize("prefix", ["", "/shop"])
def test_in_a_browser_swagger_ui_renders_authorizes_and_tries_it_out(make_app, prefix):
    """Swagger UI in headless Chromium, offline: it renders every operation, "Try it out"
    registers and signs in with the documented examples, Authorize takes the token, and
    GET /users/me answers 200 through it, then a book is created and an order for it placed. The page reports no error, the CSP blocks nothing, and
    nothing is fetched from anywhere but the app."""
    app = make_app()
    outer = Starlette(routes=[Mount(prefix, app=app)]) if prefix else app
    summaries = [operation["summary"] for *_, operation in operations(openapi_for(prefix))]
    browser = Browser(CHROMIUM)
    try:
        with serve(outer) as origin:
            browser.call("Page.navigate", {"url": f"{origin}{prefix}/docs"}, session=True)
            browser.wait_for(f"document.querySelectorAll('.opblock').length === {len(summaries)}")
            shown = browser.js("[...document.querySelectorAll('.opblock-summary-description')]"
                               ".map(element => element.textContent)")
            assert shown == summaries
            assert browser.js("document.querySelector('.servers select')?.value") == (prefix or "/")

            status, body, url = execute(browser, "document.getElementById('operations-users-register')")
            assert status == "201", body
            assert url == f"{origin}{prefix}/api/v1/users"
            assert json.loads(body)["email"] == "ada@example.com"
            status, body, _ = execute(browser, "document.getElementById('operations-auth-issue_token')")
            assert status == "200", body
            assert json.loads(body)["refresh_token"]

            # Authorize with the oauth2 password flow: Swagger UI posts the form to the tokenUrl
            # (the mount prefix included) and sends the access token it gets from then on.
            browser.click(".auth-wrapper .authorize")
            oauth2 = "[...document.querySelectorAll('.auth-container')].find(c => c.textContent.includes('oauth2'))"
            browser.type("#oauth_username", "ada@example.com")
            browser.type("#oauth_password", "correct horse")
            browser.click(".auth-btn-wrapper .authorize", oauth2)
            browser.wait_for(f"{oauth2}.querySelector('.auth-btn-wrapper .authorize')?.textContent.trim() === 'Logout'")
            browser.click(".btn-done")

            status, body, url = execute(browser, "document.getElementById('operations-users-me')")
            assert status == "200", body
            assert url == f"{origin}{prefix}/api/v1/users/me"
            assert json.loads(body)["email"] == "ada@example.com"
            status, body, _ = execute(browser, "document.getElementById('operations-books-create_book')")
            assert status == "201", body
            assert json.loads(body)["id"] == 1 and json.loads(body)["stock"] == 12  # the book the order example buys
            status, body, url = execute(browser, "document.getElementById('operations-orders-place_order')")
            assert status == "201", body
            assert url == f"{origin}{prefix}/api/v1/orders"
            assert json.loads(body)["items"][0]["title"] == "Clean Code"

            assert browser.problems(origin) == []
    finally:
        browser.close()


# == The demo data ================================================================================


def test_demo_fills_an_empty_database_once_with_a_user_who_can_sign_in(database_url, make_app):
    first = run_python(None, "demo", env={"DATABASE_URL": database_url})
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"Added {len(commands.DEMO_BOOKS)} books")
    again = run_python(None, "demo", env={"DATABASE_URL": database_url})
    assert again.stdout.strip() == "The database already has books; nothing added."
    with TestClient(make_app()) as client:
        books = client.get(BOOKS, params={"limit": 100}).json()["items"]
        assert [book["title"] for book in books] == [book["title"] for book in commands.DEMO_BOOKS]
        token = token_for(client, commands.DEMO_USER["email"], commands.DEMO_USER["password"])
        me = client.get(ME, headers=bearer(token)).json()
        assert {book["owner_id"] for book in books} == {me["id"]}
