"""How much a deep page costs next to page 1: keyset pagination should make them the same.

Not a test (timings do not belong in the suite). Fills a temporary SQLite database with 100,000
books through store.py, then, for each sort order, times GET /api/v1/books for page 1 and for a
page that starts after 90,000 books, through the HTTP API with TestClient, and prints medians.

    python bench/bench_pages.py [--books 100000] [--depth 90000] [--repeat 300] [--limit 20]

The deep page's cursor is found by walking `next` at limit=100 to the depth (so the cursor is a
real one the API made), then re-requested with the page size being measured.
"""

import argparse
import asyncio
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from starlette.testclient import TestClient

# The runtime modules sit at the project's root, one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import api  # noqa: E402
import store  # noqa: E402

SORTS = ["id", "-id", "title", "-title"]
WORDS = ["Clean", "Code", "Dune", "Éclair", "apple", "Banana", "Zebra", "ärger", "Night", "River", "Stone",
         "Glass", "Winter", "Ash", "Echo", "Quiet"]


async def fill(url: str, count: int) -> None:
    """`count` books by one owner, in batches of one transaction each (one INSERT per book)."""
    db = store.Store(url)
    await db.connect()
    try:
        owner = await db.create_user(email="bench@example.com", name="Bench", password_hash="x$y$z$w")
        now = store.utc_now()
        for start in range(0, count, 5000):
            async with db.transaction() as run:
                for n in range(start, min(start + 5000, count)):
                    # Titles repeat (ties broken by id) and are spread over the alphabet.
                    title = f"{WORDS[n * 7 % len(WORDS)]} {WORDS[n * 11 % len(WORDS)]} {n % 997}"
                    author = f"Author {n % 1000}"
                    await run("INSERT INTO books (title, author, year, pages, isbn, owner_id, title_fold, "
                              "author_fold, created_at, updated_at) VALUES (:title, :author, :year, :pages, "
                              "NULL, :owner, :tf, :af, :now, :now)",
                              {"title": title, "author": author, "year": 1900 + n % 120, "pages": 100 + n % 900,
                               "owner": owner["id"], "tf": title.casefold(), "af": author.casefold(), "now": now})
    finally:
        await db.disconnect()


def cursor_at(client: TestClient, sort: str, depth: int) -> tuple[str, tuple[str, int]]:
    """A real cursor positioned after `depth` books in `sort` order, found by following `next`,
    and the (title, id) key of the last book before it."""
    url, seen = f"/api/v1/books?limit=100&sort={sort}", 0
    while seen < depth:
        body = client.get(url).json()
        seen += len(body["items"])
        url, last = body["next"], body["items"][-1]
    return parse_qs(urlsplit(url).query)["cursor"][0], (last["title"], last["id"])


def median_ms(call, repeat: int) -> float:
    for _ in range(20):  # warm caches and the statement paths first
        call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def http_get(client: TestClient, url: str):
    def call():
        assert client.get(url).status_code == 200
    return call


def store_query(client: TestClient, sort: str, limit: int, after: tuple | None):
    """The store's query alone, on the app's own connection and loop, without HTTP around it."""
    query = functools.partial(client.app.state.quire.store.list_books, limit=limit + 1, sort=sort,
                              author=None, q=None, after=after)
    return lambda: client.portal.call(query)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--books", type=int, default=100_000)
    parser.add_argument("--depth", type=int, default=90_000)
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{Path(directory) / 'bench.db'}"
        started = time.perf_counter()
        asyncio.run(fill(url, args.books))
        print(f"filled {args.books:,} books in {time.perf_counter() - started:.1f} s (SQLite, {url})")

        app = api.create_app(config=api.Config(environ={}), database_url=url, rate_limit=0)
        with TestClient(app) as client:
            print(f"median of {args.repeat} requests, limit={args.limit}, deep page = after {args.depth:,} books")
            print(f"{'':>7} {'HTTP (TestClient), ms':^30} {'store.list_books alone, ms':^30}")
            print(f"{'sort':>7} {'page 1':>9} {'deep':>9} {'ratio':>9} {'page 1':>9} {'deep':>9} {'ratio':>9}")
            for sort in SORTS:
                first = f"/api/v1/books?limit={args.limit}&sort={sort}"
                cursor, after = cursor_at(client, sort, args.depth)
                deep = f"{first}&cursor={cursor}"
                assert len(client.get(deep).json()["items"]) == args.limit
                http = [median_ms(http_get(client, url), args.repeat) for url in (first, deep)]
                sql = [median_ms(store_query(client, sort, args.limit, position), args.repeat)
                       for position in (None, after)]
                print(f"{sort:>7} {http[0]:9.3f} {http[1]:9.3f} {http[1] / http[0]:9.2f} "
                      f"{sql[0]:9.3f} {sql[1]:9.3f} {sql[1] / sql[0]:9.2f}")


if __name__ == "__main__":
    main()
