"""Tests for the API docs: GET /openapi.json and GET /docs (Swagger UI).

A draft to be merged into test_api.py; it uses that module's fixtures and helpers.

`check_against_openapi(app, response)` checks one response against the generated document: its
status is listed for the operation, its media type is the documented one and its JSON body
validates (jsonschema) against the documented schema. The tests here run it over a whole session;
hooked into the `client` fixture it checks every response of the suite.
"""

from test_api import *  # noqa: F403 - the helpers (register, signed_in_user, assert_problem, ...)
from test_api import (  # noqa: F401 - pytest finds fixtures by their names in this module
    PASSWORD, RFC3339, USERS, ME, TOKEN, LOGOUT, JSON_HEADERS, assert_problem, bearer, cheap_hashing,
    client, database_url, make_admin, make_app, register, signed_in_user, token_for, user_body)

# `import *` also brought test_api's tests, which pytest would run a second time from here.
for _name in [name for name in globals() if name.startswith("test_")]:
    del globals()[_name]

import contextlib
import functools
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from html.parser import HTMLParser
from typing import Any

import jsonschema
import pytest
import uvicorn
from openapi_spec_validator import validate as validate_openapi
from starlette.applications import Starlette
from starlette.routing import Match, Mount, Route
from starlette.testclient import TestClient

import api

BOOKS = "/api/v1/books"
DOCS_FILES = ("/docs/init.js", "/docs/assets")  # Swagger UI's own files: routes, not operations
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# == Checking a response against the document =====================================================


@functools.cache
def openapi_for(prefix: str = "") -> dict:
    """The document the app serves under `prefix` (the one GET {prefix}/openapi.json answers)."""
    return json.loads(api.openapi_document(prefix))


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
    for name in documented.get("headers", {}):
        if name == "Link":  # only while there is a next page
            assert (name in response.headers) == bool(response.json().get("next")), f"{what}: {name}"
        else:
            assert name in response.headers, f"{what}: no {name} header although the document promises it"
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
    """A client whose every response is checked against the document; also gives the list of
    (method, templated path, status) it saw, to show which parts of the document were exercised."""
    seen: list[tuple[str, str, int]] = []
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
                assert parameter["schema"]["type"] == "integer" and parameter["schema"]["minimum"] == 1


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
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
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
        secured = operation.get("security") == [{"bearer": []}]
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

EXAMPLE_ORDER = ["register", "issue_token", "create_book", "replace_book", "patch_book"]


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
            url = path.replace("{id}", str(book_id))
            response = client.request(method, url, content=json.dumps(example),
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


def test_a_whole_session_answers_exactly_as_documented(checked, make_app):
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
            response = client.request(method, path.replace("{id}", "1"), **kwargs)
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


def test_the_docs_page_needs_no_other_host():
    """Nothing Swagger UI is started with points off the app (no CDN, no validator badge)."""
    for text in (api.DOCS_PAGE, api.DOCS_SCRIPT):
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
    GET /users/me answers 200 through it. The page reports no error, the CSP blocks nothing, and
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
            token = json.loads(body)["access_token"]

            browser.click(".auth-wrapper .authorize")
            browser.type(".auth-container input", token)
            browser.click(".auth-btn-wrapper .authorize")
            browser.wait_for("!!document.querySelector('.auth-btn-wrapper .btn-done')")
            browser.click(".auth-btn-wrapper .btn-done")

            status, body, url = execute(browser, "document.getElementById('operations-users-me')")
            assert status == "200", body
            assert url == f"{origin}{prefix}/api/v1/users/me"
            assert json.loads(body)["email"] == "ada@example.com"
            status, body, _ = execute(browser, "document.getElementById('operations-books-create_book')")
            assert status == "201", body

            assert browser.problems(origin) == []
    finally:
        browser.close()
