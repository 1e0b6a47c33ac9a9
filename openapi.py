"""The OpenAPI 3.1 document of a table of operations, and the Swagger UI page that shows it.

openapi.py reads `web.Operation`s: their paths and methods, the msgspec Structs of their bodies
and answers (msgspec writes the JSON Schemas), their statuses and flags (`etag`, `conditional`,
`signed_in`, `counted`), and the handlers' docstrings (first sentence: the summary). It knows
nothing about books, users or tokens; the API hands it its title, description and security
schemes.

Swagger UI's files come from the openapi-ui-bundles package and are served by the app itself, so
/docs works without internet. The page runs no inline script, which lets its
Content-Security-Policy allow scripts from this origin only.
"""

import functools
import html
import re
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

import msgspec
import openapi_ui_bundles
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from web import FORM, JSON, MERGE_PATCH, Operation, Problem, app_path, encoder, plain_refusals_as_problems

DOCS_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} API</title>
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

# == Pieces of the document =======================================================================


def ref(type_: Any) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{type_.__name__}"}


# The headers that come with an error status, whichever operation answers it.
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again", "required": True,
                               "schema": {"type": "string"}}}
ERROR_HEADERS = {
    304: {"ETag": {"description": "The current ETag, the one your copy has", "required": True,
                   "schema": {"type": "string"}}},
    401: {"WWW-Authenticate": {"description": '`Bearer realm="quire"`: send a bearer token', "required": True,
                               "schema": {"type": "string"}}},
    429: RETRY_AFTER,
    503: RETRY_AFTER,
}


def describe_responses(operation: Operation) -> dict[str, Any]:
    status, type_ = operation.ok
    success: dict[str, Any] = {"description": HTTPStatus(status).phrase}
    if type_ is not None:
        success["content"] = {operation.media_type: {"schema": type_ if isinstance(type_, dict) else ref(type_)}}
    headers = {}
    if status == 201:
        headers["Location"] = {"description": "The new resource's URL", "required": True,
                               "schema": {"type": "string"}}
    if operation.etag:
        headers["ETag"] = {"description": "Strong; changes on every write", "required": True,
                           "schema": {"type": "string"}}
    if operation.idempotent:
        headers["Idempotent-Replayed"] = {
            "description": "`true` when this is the recorded answer to an earlier request with the same "
                           "Idempotency-Key; nothing was written again", "schema": {"type": "string", "enum": ["true"]}}
    if operation.query is not None and "cursor" in operation.query.__struct_fields__:
        headers["Link"] = {"description": 'The next page, `<url>; rel="next"`', "schema": {"type": "string"}}
    limits = {}
    if operation.counted:  # present whenever rate limits are on, on errors too
        limits["RateLimit-Policy"] = {"description": 'The rate limits that apply, e.g. `"general";q=600;w=60`',
                                      "schema": {"type": "string"}}
        limits["RateLimit"] = {"description": 'Where you stand on the closest one, e.g. `"general";r=599;t=1`',
                               "schema": {"type": "string"}}
    if headers or limits:
        success["headers"] = {**headers, **limits}
    responses = {str(status): success}
    problem = {"application/problem+json": {"schema": ref(Problem)}}
    # 400 on every operation: each refuses query parameters it does not take; 413 too, for a
    # declared Content-Length over the limit, refused before any route is chosen.
    for error in sorted({*operation.errors, 400, 413, 500, *((429, 503) if operation.counted else ())}):
        response = ({"description": "Not Modified: your copy is current"} if error == 304 else
                    {"description": HTTPStatus(error).phrase, "content": problem})
        error_headers = {**ERROR_HEADERS.get(error, {}), **limits}
        if error_headers:
            response["headers"] = error_headers
        responses[str(error)] = response
    return responses


def describe_parameters(operation: Operation) -> list[dict[str, Any]]:
    parameters = []
    for name, converter in re.findall(r"\{(\w+)(:\w+)?\}", operation.path):
        schema = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1} if converter == ":int" else {"type": "string"}
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    if operation.query is not None:
        (_,), components = msgspec.json.schema_components([operation.query])
        schema = components[operation.query.__name__]
        for name, property_schema in schema["properties"].items():
            # An absent parameter is the Struct's None; a client cannot send null in a query string.
            options = [option for option in property_schema.get("anyOf", []) if option != {"type": "null"}]
            if options:
                property_schema = options[0]
            parameters.append({"name": name, "in": "query", "required": False, "schema": property_schema})
    if operation.idempotent:
        parameters.append({
            "name": "Idempotency-Key", "in": "header", "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": 512, "examples": ['"8e0397b4"']},
            "description": "1–255 visible ASCII characters, optionally as a quoted structured-field string "
                           "(up to 512 with its quotes and escapes). "
                           "Sent again with the same request, it answers the first answer again instead of "
                           "writing twice; with another request, 422. Kept for a day."})
    if operation.conditional:  # RFC 9110 §13.1: both preconditions, on reads and on writes
        read = operation.method == "GET"
        parameters += [
            {"name": "If-Match", "in": "header", "schema": {"type": "string"},
             "description": ("Answer only if the resource still has one of these ETags (else 412)" if read else
                             "Only write if the resource still has one of these ETags, `*`: any (else 412)")},
            {"name": "If-None-Match", "in": "header", "schema": {"type": "string"},
             "description": ("304 when your copy's ETag is among these: it is current" if read else
                             "Do not write if the resource has one of these ETags, `*`: any (else 412)")}]
    return parameters


def describe_operation(operation: Operation, security: list[dict[str, list]]) -> dict[str, Any]:
    summary, _, description = " ".join((operation.handler.__doc__ or "").split()).partition(". ")
    summary += "." if description else ""
    spec: dict[str, Any] = {
        "operationId": operation.handler.__name__, "tags": [operation.tag],
        "summary": summary.strip(), "description": " ".join(description.split()),
        "parameters": describe_parameters(operation),
        "responses": describe_responses(operation)}
    if operation.body is not None:
        media_types = (JSON, MERGE_PATCH) if operation.method == "PATCH" else (JSON,)
        content = {media_type: {"schema": ref(operation.body), "example": operation.body.example}
                   for media_type in media_types}
        if operation.form is not None:
            content[FORM] = {"schema": ref(operation.form), "example": operation.form.example}
        spec["requestBody"] = {"required": True, "content": content}
    if operation.signed_in:
        spec["security"] = security
    return spec


# == The document and the docs page ===============================================================


class Docs:
    """An API's OpenAPI document and Swagger UI, for the operations it is given plus its own two
    (`GET /openapi.json`, `GET /docs`), which `operations` lists for the app's routes.

    `security_schemes(root_path)` gives the schemes, every one of which a signed-in operation
    accepts; a function of the prefix, because an OAuth 2.0 `tokenUrl` must carry it.
    Problems' `type`s are listed in the `Problem` schema, one per kind in `problem_kinds`.
    The document is made once per mount prefix (its `servers` entry carries the prefix, so "Try
    it out" works when the app is embedded); at most `MAX_PREFIXES` are kept, because under a
    parametrised mount the client chooses the prefix.
    """

    MAX_PREFIXES = 64

    def __init__(self, operations: Sequence[Operation], *, title: str, version: str, description: str,
                 security_schemes: Callable[[str], dict[str, dict[str, Any]]], problem_kinds: Sequence[str]) -> None:
        self.title, self.version, self.description = title, version, description
        self.problem_kinds = problem_kinds
        self.security_schemes = security_schemes
        self.operations = [
            *operations,
            Operation("GET", "/openapi.json", self.openapi, "docs", (200, {"type": "object"}), counted=False),
            Operation("GET", "/docs", self.docs, "docs", (200, {"type": "string"}), media_type="text/html",
                      counted=False),
        ]
        # Per instance, bounded: under a parametrised mount, clients choose the prefix.
        self.document = functools.lru_cache(maxsize=self.MAX_PREFIXES)(self._make)

    def _make(self, root_path: str) -> bytes:
        """The OpenAPI 3.1 document, for an app served under `root_path` (see `document`)."""
        types = {Problem} | {t for op in self.operations for t in (op.ok[1], op.body, op.form) if isinstance(t, type)}
        _, schemas = msgspec.json.schema_components(sorted(types, key=lambda t: t.__name__),
                                                    ref_template="#/components/schemas/{name}")
        # A rule across fields, which msgspec cannot write from the fields alone, is the Struct's own.
        for type_ in types:
            schemas[type_.__name__].update(getattr(type_, "json_schema", {}))
        # A problem's `type` is one of the kinds, each a path of this app (served at that path).
        schemas["Problem"]["properties"]["type"] = {
            "type": "string", "enum": [f"{root_path}/problems/{kind}" for kind in self.problem_kinds],
            "description": "The kind of problem; GET it for what it means and what to do"}
        security_schemes = self.security_schemes(root_path)
        security = [{name: []} for name in security_schemes]
        paths: dict[str, dict[str, Any]] = {}
        for operation in self.operations:
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", operation.path)
            paths.setdefault(path, {})[operation.method.lower()] = describe_operation(operation, security)
        return encoder.encode({
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version, "description": self.description},
            "servers": [{"url": root_path or "/"}],
            "tags": [{"name": tag} for tag in dict.fromkeys(op.tag for op in self.operations)],
            "paths": paths,
            "components": {"schemas": schemas, "securitySchemes": security_schemes},
        })

    async def openapi(self, request: Request) -> Response:
        """This API's OpenAPI 3.1 document; its server URL carries any mount prefix."""
        return Response(self.document(app_path(request, "")), media_type=JSON)

    async def docs(self, request: Request) -> Response:
        """Swagger UI for this API, served from the app (no CDN)."""
        page_html = DOCS_PAGE.format(title=html.escape(self.title), root=html.escape(app_path(request, "")))
        return HTMLResponse(page_html, headers={"Content-Security-Policy": DOCS_POLICY})

    @staticmethod
    async def script(request: Request) -> Response:
        return Response(DOCS_SCRIPT, media_type="text/javascript")

    def asset_routes(self) -> list[BaseRoute]:
        """Swagger UI's own files: routes of the app, not operations of the API."""
        files = StaticFiles(directory=openapi_ui_bundles.swagger_ui.static_path)

        async def assets(scope: Scope, receive: Receive, send: Send) -> None:
            # StaticFiles answers a Range it cannot serve in text/plain; quire's refusals are problems.
            # Inside the mount, root_path ends in /docs/assets; a problem's type sits under the app's.
            app_scope = {**scope, "root_path": scope.get("root_path", "").removesuffix("/docs/assets")}
            await files(scope, receive, plain_refusals_as_problems(app_scope, send, refused_range))

        return [Route("/docs/init.js", self.script), Mount("/docs/assets", assets)]


def refused_range(status: int, text: str) -> str:
    if status == 416:
        return "The Range starts past the end of the file; Content-Range gives the file's size."
    return f"The Range header cannot be served: {text}"
