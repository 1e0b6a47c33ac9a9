"""quire's tests, through the HTTP interface first.

Every test gets a fresh app and a fresh database from `create_app`: a temporary SQLite file by
default, or a throwaway PostgreSQL database when TEST_DATABASE_URL points at a server (the
database named there is only used to create and drop the throwaway ones).

    pytest -q                                                        # SQLite
    TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres pytest -q   # PostgreSQL
"""

import asyncio
import itertools
import os
import uuid
from collections.abc import Callable, Iterator

import asyncpg
import pytest
from starlette.testclient import TestClient

import api
import auth

POSTGRES = os.environ.get("TEST_DATABASE_URL")
PASSWORD = "correct horse"

# == Fixtures =====================================================================================


@pytest.fixture(autouse=True)
def cheap_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash with a small scrypt cost: the production cost (~300 ms a hash here) would make the
    suite take minutes. Hashes describe their parameters, so everything else runs unchanged;
    `test_passwords_are_stored_with_owasp_parameters` checks the real cost."""
    monkeypatch.setattr(auth, "SCRYPT_N", 2**10)
    monkeypatch.setattr(auth, "SCRYPT_P", 1)


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(POSTGRES.replace("postgresql://", "postgres://", 1))
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
