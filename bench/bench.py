"""quire's benchmark: the project beside the same API written the common ways, one server at a time.

Start it through `bench/run`, which installs wrk and builds the two venvs first; README.md (next to
this file) says what is measured and how to read the report. Each app starts on a fresh database
holding the same 10,000 books, pinned to CPU 0; it is checked (the seeded books come back, POST
creates), then wrk loads it from CPU 1, endpoint by endpoint, while /proc tells how much CPU the
server's process tree used. quire is seeded through its own HTTP API, as a client would; the peers'
table is written directly. Progress goes to stderr; the Markdown report goes to stdout and to
/tmp/quire-bench-repo/results/<timestamp>.md. Exit status: 0; 1 when an app had to be dropped (the
report says why); 2 on a usage error or when PostgreSQL cannot be reached.
"""
import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import random
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from statistics import median

import httpx
import jwt
import psycopg

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
QUIRE_FILES = ["api.py", "web.py", "openapi.py", "commands.py", "store.py", "auth.py",
               "requirements.txt"]  # what quire runs from the project
WORK = "/tmp/quire-bench-repo"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"  # trust auth; throwaway databases quire_bench_<app>
N_BOOKS = 10_000  # --books changes it; the deep page is the 20 books after the first nine tenths
STOCK = 1_000_000  # every book's stock: no run orders a book more than a few times
# A word in exactly five of the books, whatever their number: `search` asks for five of its letters.
RARE, SEARCH, MATCHES = "Quokka", "uokka", 5
ENDPOINTS = ["get", "list", "deep", "search", "post", "order"]  # the writes last: the GETs see the seeded books only
READS = ["get", "list", "deep", "search"]  # what --books measures: the reads whose cost might grow with the catalogue
WRK = ["wrk", "-t1", "-c32", "--timeout", "10s", "--latency"]
SERVER = ["uvicorn", "uvloop", "httptools"]  # uvicorn picks uvloop and httptools when they are installed
PEER_BIN = os.path.dirname(sys.executable)  # the peers' venv runs this harness
UVICORN = [f"{PEER_BIN}/uvicorn", "--app-dir", f"{HERE}/peers"]
PEERS = {  # name: (what it is, how to start it; start() adds where to listen)
    "fastapi": ("FastAPI + pydantic v2 + SQLAlchemy 2 ORM, sync def, a Session per request",
                [*UVICORN, "fastapi_app:app"]),
    "flask": ("Flask + sqlite3, gunicorn 1 worker x 4 threads",
              [f"{PEER_BIN}/gunicorn", "--chdir", f"{HERE}/peers", "-w", "1", "--threads", "4",
               "--no-control-socket", "flask_app:app"]),
    "floor": ("bare ASGI callable, one fixed pre-encoded book, no database", [*UVICORN, "floor_app:app"]),
}
POSTGRES_APPS = {"quire", "fastapi", "floor"}  # Flask's peer is written for sqlite3 only


class AppError(Exception):
    """The app could not be started, seeded, checked or loaded; the message says why."""


def say(line):
    print(f"bench: {line}", file=sys.stderr, flush=True)


# == The books every app holds (the same as the shared harness's) =================================

WORDS = ("river night garden shadow silver winter empire glass ocean stone "
         "crown letter secret forest fire city dream wolf iron machine").split()
FIRST = "Ada Alan Grace Linus Barbara Donald Edsger Margaret Ken Dennis".split()
LAST = "Lovelace Turing Hopper Torvalds Liskov Knuth Dijkstra Hamilton Thompson Ritchie".split()


def isbn13(n):
    digits = f"978{n:09d}"
    return digits + str(-sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(digits)) % 10)


def make_books(n):
    rnd = random.Random(42)  # fixed seed: the same books for every app, every run
    books = [{"title": "The " + " ".join(rnd.choice(WORDS).capitalize() for _ in range(rnd.randint(1, 4))),
              "author": f"{rnd.choice(FIRST)} {rnd.choice(LAST)}",
              "year": rnd.randint(1900, 2025), "pages": rnd.randint(40, 1200), "isbn": isbn13(i),
              "price_cents": rnd.randint(100, 9_999), "stock": STOCK}
             for i in range(1, n + 1)]
    for i in range(0, n, n // MATCHES):
        books[i]["title"] = f"The {RARE} {books[i]['title'].removeprefix('The ')}"
    return books


# == Databases ====================================================================================

def fresh_database(app, kind):
    """The URL of an empty database for `app`: a new SQLite file, or a PostgreSQL database dropped
    and created again (WITH (FORCE): a server killed mid-run may have left connections behind)."""
    if kind == "sqlite":
        path = f"{WORK}/run/{app}.db"
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)
        return f"sqlite:///{path}"
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS quire_bench_{app} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE quire_bench_{app}")
    return f"{PG_SERVER}/quire_bench_{app}"


def write_peer_books(url, books):
    """The peers' table, with the books as ids 1..n owned by user 1 (the peers keep no user table)."""
    columns = ("{id} PRIMARY KEY, title TEXT NOT NULL, author TEXT NOT NULL, year INTEGER, pages INTEGER, "
               "isbn TEXT UNIQUE, price_cents INTEGER, stock INTEGER NOT NULL DEFAULT 0, owner_id INTEGER NOT NULL, "
               "created_at TEXT NOT NULL, updated_at TEXT NOT NULL")
    # The shared harness's tables of orders and their lines (a line keeps the title and price of its
    # moment, so book_id is no foreign key).
    orders = ("CREATE TABLE orders ({id} PRIMARY KEY, buyer_id INTEGER NOT NULL, status TEXT NOT NULL, "
              "total_cents INTEGER NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL)",
              "CREATE TABLE order_items ({id} PRIMARY KEY, order_id INTEGER NOT NULL REFERENCES orders (id), "
              "book_id INTEGER NOT NULL, title TEXT NOT NULL, quantity INTEGER NOT NULL, "
              "unit_price_cents INTEGER NOT NULL, line_total_cents INTEGER NOT NULL)",
              "CREATE INDEX order_items_order_id ON order_items (order_id)")
    stamp = "2026-01-01T00:00:00Z"
    rows = [(i, b["title"], b["author"], b["year"], b["pages"], b["isbn"], b["price_cents"], b["stock"], 1,
             stamp, stamp) for i, b in enumerate(books, 1)]
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db, db:
            for table in (f"CREATE TABLE books ({columns})", *orders):
                db.execute(table.format(id="id INTEGER"))
            db.executemany("INSERT INTO books VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return
    with psycopg.connect(url) as db, db.cursor() as cursor:
        identity = "id BIGINT GENERATED BY DEFAULT AS IDENTITY"
        for table in (f"CREATE TABLE books ({columns})", *orders):
            cursor.execute(table.format(id=identity))
        with cursor.copy("COPY books FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        # Ids were given explicitly, so move the identity past them for the books POST creates.
        cursor.execute("SELECT setval(pg_get_serial_sequence('books', 'id'), %s)", (len(rows),))


# == A running server =============================================================================

@dataclass
class Server:
    app: str
    proc: subprocess.Popen
    base: str
    log: str
    ids: list = field(default_factory=list)  # ids[i] is the id the server gave books[i]
    token: str = ""
    deep: str = ""  # path and query of the page after the first DEEP books


def pin(cpu):
    return ["taskset", "-c", str(cpu)] if os.cpu_count() >= 2 else []


def wait_ready(server, timeout=30):
    """Until the server answers anything but 503 (quire's answer until its database is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AppError(f"exited with code {server.proc.returncode} (log: {server.log})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.base + "/api/v1/books?limit=1", timeout=2).status_code != 503:
                return
        time.sleep(0.1)
    raise AppError(f"no answer within {timeout} s (log: {server.log})")


def expect(response, status):
    if response.status_code != status:
        raise AppError(f"{response.request.method} {response.request.url.path} answered "
                       f"{response.status_code}, expected {status}: {response.text[:200]}")
    return response.json()


async def seed_quire(server, books):
    """Register, get a token, create the books with 32 requests in flight; keep the ids quire gives."""
    started, password = time.monotonic(), secrets.token_urlsafe(16)
    server.ids = [0] * len(books)
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
        user = {"email": "bench@example.com", "name": "Bench", "password": password}
        expect(await client.post("/api/v1/users", json=user), 201)
        login = {"email": user["email"], "password": password}
        server.token = expect(await client.post("/api/v1/auth/token", json=login), 200)["access_token"]
        auth = {"Authorization": f"Bearer {server.token}"}
        todo = iter(range(len(books)))  # shared by the workers: each takes the next book

        async def worker():
            for i in todo:
                created = expect(await client.post("/api/v1/books", json=books[i], headers=auth), 201)
                server.ids[i] = created["id"]
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(32):
                    group.create_task(worker())
        except ExceptionGroup as failures:
            raise AppError(f"seeding: {failures.exceptions[0]!r}") from None
    took = time.monotonic() - started
    say(f"quire: seeded {len(books):,} books through its API in {took:.1f} s ({len(books) / took:,.0f}/s)")


def seed_quire_by_sql(server, books, database_url):
    """--books: a million books through the API would take over half an hour, so they go straight
    into quire's SQLite file, as quire itself writes them (folded columns included; its triggers
    fill the trigram index), owned by the bench user, who signs in through the API."""
    started, password = time.monotonic(), secrets.token_urlsafe(16)
    with httpx.Client(base_url=server.base, timeout=30) as client:
        user = {"email": "bench@example.com", "name": "Bench", "password": password}
        owner = expect(client.post("/api/v1/users", json=user), 201)["id"]
        login = {"email": user["email"], "password": password}
        server.token = expect(client.post("/api/v1/auth/token", json=login), 200)["access_token"]
    stamp = "2026-01-01T00:00:00.000000Z"
    rows = ((b["title"], b["author"], b["year"], b["pages"], b["isbn"], b["price_cents"], b["stock"], owner,
             b["title"].casefold(), b["author"].casefold(), stamp, stamp) for b in books)
    with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"), timeout=30)) as db, db:
        first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM books").fetchone()[0]
        db.executemany("INSERT INTO books (title, author, year, pages, isbn, price_cents, stock, owner_id, "
                       "title_fold, author_fold, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       rows)
    server.ids = list(range(first, first + len(books)))
    took = time.monotonic() - started
    say(f"quire: wrote {len(books):,} books into its database with SQL in {took:.1f} s")


def find_deep_page(server, deep):
    """Follow `next` from the first page until `deep` books are behind, as a client paging would
    (100 at a time, then the page of 20 that a cursor from there gives)."""
    url = "/api/v1/books?limit=100"
    with httpx.Client(base_url=server.base, timeout=30) as client:
        for _ in range(deep // 100):
            url = expect(client.get(url), 200)["next"]
            if not url:
                raise AppError(f"`next` is null before {deep:,} books")
    server.deep = url.replace("limit=100", "limit=20")


def stop(server):
    """SIGTERM to the server's process group (gunicorn's worker too), SIGKILL after 10 s."""
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


def start(app, args, books):
    """Start `app` on a fresh database, pinned to CPU 0, and fill it with `books`."""
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = fresh_database(app, args.database) if app != "floor" else ""
    deep = len(books) * 9 // 10
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("QUIRE_", "BENCH_")) and k != "DATABASE_URL"}  # none of the caller's settings
    secret = secrets.token_urlsafe(36)  # 48 characters
    # Without uvicorn's access log, as `python api.py` serves quire: quire writes (and pays for) its
    # own JSON line per request, and uvicorn's would be a second line (some 30 µs more per request).
    listen = ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    if app == "quire":
        env.update(DATABASE_URL=url, QUIRE_RATE_LIMIT="0", QUIRE_SECRET_KEY=secret)
        cmd, cwd = [args.quire_python, "-m", "uvicorn", "api:app", *listen], PROJECT
    else:
        if url:
            write_peer_books(url, books)
        env.update(BENCH_SECRET=secret, BENCH_DB=url.removeprefix("sqlite:///"),
                   BENCH_DATABASE_URL=url.replace("postgresql://", "postgresql+psycopg://", 1))
        cmd, cwd = PEERS[app][1] + ([f"--bind=127.0.0.1:{port}"] if app == "flask" else listen), HERE
    log = f"{WORK}/logs/{app}.log"  # the latest start's log only
    with open(log, "w") as out:
        proc = subprocess.Popen(pin(0) + cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(app, proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(server)
        if app == "quire":
            if len(books) > N_BOOKS:
                seed_quire_by_sql(server, books, url)
            else:
                asyncio.run(seed_quire(server, books))
            find_deep_page(server, deep)
        else:
            server.ids = list(range(1, len(books) + 1))
            server.token = jwt.encode({"sub": "1", "exp": int(time.time()) + 7200}, secret, algorithm="HS256")
            server.deep = f"/api/v1/books?limit=20&offset={deep}"
    except BaseException:
        stop(server)
        raise
    return server


def check(server, books):
    """Before timing: books by id are the seeded ones, both pages hold the right 20 ids, the search
    finds the five books with the rare word, POST is 201, an order is 201 and takes one copy. The
    floor only has to answer with a book."""
    with httpx.Client(base_url=server.base, timeout=30) as client:
        if server.app == "floor":
            if "title" not in expect(client.get("/api/v1/books/1"), 200):
                raise AppError("the floor's answer is not a book")
            return
        for i in (0, len(books) // 2, len(books) - 1):
            got = expect(client.get(f"/api/v1/books/{server.ids[i]}"), 200)
            if {key: got[key] for key in books[i]} != books[i]:
                raise AppError(f"book {server.ids[i]} is {got}, but the book seeded there is {books[i]}")
        ids, deep = sorted(server.ids), len(books) * 9 // 10
        for path, first in (("/api/v1/books?limit=20", 0), (server.deep, deep)):
            if [b["id"] for b in expect(client.get(path), 200)["items"]] != ids[first:first + 20]:
                raise AppError(f"GET {path} does not hold the ids {ids[first]}..{ids[first + 19]}")
        rare = [server.ids[i] for i, book in enumerate(books) if RARE in book["title"]]
        if [b["id"] for b in expect(client.get(f"/api/v1/books?q={SEARCH}"), 200)["items"]] != rare:
            raise AppError(f"GET /api/v1/books?q={SEARCH} does not find the ids {rare}")
        if len(books) > N_BOOKS:
            return  # --books measures the reads only
        auth = {"Authorization": f"Bearer {server.token}"}
        new = {"title": "Bench check", "author": "Load Tester", "year": 2024, "pages": 321}
        expect(client.post("/api/v1/books", json=new, headers=auth), 201)
        book_id = server.ids[-1]
        order = expect(client.post("/api/v1/orders", json={"items": [{"book_id": book_id, "quantity": 1}]},
                                   headers=auth), 201)
        if order["items"][0]["title"] != books[-1]["title"] or order["total_cents"] != books[-1]["price_cents"]:
            raise AppError(f"the order of book {book_id} is {order}")
        if expect(client.get(f"/api/v1/books/{book_id}"), 200)["stock"] != STOCK - 1:
            raise AppError(f"an order of book {book_id} did not take one copy from its stock")


# == Measuring: wrk, and /proc for CPU and memory =================================================

def tree(pid):
    """The pids of a process and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        pids.append(p := todo.pop())
        with contextlib.suppress(FileNotFoundError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return pids


def cpu_seconds(pids):
    """User + system CPU time so far of those processes (every thread) and of their children that
    exited: a PostgreSQL backend whose connection a pool closed mid-run counts in the postmaster's."""
    ticks = 0
    for p in pids:
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres():
    """The pids of every PostgreSQL process: the postmaster, its helpers and every backend, the app's
    and anyone else's (the floor, which uses no database, shows what the others cost)."""
    pids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{p}/comm") as f:
            if f.read().strip() == "postgres":
                pids.append(int(p))
    return pids


def memory_mib(pid, key):
    """A /proc/<pid>/status figure (VmRSS now, VmHWM peak) summed over the tree, in MiB."""
    kib = 0
    for p in tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            kib += next((int(line.split()[1]) for line in f if line.startswith(key + ":")), 0)
    return kib / 1024


def cpu0():
    """CPU 0's busy seconds so far (interrupts included), and the seconds the host took it (steal)."""
    with open("/proc/stat") as f:
        line = next(line for line in f if line.startswith("cpu0 "))
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, line.split()[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def wait_idle(server, timeout=30):
    """Until the server's processes have used no CPU for half a second: the requests the last wrk
    run left in flight are done. Called before every wrk run, because runs must not overlap: with 64
    requests in flight, more than its 40 threads, the FastAPI peer deadlocks until SQLAlchemy's 30 s
    pool timeout (every thread waits for a pooled connection, while the requests holding the
    connections wait for a thread to finish in: fastapi/fastapi#3205)."""
    deadline, before = time.monotonic() + timeout, cpu_seconds(tree(server.proc.pid))
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if (now := cpu_seconds(tree(server.proc.pid))) - before <= 0.01:  # at most 1 tick of 10 ms
            return
        before = now
    say(f"{server.app} still busy {timeout} s after the last run; going on")


def wrk(server, endpoint, seconds, ids_file, tag):
    """One wrk run from CPU 1; returns what bench.lua prints."""
    path = {"list": "/api/v1/books?limit=20", "deep": server.deep, "search": f"/api/v1/books?q={SEARCH}"}.get(endpoint, "/")
    script = {"get": ["get", ids_file], "post": ["post", server.token, tag],
              "order": ["order", server.token, ids_file]}.get(endpoint, ["path"])
    cmd = pin(1) + [*WRK, f"-d{seconds}s", "-s", f"{HERE}/bench.lua", server.base + path, "--", *script]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((line for line in out.stdout.splitlines() if line.startswith("JSON ")), None)
    if out.returncode or line is None:
        raise AppError(f"wrk failed on {endpoint}: {(out.stderr or out.stdout).strip()[-300:]}")
    return json.loads(line.removeprefix("JSON "))


def timed(server, endpoint, seconds, ids_file, tag):
    """A wrk run, with the CPU time the server's tree, PostgreSQL and CPU 0 as a whole used meanwhile."""
    wait_idle(server)
    cpu, db = cpu_seconds(tree(server.proc.pid)), cpu_seconds(postgres())
    (busy, steal), started = cpu0(), time.monotonic()
    w = wrk(server, endpoint, seconds, ids_file, tag)
    if not w["requests"]:
        raise AppError(f"no request to {endpoint} was answered in {seconds} s (log: {server.log})")
    wall, requests, cpu = time.monotonic() - started, w["requests"], cpu_seconds(tree(server.proc.pid)) - cpu
    busy_after, steal_after = cpu0()
    return {"rps": requests / (w["duration_us"] / 1e6), "p50_ms": w["p50_us"] / 1e3, "p99_ms": w["p99_us"] / 1e3,
            "cpu_us": 1e6 * cpu / requests, "db_cpu_us": 1e6 * (cpu_seconds(postgres()) - db) / requests,
            "http_errors": w["err_status"],
            "socket_errors": sum(w[f"err_{e}"] for e in ("connect", "read", "write", "timeout")),
            # Noise on the server's CPU: time used by anything but the server, and time the host took.
            "others_pct": 100 * (busy_after - busy - cpu) / wall,
            "steal_pct": 100 * (steal_after - steal) / wall}


# == One app in one round =========================================================================

def measure(app, rnd, args, books):
    """Start, check, then per endpoint a warm-up and a timed run. Returns the timed runs, the peak
    RSS, and the RSS now: after a second pass of the timed runs too, for quire with --second-run."""
    server = start(app, args, books)
    try:
        check(server, books)
        ids_file = f"{WORK}/run/{app}.ids"  # the same books in the same shuffled order for every app
        order = list(range(len(books)))
        random.Random(7).shuffle(order)
        with open(ids_file, "w") as f:
            f.write("".join(f"{server.ids[i]}\n" for i in order))
        results = {}
        for endpoint in args.endpoints:
            wait_idle(server)
            wrk(server, endpoint, args.warmup, ids_file, f"warm{rnd}")
            results[endpoint] = r = timed(server, endpoint, args.duration, ids_file, f"round{rnd}")
            say(f"round {rnd}/{args.rounds} {app:7} {endpoint:6} {r['rps']:8,.0f} req/s  "
                f"p50 {r['p50_ms']:5.1f} ms  p99 {r['p99_ms']:6.1f} ms  {r['cpu_us']:6,.0f} CPU µs/req  "
                f"errors {r['http_errors']}/{r['socket_errors']}")
        peak, rss = memory_mib(server.proc.pid, "VmHWM"), [memory_mib(server.proc.pid, "VmRSS")]
        if app == "quire" and args.second_run:  # does memory keep growing under the same load?
            again = [timed(server, endpoint, args.duration, ids_file, f"again{rnd}") for endpoint in args.endpoints]
            errors = sum(r["http_errors"] + r["socket_errors"] for r in again)
            rss.append(memory_mib(server.proc.pid, "VmRSS"))
            say(f"round {rnd}/{args.rounds} quire second pass: {errors} errors, "
                f"RSS {rss[0]:.1f} -> {rss[1]:.1f} MiB")
            if errors:
                raise AppError(f"{errors} errors in the second pass (log: {server.log})")
        return results, peak, rss
    finally:
        stop(server)


# == The report ===================================================================================

def versions(python, distributions):
    """`name version, ...` of those installed where `python` runs."""
    code = ("import importlib.metadata as m, sys\nfor d in sys.argv[1:]:\n"
            "    try: print(d, m.version(d))\n    except m.PackageNotFoundError: pass")
    out = subprocess.run([python, "-c", code, *distributions], capture_output=True, text=True).stdout
    return ", ".join(out.splitlines())


def project_state():
    """quire's commit, as the report names it, and a hash of the code quire runs (its three modules
    and requirements.txt). Each round starts quire afresh from the working tree: an edit mid-run would
    make the rounds measure different code, and the report says so."""
    git = lambda *a: subprocess.run(["git", "-C", PROJECT, *a], capture_output=True, text=True).stdout.strip()
    label = (git("rev-parse", "--short", "HEAD") or "?") + (
        " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    code = hashlib.sha256()
    for name in QUIRE_FILES:
        with contextlib.suppress(FileNotFoundError), open(f"{PROJECT}/{name}", "rb") as f:
            code.update(name.encode() + b"\0" + f.read())
    return label, code.hexdigest()


def describe(args, state):
    """The report's opening lines: what ran, on what, with which versions."""
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split(" [")[0]
    database = ("SQLite, a file per app" if args.database == "sqlite" else
                "PostgreSQL on 127.0.0.1, unpinned: it shares both CPUs. CPU µs/req counts the app's own "
                "processes; the PostgreSQL column, every postgres process (anyone else's too)")
    command = f"{' '.join(WRK)} -d{args.duration}s"
    quire = versions(args.quire_python, ["starlette", "msgspec", "databases", "aiosqlite", "asyncpg", *SERVER])
    peers = versions(sys.executable, ["fastapi", "pydantic", "SQLAlchemy", "psycopg", "Flask", "gunicorn", *SERVER])
    return [f"quire at {state[0]} ({PROJECT}). Database: {database}. Every app starts every round on a fresh "
            f"database holding the same {args.books:,} books, pinned to CPU 0; `{command}` runs on CPU 1 after a "
            f"{args.warmup} s warm-up; {args.rounds} round(s), the apps in turn; medians.", "",
            f"Machine: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {wrk_version}.", "",
            f"- quire: the project, `python -m uvicorn api:app`; {quire}",
            *(f"- {app}: {PEERS[app][0]}" for app in args.apps if app in PEERS),
            f"- peers' versions: {peers}"]


def report(args, header, runs, peak, rss, failed):
    """The Markdown report: how it ran, req/s (CPU µs/req) per app, details, ratios, memory, noise."""
    def med(app, endpoint, key):
        return median(r[key] for r in runs[app, endpoint])

    apps, pg = [a for a in args.apps if a not in failed], args.database == "postgresql"
    out = [f"# quire bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "", *header, "",
           "| req/s (CPU µs/req) | " + " | ".join(args.endpoints) + " | peak RSS |",
           "|---|" + "---:|" * (len(args.endpoints) + 1)]
    for app in apps:
        cells = [f"{med(app, ep, 'rps'):,.0f} ({med(app, ep, 'cpu_us'):,.0f})" for ep in args.endpoints]
        out.append(f"| {app} | {' | '.join(cells)} | {median(peak[app]):.0f} MiB |")
    out += ["", "| app | endpoint | req/s | p50 ms | p99 ms | CPU µs/req |" + " all PostgreSQL CPU µs/req |" * pg
            + " errors HTTP/socket |", "|---|---|" + "---:|" * (5 + pg)]
    for app in apps:
        for ep in args.endpoints:
            rs, rps = runs[app, ep], [r["rps"] for r in runs[app, ep]]
            spread = f" ({min(rps):,.0f}–{max(rps):,.0f})" if len(rps) > 1 else ""
            out.append(f"| {app} | {ep} | {median(rps):,.0f}{spread} | {med(app, ep, 'p50_ms'):.1f} | "
                       f"{med(app, ep, 'p99_ms'):.1f} | {med(app, ep, 'cpu_us'):,.0f} | "
                       + f"{med(app, ep, 'db_cpu_us'):,.0f} | " * pg
                       + f"{sum(r['http_errors'] for r in rs)}/{sum(r['socket_errors'] for r in rs)} |")
    out.append("")
    for peer in [a for a in apps if a != "quire"] if "quire" in apps else []:
        cpu = ", ".join(f"{ep} {med(peer, ep, 'cpu_us') / med('quire', ep, 'cpu_us'):.2f}" for ep in args.endpoints)
        rps = ", ".join(f"{ep} {med('quire', ep, 'rps') / med(peer, ep, 'rps'):.2f}" for ep in args.endpoints)
        if peer == "floor":
            out.append(f"- quire vs floor: quire's fraction of the floor's req/s: {rps}; "
                       f"of its CPU µs/req (floor ÷ quire): {cpu}")
        else:
            out.append(f"- quire vs {peer}: CPU µs/req {peer} ÷ quire: {cpu}; req/s quire ÷ {peer}: {rps}")
    for rnd, after in enumerate(rss.get("quire", []), 1):
        out.append(f"- quire RSS, round {rnd}: {after[0]:.1f} MiB after the timed runs"
                   + (f", {after[1]:.1f} MiB after a second pass of them" if len(after) > 1 else ""))
    if runs:
        others, steal = ([r[key] for rs in runs.values() for r in rs] for key in ("others_pct", "steal_pct"))
        out.append(f"- Noise on CPU 0 during the timed runs: used by anything but the server (other "
                   f"processes, interrupts) a median {median(others):.0f}% (max {max(others):.0f}%) of the time; "
                   f"taken by the host (steal) a median {median(steal):.0f}% (max {max(steal):.0f}%). "
                   "Prefer CPU µs/req to req/s.")
    out += [f"- **{app} was dropped**: {why}" for app, why in failed.items()]
    return "\n".join(out)


# == Command line =================================================================================

def parse_args():
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n")[0])
    parser.add_argument("--apps", help="comma-separated, from quire,fastapi,flask,floor (default: all of "
                                       "them; with --database postgresql: quire,fastapi,floor)")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--quick", action="store_true", help="1 round of 5 s runs after 2 s warm-ups")
    parser.add_argument("--rounds", type=int, help="rounds, apps in turn within each (default 3)")
    parser.add_argument("--duration", type=int, help="seconds per timed run (default 10)")
    parser.add_argument("--second-run", action=argparse.BooleanOptionalAction, default=True,
                        help="run quire's timed runs twice a round, and report its RSS after each pass")
    parser.add_argument("--books", type=int, default=N_BOOKS,
                        help=f"books in the catalogue (default {N_BOOKS:,}); more than that measures quire's reads "
                             f"alone ({', '.join(READS)}), on SQLite, seeded with SQL")
    parser.add_argument("--quire-python", default=sys.executable,
                        help="python of a venv with the project's requirements (bench/run passes its own)")
    args = parser.parse_args()
    allowed = [app for app in ["quire", *PEERS] if args.database == "sqlite" or app in POSTGRES_APPS]
    args.apps = args.apps.split(",") if args.apps else allowed
    if not args.apps or set(args.apps) - set(allowed):
        parser.error(f"with --database {args.database}, --apps takes names from {','.join(allowed)}")
    if any(n is not None and n < 1 for n in (args.rounds, args.duration)):
        parser.error("--rounds and --duration take a positive number")
    if args.books < N_BOOKS and args.books < 100:
        parser.error("--books takes 100 or more")
    args.endpoints = ENDPOINTS if args.books <= N_BOOKS else READS
    if args.books > N_BOOKS:
        if args.database != "sqlite" or set(args.apps) != {"quire"}:
            parser.error(f"--books over {N_BOOKS:,} runs quire alone on SQLite: add --apps quire")
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (5 if args.quick else 10)
    args.warmup = 2 if args.quick else 3
    return args


def main():
    args = parse_args()
    for sub in ("run", "logs", "results"):
        os.makedirs(f"{WORK}/{sub}", exist_ok=True)
    if args.database == "postgresql":
        try:
            psycopg.connect(f"{PG_SERVER}/postgres").close()
        except psycopg.Error as e:
            say(f"PostgreSQL at {PG_SERVER} cannot be reached: {e}")
            return 2
    if os.path.exists(f"{PROJECT}/.env"):
        say(f"note: quire also reads {PROJECT}/.env (the variables the bench sets win)")
    if os.cpu_count() >= 2:
        os.sched_setaffinity(0, {1})  # this process and quire's seeding client stay off the server's CPU
    books, state = make_books(args.books), project_state()
    header = describe(args, state)  # before the run: the versions and the commit it starts from
    runs, peak, rss, failed = {}, {}, {}, {}
    for rnd in range(1, args.rounds + 1):
        for app in args.apps:
            if app in failed:
                continue
            try:
                results, peak_mib, rss_mib = measure(app, rnd, args, books)
            except Exception as e:  # an app that fails is dropped, with why, and the others go on
                failed[app] = f"round {rnd}: {e}" if isinstance(e, AppError) else f"round {rnd}: {e!r}"
                say(f"{app} dropped: {failed[app]}")
                continue
            for endpoint, result in results.items():
                runs.setdefault((app, endpoint), []).append(result)
            peak.setdefault(app, []).append(peak_mib)
            rss.setdefault(app, []).append(rss_mib)
    text = report(args, header, runs, peak, rss, failed)
    if (state_now := project_state())[1] != state[1]:
        text += (f"\n- **quire's code changed during the run** ({', '.join(QUIRE_FILES)}; at the "
                 f"start: {state[0]}, at the end: {state_now[0]}): its figures may not all come from the code "
                 "the run started with. Run again.")
    path = f"{WORK}/results/{time.strftime('%Y%m%d-%H%M%S')}.md"
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text)
    say(f"report saved to {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the running server was stopped on the way out (measure's finally)
        say("interrupted")
        sys.exit(130)
