"""The SQL store: connections, migrations and every query quire makes.

store.py knows SQL and nothing about HTTP. It hands rows to api.py as plain dicts and reports
trouble with its own exceptions (`Unavailable`, `Conflict`), which api.py turns into statuses.

The `databases` package owns connecting and pooling. The queries themselves run on the driver's
own connection (`Connection.raw_connection`), because the profile says so: on SQLite `databases`
opens a new connection and thread for every query made outside a held connection, and on both
databases it recompiles every query through SQLAlchemy (about 35 µs, more than a primary-key
lookup costs). So quire holds its connections:

- SQLite: one writer connection, with an `asyncio.Lock` so that a process writes one statement
  or transaction at a time (several worker processes wait for each other through the busy
  timeout), and two readers (WAL lets them read while a write is under way). Reads that use an
  index run on a plain `sqlite3` connection right on the event loop: a primary-key lookup takes
  ~9 µs there, against ~50 µs through aiosqlite's thread and back, so the hop would cost more
  than the query. So do writes and transactions, on a second plain connection that never waits
  for a lock: while another process writes, they go to the writer's thread to wait. A read no
  index bounds (the `q` search: a broad pattern matches most of the catalogue, and one or two
  characters scan it) starts on the loop too, with a budget of SQLite's work (about half a
  millisecond); one that needs more is interrupted and run again on the threaded reader, where
  it may take as long as it must without stalling the loop.
- PostgreSQL: a pool; each query borrows a connection for as long as it runs.

SQL is written once, with `:name` parameters: sqlite3 binds those itself, and for asyncpg they are
rewritten to `$1, $2, ...` once per statement. Every value is a bound parameter.

Writes that must not lose an update are single statements with a condition (compare-and-set):
`UPDATE ... WHERE id = :id AND version = :version`. Reading a row and writing it back in Python
loses updates silently on PostgreSQL.
"""

import asyncio
import contextlib
import datetime
import functools
import re
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import databases
import databases.core

Row = dict[str, Any]
Run = Callable[[str, dict[str, Any]], Awaitable[list[Row]]]


class Unavailable(Exception):
    """The database cannot be reached (yet); the caller should try again later."""


# What PostgreSQL answers while it shuts down, restarts or is out of connections: a 503 to retry,
# like a lost connection, not a 500.
UNAVAILABLE = (asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, asyncpg.CannotConnectNowError,
               asyncpg.TooManyConnectionsError)


# Every SQLite connection that writes. synchronous=NORMAL: a committed write is in the WAL file
# before the 2xx goes out, so it survives the process being killed; only a power cut may lose the
# last commits (FULL would fsync each one, at some 0.5 ms a write).
WRITER_PRAGMAS = ["foreign_keys = ON", "synchronous = NORMAL"]
# How long a read no index bounds may hold the event loop, in thousands of SQLite's instructions:
# 20 is about 0.5 ms here. A `q` with a handful of matches needs under 1 at 100,000 books; `the`,
# matching every one of them, needs 400 (10 ms), and goes to the reader's thread.
LOOP_READ_BUDGET = 20


def sqlite_error(error: sqlite3.Error) -> int:
    """The primary result code of a sqlite3 error (SQLITE_BUSY for SQLITE_BUSY_RECOVERY too)."""
    return getattr(error, "sqlite_errorcode", 0) & 0xFF


class Refused(Exception):
    """An order line cannot be served: `reason` is "out-of-stock" (with the copies `left`) or
    "not-for-sale" (the book is gone or has no price); `line` is its index in the order as sent."""

    def __init__(self, line: int, reason: str, left: int | None = None) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line, self.reason, self.left = line, reason, left


class Conflict(Exception):
    """A unique constraint refused the write; `field` names the column (email, isbn)."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} is already taken")
        self.field = field


def translated(error: BaseException) -> Exception | None:
    """The store's own exception for a driver's, or None to let it through."""
    if isinstance(error, sqlite3.IntegrityError):
        if getattr(error, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_UNIQUE":
            return Conflict(str(error).rsplit(".", 1)[-1])
    elif isinstance(error, sqlite3.OperationalError):
        if sqlite_error(error) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return Unavailable("the database stayed locked past the busy timeout")
    elif isinstance(error, asyncpg.UniqueViolationError):
        return Conflict(error.constraint_name.split("_")[1])
    elif isinstance(error, (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, *UNAVAILABLE)):
        # The server went away; the pool replaces broken connections once it is back.
        return Unavailable(f"lost the database: {type(error).__name__}")
    return None


class DriverErrors:
    """`with DRIVER_ERRORS:` turns the drivers' exceptions into the store's own (`translated`).

    A class, not a `@contextlib.contextmanager`: it is entered on every query, and a generator
    costs several times more to start and finish. Plain, not async: an async one would cost a
    coroutine per query, and it has nothing to await."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        own = translated(error) if error is not None else None
        if own is not None:
            raise own from error


DRIVER_ERRORS = DriverErrors()


def utc_now() -> str:
    """The current time as RFC 3339 text; fixed width, so text order is time order."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Both databases get the same schema; only the id column and the title's collation are spelled
# differently. Titles compare in code-point order on both (SQLite's BINARY, PostgreSQL's "C").
# Ids come from AUTOINCREMENT / an identity sequence, so a deleted id is never handed out again.
# `title_fold` and `author_fold` hold str.casefold() of the text, computed in Python so that
# case-insensitive search answers the same on both databases.
DIALECTS = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "c": ""},
    "postgresql": {"id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "c": 'COLLATE "C"'},
}

MIGRATIONS = [
    # 1: users, revoked tokens, the generated secret key
    """
    CREATE TABLE users (
        id {id},
        email TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        role TEXT NOT NULL DEFAULT 'user',
        password_hash TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE revoked_tokens (jti TEXT PRIMARY KEY, expires_at BIGINT NOT NULL);
    CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at);
    CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: books, with an index for every sort order a list can ask for
    """
    CREATE TABLE books (
        id {id},
        title TEXT {c} NOT NULL,
        author TEXT NOT NULL,
        year INTEGER,
        pages INTEGER,
        isbn TEXT UNIQUE,
        owner_id BIGINT NOT NULL REFERENCES users (id),
        title_fold TEXT NOT NULL,
        author_fold TEXT NOT NULL,
        version BIGINT NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX books_title ON books (title, id);
    CREATE INDEX books_author ON books (author_fold, id);
    CREATE INDEX books_author_title ON books (author_fold, title, id);
    CREATE INDEX books_owner ON books (owner_id);
    """,
    # 3: the shop. Books get a price (NULL: not for sale) and a stock. An order's lines copy the
    # book's title and price of the moment and have no foreign key to books, so a later price
    # change or deletion of the book leaves the order as it was. Idempotency keys are kept per
    # user, hashed, with the request's fingerprint and the response it was answered with.
    """
    ALTER TABLE books ADD COLUMN price_cents BIGINT;
    ALTER TABLE books ADD COLUMN stock BIGINT NOT NULL DEFAULT 0 CHECK (stock >= 0);
    CREATE TABLE orders (
        id {id},
        buyer_id BIGINT NOT NULL REFERENCES users (id),
        status TEXT NOT NULL,
        total_cents BIGINT NOT NULL,
        version BIGINT NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX orders_buyer ON orders (buyer_id, id);
    CREATE INDEX orders_status ON orders (status, id);
    CREATE TABLE order_lines (
        order_id BIGINT NOT NULL REFERENCES orders (id),
        position INTEGER NOT NULL,
        book_id BIGINT NOT NULL,
        title TEXT NOT NULL,
        quantity INTEGER NOT NULL,
        unit_price_cents BIGINT NOT NULL,
        PRIMARY KEY (order_id, position)
    );
    CREATE TABLE idempotency_keys (
        user_id BIGINT NOT NULL,
        key_hash TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        status INTEGER,
        body TEXT,
        location TEXT,
        etag TEXT,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (user_id, key_hash)
    );
    CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
    """,
    # 4: sessions. Signing in starts a session; its refresh tokens are kept only as SHA-256 hashes,
    # each spent once (rotation). A password change moves the user's token generation on, which
    # every older access token carries and so no longer matches. Failed sign-ins are counted per
    # lower-cased email, for every worker and host on this database.
    """
    ALTER TABLE users ADD COLUMN token_generation BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE sessions (
        id {id},
        user_id BIGINT NOT NULL REFERENCES users (id),
        generation BIGINT NOT NULL,
        revoked BOOLEAN NOT NULL DEFAULT FALSE,
        created_at TEXT NOT NULL
    );
    CREATE INDEX sessions_user ON sessions (user_id);
    CREATE TABLE refresh_tokens (
        token_hash TEXT PRIMARY KEY,
        session_id BIGINT NOT NULL REFERENCES sessions (id),
        spent BOOLEAN NOT NULL DEFAULT FALSE,
        expires_at BIGINT NOT NULL
    );
    CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);
    CREATE TABLE sign_in_failures (id {id}, email TEXT NOT NULL, failed_at DOUBLE PRECISION NOT NULL);
    CREATE INDEX sign_in_failures_email ON sign_in_failures (email, failed_at);
    """,
    # 5: trigram indexes, so that a `q` search costs what its matches cost, not what the catalogue
    # does. Each database has its own, so this one is a list of statements per dialect (a trigger's
    # body holds semicolons). SQLite: an FTS5 table of the folded columns, kept in step with books
    # by triggers in the same transaction as each write; merging its segments early (automerge 2,
    # crisismerge 4) halves a search's cost for about the same cost per write. PostgreSQL: pg_trgm's
    # GIN indexes, which serve `LIKE '%...%'` themselves (creating the extension needs the right to;
    # README); without a pending list (fastupdate off), which every search would scan until a vacuum.
    {"sqlite": [
        "CREATE VIRTUAL TABLE books_fts USING fts5(title_fold, author_fold, content='books', content_rowid='id', "
        "tokenize='trigram case_sensitive 1')",
        "INSERT INTO books_fts (books_fts) VALUES ('rebuild')",
        "INSERT INTO books_fts (books_fts, rank) VALUES ('automerge', 2)",
        "INSERT INTO books_fts (books_fts, rank) VALUES ('crisismerge', 4)",
        "CREATE TRIGGER books_fts_insert AFTER INSERT ON books BEGIN "
        "INSERT INTO books_fts (rowid, title_fold, author_fold) VALUES (new.id, new.title_fold, new.author_fold); END",
        "CREATE TRIGGER books_fts_delete AFTER DELETE ON books BEGIN "
        "INSERT INTO books_fts (books_fts, rowid, title_fold, author_fold) "
        "VALUES ('delete', old.id, old.title_fold, old.author_fold); END",
        "CREATE TRIGGER books_fts_update AFTER UPDATE OF title_fold, author_fold ON books BEGIN "
        "INSERT INTO books_fts (books_fts, rowid, title_fold, author_fold) "
        "VALUES ('delete', old.id, old.title_fold, old.author_fold); "
        "INSERT INTO books_fts (rowid, title_fold, author_fold) VALUES (new.id, new.title_fold, new.author_fold); END"],
     "postgresql": [
        "CREATE EXTENSION IF NOT EXISTS pg_trgm",
        "CREATE INDEX books_title_trigrams ON books USING gin (title_fold gin_trgm_ops) WITH (fastupdate = off)",
        "CREATE INDEX books_author_trigrams ON books USING gin (author_fold gin_trgm_ops) WITH (fastupdate = off)"]},
    # 6: an attempt is counted before its password is checked; `checked` tells the failures from the
    # attempts still being checked, so that sign-ins sent at once are not told that they failed.
    # The rows already there were failures.
    "ALTER TABLE sign_in_failures ADD COLUMN checked BOOLEAN NOT NULL DEFAULT TRUE",
]


@functools.cache
def numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """Rewrite `:name` parameters as asyncpg's `$1, $2, ...`; `::` casts are left alone."""
    names: list[str] = []

    def number(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return re.sub(r"(?<!:):([a-z_][a-z0-9_]*)", number, sql), tuple(names)


async def keep_session(connection: asyncpg.Connection) -> None:
    """asyncpg's pool still rolls back a transaction left open; there is nothing else to undo."""


class Store:
    """One database, connected when first needed and re-connected after it went away."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            # busy timeout (seconds): another worker process may hold the write lock briefly.
            options: dict[str, Any] = {"timeout": 5.0}
        else:
            # A dead server should cost a request seconds, not asyncpg's default minute. quire
            # leaves no session state on a connection (no SET, LISTEN, cursors or session-level
            # advisory locks), so the pool can skip the reset query it would otherwise send each
            # time a connection comes back: one round trip fewer per query.
            options = {"min_size": 1, "max_size": pool_size, "timeout": 5, "reset": keep_session}
        self.database = databases.Database(url, **options)
        self._connected = False
        self._connect_lock: asyncio.Lock | None = None
        self._last_failure = 0.0
        self._loop_reader: sqlite3.Connection | None = None
        self._loop_writer: sqlite3.Connection | None = None
        self._reader: databases.core.Connection | None = None
        self._writer: databases.core.Connection | None = None
        self._write_lock: asyncio.Lock | None = None
        self._last_purge = 0.0  # when expired idempotency keys were last purged (time.time())
        self._last_failure_purge = 0.0  # when old failed sign-ins were last purged

    # -- connecting ------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and migrate, unless already done; raises `Unavailable` when it cannot.

        Called by every request that needs the database, so the app also works mounted in a
        parent that never runs its lifespan. After a failure, requests within the next second
        are refused at once instead of each waiting for the database again.
        """
        if self._connected:
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._connected:
                return
            if time.monotonic() - self._last_failure < 1.0:
                raise Unavailable("the database was unreachable a moment ago")
            try:
                await self._open()
                await self.migrate()
            except Exception as error:
                self._last_failure = time.monotonic()
                await self._close()
                raise Unavailable(f"cannot connect to the database: {type(error).__name__}") from error
            self._connected = True

    async def _open(self) -> None:
        await self.database.connect()
        if self.is_sqlite:
            self._write_lock = asyncio.Lock()
            self._writer = await self._hold_connection()
            self._reader = await self._hold_connection()
            # Ask the writer which file it opened: `databases` builds the name from the whole URL,
            # query string included, so the URL's path alone may name another file.
            main = next(row for row in await self._writer.raw_connection.execute_fetchall("PRAGMA database_list")
                        if row["name"] == "main")
            if main["file"]:  # an in-memory database is seen by its own connection only
                self._loop_reader = self._open_on_loop(main["file"], timeout=0.2, pragmas=["query_only = ON"])
                self._loop_writer = self._open_on_loop(main["file"], timeout=0, pragmas=WRITER_PRAGMAS)

    @staticmethod
    def _open_on_loop(file: str, *, timeout: float, pragmas: list[str]) -> sqlite3.Connection:
        """A plain sqlite3 connection for the event loop's own thread to use. That thread may
        change between event loops (one TestClient after another), hence check_same_thread=False.

        It waits for a lock with the loop stopped, so: the reader at most 0.2 s (under WAL only a
        crash recovery or a checkpoint that resets the log makes a reader wait), the writer not
        at all (another process writing: the threaded writer waits out the busy timeout instead)."""
        connection = sqlite3.connect(file, timeout=timeout, isolation_level=None, check_same_thread=False)
        for pragma in pragmas:
            connection.execute(f"PRAGMA {pragma}")
        return connection

    async def _hold_connection(self) -> databases.core.Connection:
        """A connection of our own for the app's life, not the per-task one `connection()` gives."""
        connection = databases.core.Connection(self.database, self.database._backend)
        await connection.__aenter__()
        raw = connection.raw_connection
        raw.row_factory = sqlite3.Row
        # WAL: readers never wait for the writer.
        try:
            await self._switch_to_wal(raw)
            for pragma in WRITER_PRAGMAS:
                await raw.execute(f"PRAGMA {pragma}")
        except BaseException:
            # Closed here, or its aiosqlite thread (not a daemon) would keep the process from exiting.
            await connection.__aexit__(None, None, None)
            raise
        return connection

    @staticmethod
    async def _switch_to_wal(raw: Any) -> None:
        """`PRAGMA journal_mode = WAL`, retried for up to five seconds: switching a fresh database
        takes an exclusive lock, and when waiting for it could deadlock SQLite answers "busy" at
        once instead of waiting out the busy timeout, so workers starting together retry."""
        for attempt in range(50):
            try:
                await raw.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                if attempt == 49 or sqlite_error(error) != sqlite3.SQLITE_BUSY:
                    raise
                await asyncio.sleep(0.1)

    async def _close(self) -> None:
        for connection in (self._reader, self._writer):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.__aexit__(None, None, None)
        for plain in (self._loop_reader, self._loop_writer):
            if plain is not None:
                plain.close()
        self._reader = self._writer = self._loop_reader = self._loop_writer = None
        with contextlib.suppress(Exception):
            await self.database.disconnect()

    async def disconnect(self) -> None:
        self._connected = False
        await self._close()

    # -- running SQL -----------------------------------------------------------------------------

    async def _sqlite(self, connection: databases.core.Connection, sql: str, values: dict) -> list[Row]:
        rows = await connection.raw_connection.execute_fetchall(sql, values)
        return [dict(row) for row in rows]

    @staticmethod
    def _on_loop(connection: sqlite3.Connection, sql: str, values: dict) -> list[Row]:
        cursor = connection.execute(sql, values)
        columns = [column[0] for column in cursor.description or ()]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]

    def _write_on_loop(self, sql: str, values: dict) -> list[Row] | None:
        """One statement on the loop's writer, or None when another process holds the write lock.

        Cheaper than the writer's thread by the hop there and back (a POST of a book: ~580 → ~490
        µs of CPU under load), for the ~0.1 ms that SQLite takes to write a row with the loop
        stopped (and now and then an automatic checkpoint of the log: under load, p99 unchanged)."""
        try:
            return self._on_loop(self._loop_writer, sql, values)
        except sqlite3.OperationalError as error:
            if sqlite_error(error) == sqlite3.SQLITE_BUSY:
                return None  # nothing was written: the statement could not start
            raise
        finally:
            if self._loop_writer.in_transaction:  # never left holding the lock, whatever went wrong
                self._loop_writer.execute("ROLLBACK")

    def _read_on_loop_briefly(self, sql: str, values: dict) -> list[Row] | None:
        """A read no index bounds, on the loop's reader for at most `LOOP_READ_BUDGET` thousands
        of SQLite's instructions; None when it needed more. SQLite calls `spend` every 1,000 of
        them, and a true answer interrupts the statement (a read: nothing to undo)."""
        spent = 0

        def spend() -> bool:
            nonlocal spent
            spent += 1
            return spent > LOOP_READ_BUDGET

        self._loop_reader.set_progress_handler(spend, 1000)
        try:
            return self._on_loop(self._loop_reader, sql, values)
        except sqlite3.OperationalError as error:
            if sqlite_error(error) == sqlite3.SQLITE_INTERRUPT:
                return None
            raise
        finally:
            self._loop_reader.set_progress_handler(None, 0)

    @staticmethod
    async def _postgres(raw: asyncpg.Connection, sql: str, values: dict) -> list[Row]:
        query, names = numbered(sql)
        rows = await raw.fetch(query, *[values[name] for name in names])
        return [dict(row) for row in rows]

    async def query(self, sql: str, values: dict[str, Any] | None = None, *,
                    write: bool = False, scan: bool = False) -> list[Row]:
        """Run one statement and return its rows; `write=True` for anything that changes data,
        `scan=True` for one whose cost no index bounds to a page (a write runs in a thread, off the
        loop; a read runs on the loop only while it stays within `LOOP_READ_BUDGET`)."""
        if not self._connected:
            await self.connect()
        values = values or {}
        with DRIVER_ERRORS:
            if not self.is_sqlite:
                async with self.database.connection() as connection:
                    return await self._postgres(connection.raw_connection, sql, values)
            if write:
                async with self._write_lock:
                    if not scan and self._loop_writer is not None:
                        rows = self._write_on_loop(sql, values)
                        if rows is not None:
                            return rows
                    return await self._sqlite(self._writer, sql, values)
            if self._loop_reader is None:
                return await self._sqlite(self._reader, sql, values)
            if scan:
                rows = self._read_on_loop_briefly(sql, values)
                return rows if rows is not None else await self._sqlite(self._reader, sql, values)
            return self._on_loop(self._loop_reader, sql, values)

    async def one(self, sql: str, values: dict[str, Any] | None = None, *, write: bool = False) -> Row | None:
        rows = await self.query(sql, values, write=write)
        return rows[0] if rows else None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Run]:
        """Several statements that commit together or not at all; yields a `run(sql, values)`.

        SQLite's `BEGIN IMMEDIATE` takes the write lock up front, so two processes never both
        read and then both try to upgrade to writing (which SQLite would refuse).
        """
        if not self._connected:  # a transaction may be a fresh app's first use of the store
            await self.connect()
        async with self._transaction() as run:
            yield run

    @contextlib.asynccontextmanager
    async def _transaction(self, *, on_loop: bool = True) -> AsyncIterator[Run]:
        """`transaction()` without connecting first: what `migrate` runs in, while connecting.

        On SQLite it runs on the loop's writer, as single writes do, unless `on_loop` is False or
        another process holds the write lock: then on the writer's thread, which waits for it."""
        with DRIVER_ERRORS:
            if self.is_sqlite:
                async with self._write_lock:
                    if on_loop and self._begin_on_loop():
                        try:
                            yield self._run_on_loop
                            self._loop_writer.execute("COMMIT")
                        finally:
                            if self._loop_writer.in_transaction:  # the block raised, or COMMIT did
                                self._loop_writer.execute("ROLLBACK")
                        return
                    writer = self._writer.raw_connection
                    try:
                        await writer.execute("BEGIN IMMEDIATE")
                        yield functools.partial(self._sqlite, self._writer)
                        await writer.execute("COMMIT")
                    except BaseException:
                        await self._roll_back(writer)
                        raise
            else:
                async with self.database.connection() as connection:
                    raw = connection.raw_connection
                    async with raw.transaction():
                        yield functools.partial(self._postgres, raw)

    def _begin_on_loop(self) -> bool:
        """`BEGIN IMMEDIATE` on the loop's writer; False when there is none, or when another process
        holds the write lock (it does not wait: the writer's thread does)."""
        if self._loop_writer is None:
            return False
        try:
            self._loop_writer.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            if sqlite_error(error) == sqlite3.SQLITE_BUSY:
                return False
            raise
        return True

    async def _run_on_loop(self, sql: str, values: dict[str, Any]) -> list[Row]:
        """A transaction's `run` on the loop's writer: it holds the write lock, so nothing waits."""
        return self._on_loop(self._loop_writer, sql, values)

    @staticmethod
    async def _roll_back(writer: Any) -> None:
        """Roll back SQLite's one writer, which must never be left inside a transaction. Also after
        a request cancelled while its BEGIN (or COMMIT) waited for another process's lock: that
        statement still runs in aiosqlite's thread, and this ROLLBACK runs after it there. Had the
        BEGIN failed, or the COMMIT gone through, there is nothing to roll back."""
        try:
            await writer.execute("ROLLBACK")
        except sqlite3.OperationalError:
            if writer.in_transaction:
                raise

    # -- migrations ------------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Apply the migrations this database has not seen, each recorded by its number.

        Safe when several workers start at once on a fresh database: on SQLite the transaction
        holds the write lock, on PostgreSQL an advisory lock; the others wait, then find the
        work done.
        """
        name = "sqlite" if self.is_sqlite else "postgresql"
        # On the writer's thread: a migration may rebuild an index over the whole catalogue.
        async with self._transaction(on_loop=False) as run:
            if not self.is_sqlite:
                await run("SELECT pg_advisory_xact_lock(:key)", {"key": 7_165_017})
            await run("CREATE TABLE IF NOT EXISTS schema_migrations "
                      "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)", {})
            applied = {row["version"] for row in await run("SELECT version FROM schema_migrations", {})}
            for version, script in enumerate(MIGRATIONS, start=1):
                if version in applied:
                    continue
                statements = script[name] if isinstance(script, dict) else script.format(**DIALECTS[name]).split(";")
                for statement in statements:
                    if statement.strip():
                        await run(statement, {})
                await run("INSERT INTO schema_migrations (version, applied_at) VALUES (:v, :at)",
                          {"v": version, "at": utc_now()})

    async def secret_key(self) -> str:
        """The key kept in the database, made once at random by whichever worker comes first."""
        await self.query(
            "INSERT INTO settings (name, value) VALUES ('secret_key', :value) ON CONFLICT (name) DO NOTHING",
            {"value": secrets.token_urlsafe(48)}, write=True)
        row = await self.one("SELECT value FROM settings WHERE name = 'secret_key'")
        return row["value"]

    async def ping(self) -> None:
        await self.query("SELECT 1")

    # -- users -----------------------------------------------------------------------------------

    USER = "id, email, name, role, created_at"

    async def create_user(self, *, email: str, name: str, password_hash: str, role: str = "user") -> Row:
        """Raises `Conflict("email")` when the (lower-case) email is taken."""
        return await self.one(
            f"INSERT INTO users (email, name, role, password_hash, created_at) "
            f"VALUES (:email, :name, :role, :hash, :now) RETURNING {self.USER}",
            {"email": email, "name": name, "role": role, "hash": password_hash, "now": utc_now()},
            write=True)

    async def promote_user(self, email: str) -> Row | None:
        return await self.one(f"UPDATE users SET role = 'admin' WHERE email = :email RETURNING {self.USER}",
                              {"email": email}, write=True)

    async def get_user(self, user_id: int) -> Row | None:
        return await self.one(f"SELECT {self.USER} FROM users WHERE id = :id", {"id": user_id})

    async def get_login(self, email: str, *, failures_since: float = 0.0) -> Row:
        """For signing in, in one statement: `attempts` (the sign-ins for this email after
        `failures_since` that failed or are still being checked), `failures` (those that failed)
        and `oldest` (the first failure), and the user with this email, its password hash and
        token generation (`id` None when no user has it). An attempt still unchecked after a minute
        was cut off mid-check (its client left): it counts as failed."""
        columns = ", ".join(f"u.{column}" for column in self.USER.split(", "))
        failed = "checked OR failed_at <= :cut_off"
        return await self.one(
            f"SELECT f.attempts, f.failures, f.oldest, {columns}, u.password_hash, u.token_generation FROM "
            f"(SELECT count(*) AS attempts, count(CASE WHEN {failed} THEN 1 END) AS failures, "
            f"min(CASE WHEN {failed} THEN failed_at END) AS oldest FROM sign_in_failures "
            f"WHERE email = :email AND failed_at > :since) AS f LEFT JOIN users AS u ON u.email = :email",
            {"email": email, "since": failures_since, "cut_off": time.time() - 60})

    async def attempt_sign_in(self, email: str, *, window: float) -> Row:
        """Count a sign-in for `email` *before* its password is checked (an attempt, not yet
        `checked`), then read `get_login`'s row (its `attempts` include this one) and `attempt`
        (the id to forget, mark failed or clear).

        Counted first, because checking a password takes a tenth of a second: attempts sent all at
        once would otherwise each read the count before any of them wrote a failure, and a
        guesser would get as many tries as it can send in parallel. Counted first, no more than
        the limit of them can find a count under it. Failures older than the window are purged
        at most every ten minutes, so the table stays small."""
        now = time.time()
        if now - self._last_failure_purge >= 600:
            self._last_failure_purge = now
            await self.query("DELETE FROM sign_in_failures WHERE failed_at <= :before",
                             {"before": now - window}, write=True, scan=True)
        attempt = await self.one("INSERT INTO sign_in_failures (email, failed_at, checked) "
                                 "VALUES (:email, :now, FALSE) RETURNING id", {"email": email, "now": now}, write=True)
        return {**await self.get_login(email, failures_since=now - window), "attempt": attempt["id"]}

    async def forget_attempt(self, attempt: int) -> None:
        """An attempt refused before its password was checked is not a failure."""
        await self.query("DELETE FROM sign_in_failures WHERE id = :id", {"id": attempt}, write=True)

    async def attempt_failed(self, attempt: int) -> None:
        await self.query("UPDATE sign_in_failures SET checked = TRUE WHERE id = :id", {"id": attempt}, write=True)

    async def clear_failures(self, email: str, attempt: int) -> None:
        """After a success: the email's failures and this attempt go; other attempts still being
        checked stay, each to be a failure or to clear in turn."""
        await self.query("DELETE FROM sign_in_failures WHERE email = :email AND (checked OR id = :attempt)",
                         {"email": email, "attempt": attempt}, write=True)

    async def get_token_user(self, user_id: int, jti: str, *, session_id: int | None,
                             generation: int) -> Row | None:
        """The token's user, with `revoked` true when the token was revoked: logged out, its
        session revoked, or issued before the user's last password change (another generation).
        None when the user is gone. One query, for every authenticated request."""
        return await self.one(
            f"SELECT {self.USER}, (token_generation <> :generation "
            f"OR EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = :jti) "
            f"OR EXISTS (SELECT 1 FROM sessions WHERE id = :session_id AND revoked)) AS revoked "
            f"FROM users WHERE id = :id",
            {"id": user_id, "jti": jti, "session_id": session_id, "generation": generation})

    async def log_out(self, jti: str, expires_at: int, session_id: int | None) -> None:
        """Remember a logged-out token until it expires anyway (forgetting the ones that have) and
        end its session, refresh token included, in one transaction: never one without the other."""
        async with self.transaction() as run:
            await run("DELETE FROM revoked_tokens WHERE expires_at < :now", {"now": int(time.time()) - 60})
            await run("INSERT INTO revoked_tokens (jti, expires_at) VALUES (:jti, :exp) "
                      "ON CONFLICT (jti) DO NOTHING", {"jti": jti, "exp": expires_at})
            if session_id is not None:
                await run("UPDATE sessions SET revoked = TRUE WHERE id = :id", {"id": session_id})

    # -- sessions and refresh tokens --------------------------------------------------------------

    async def start_session(self, user_id: int, *, generation: int, refresh_hash: str, expires_at: int) -> int:
        """A new session for the user, with its first refresh token; its id. `generation` is the
        user's token generation when the password was checked: a password change committed in
        between moves the user's on, and the session is then refused at its first refresh."""
        async with self.transaction() as run:
            [session] = await run("INSERT INTO sessions (user_id, generation, created_at) "
                                  "VALUES (:user_id, :generation, :now) RETURNING id",
                                  {"user_id": user_id, "generation": generation, "now": utc_now()})
            await run("INSERT INTO refresh_tokens (token_hash, session_id, expires_at) "
                      "VALUES (:hash, :session_id, :expires_at)",
                      {"hash": refresh_hash, "session_id": session["id"], "expires_at": expires_at})
        return session["id"]

    async def rotate_refresh_token(self, refresh_hash: str, *, new_hash: str, expires_at: int) -> Row | str:
        """Spend a refresh token and give its session the next one: the session's user (its row,
        with `session_id` and `token_generation`) when the token was good; "reused" when it had
        been spent already, which revokes its whole session (RFC 9700 §4.14.2: a spent token
        presented again means one of the two presenters stole it); "invalid" for any other token.

        Spending is a compare-and-set (`... WHERE NOT spent`), so of two concurrent refreshes
        with one token exactly one succeeds."""
        now = int(time.time())
        async with self.transaction() as run:
            spent = await run(
                "UPDATE refresh_tokens SET spent = TRUE WHERE token_hash = :hash AND NOT spent "
                "AND expires_at > :now AND session_id IN (SELECT s.id FROM sessions AS s JOIN users AS u "
                "ON u.id = s.user_id WHERE NOT s.revoked AND s.generation = u.token_generation) "
                "RETURNING session_id", {"hash": refresh_hash, "now": now})
            if not spent:
                known = await run("SELECT session_id, spent FROM refresh_tokens WHERE token_hash = :hash",
                                  {"hash": refresh_hash})
                if known and known[0]["spent"]:
                    await run("UPDATE sessions SET revoked = TRUE WHERE id = :id", {"id": known[0]["session_id"]})
                    return "reused"  # committed: the revocation must stand although the request fails
                return "invalid"
            session_id = spent[0]["session_id"]
            await run("INSERT INTO refresh_tokens (token_hash, session_id, expires_at) "
                      "VALUES (:hash, :session_id, :expires_at)",
                      {"hash": new_hash, "session_id": session_id, "expires_at": expires_at})
            [user] = await run(f"SELECT {', '.join('u.' + c for c in self.USER.split(', '))}, u.token_generation, "
                               f"s.id AS session_id FROM sessions AS s JOIN users AS u ON u.id = s.user_id "
                               f"WHERE s.id = :id", {"id": session_id})
            return user

    async def change_password(self, user_id: int, password_hash: str) -> None:
        """Set a new password hash and refuse every token issued before: the user's token
        generation moves on (older access tokens no longer match it) and every session is
        revoked (their refresh tokens with them), in one transaction."""
        async with self.transaction() as run:
            await run("UPDATE users SET password_hash = :hash, token_generation = token_generation + 1 "
                      "WHERE id = :id", {"id": user_id, "hash": password_hash})
            await run("UPDATE sessions SET revoked = TRUE WHERE user_id = :id AND NOT revoked", {"id": user_id})

    async def list_users(self, *, limit: int, descending: bool, after: int | None) -> list[Row]:
        """Up to `limit` users in id order, after the id `after` (keyset pagination)."""
        condition = "" if after is None else ("WHERE id < :after" if descending else "WHERE id > :after")
        order = "DESC" if descending else "ASC"
        return await self.query(f"SELECT {self.USER} FROM users {condition} ORDER BY id {order} LIMIT :limit",
                                {"after": after, "limit": limit} if after is not None else {"limit": limit})

    # -- books -----------------------------------------------------------------------------------

    BOOK = "id, title, author, year, pages, isbn, price_cents, stock, owner_id, version, created_at, updated_at"

    GET_BOOK = f"SELECT {BOOK} FROM books WHERE id = :id"  # made once: the busiest statement of all

    async def get_book(self, book_id: int) -> Row | None:
        return await self.one(self.GET_BOOK, {"id": book_id})

    async def create_book(self, *, owner_id: int, fields: dict[str, Any], run: Run | None = None) -> Row:
        """Raises `Conflict("isbn")` when the ISBN is taken. Runs in the caller's transaction when
        given its `run`, else as a statement of its own."""
        now = utc_now()
        values = {"year": None, "pages": None, "isbn": None, "price_cents": None, "stock": 0, **fields,
                  "owner_id": owner_id, "now": now,
                  "title_fold": fields["title"].casefold(), "author_fold": fields["author"].casefold()}
        sql = (f"INSERT INTO books (title, author, year, pages, isbn, price_cents, stock, owner_id, title_fold, "
               f"author_fold, created_at, updated_at) VALUES (:title, :author, :year, :pages, :isbn, :price_cents, "
               f":stock, :owner_id, :title_fold, :author_fold, :now, :now) RETURNING {self.BOOK}")
        rows = await (run(sql, values) if run else self.query(sql, values, write=True))
        return rows[0]

    async def update_book(self, book_id: int, fields: dict[str, Any], *, version: int | None) -> Row | None:
        """Set the given fields in one statement; None when the book is gone or, if `version` is
        given, when it no longer has that version (compare-and-set).

        Raises `Conflict("isbn")` when the new ISBN is taken.
        """
        values = {**fields, "id": book_id, "now": utc_now()}
        for column in ("title", "author"):
            if column in fields:
                values[f"{column}_fold"] = fields[column].casefold()
        # Column names come from the Struct's fields, never from the client's keys.
        assignments = ", ".join(f"{column} = :{column}" for column in values if column not in ("id", "now"))
        condition = "" if version is None else " AND version = :version"
        if version is not None:
            values["version"] = version
        return await self.one(
            f"UPDATE books SET {assignments}, version = version + 1, updated_at = :now "
            f"WHERE id = :id{condition} RETURNING {self.BOOK}", values, write=True)

    async def delete_book(self, book_id: int, *, version: int | None) -> bool:
        """False when the book is gone or, if `version` is given, no longer has that version."""
        condition = "" if version is None else " AND version = :version"
        values = {"id": book_id} if version is None else {"id": book_id, "version": version}
        return bool(await self.query(f"DELETE FROM books WHERE id = :id{condition} RETURNING id",
                                     values, write=True))

    # A list's keyset: the position after which the next page starts, per sort order.
    SORTS = {
        "id": ("id > :after_id", "id ASC"),
        "-id": ("id < :after_id", "id DESC"),
        "title": ("(title, id) > (:after_title, :after_id)", "title ASC, id ASC"),
        "-title": ("(title, id) < (:after_title, :after_id)", "title DESC, id DESC"),
    }

    async def list_books(self, *, limit: int, sort: str, author: str | None, q: str | None,
                         after: tuple | None) -> list[Row]:
        """Up to `limit` books in `sort` order, starting after the key `after` = (title, id).

        Filters: `author` matches the whole author case-insensitively; `q` is a case-insensitive
        substring of the title or author, which `%`, `_` and `\\` match literally. From 3
        characters on it is looked up in the trigram index: on PostgreSQL pg_trgm serves the LIKE
        itself; on SQLite the FTS5 table is asked for the phrase (LIKE with ESCAPE would not use it).
        A trigram index cannot look up 1 or 2 characters: those scan the table.
        """
        conditions, values = [], {"limit": limit}
        if author is not None:
            conditions.append("author_fold = :author")
            values["author"] = author.casefold()
        if q is not None and self.is_sqlite and len(q.casefold()) >= 3:
            conditions.append("id IN (SELECT rowid FROM books_fts WHERE books_fts MATCH :phrase)")
            phrase = q.casefold().replace('"', '""')  # inside an FTS5 string only `"` is special
            values["phrase"] = f'{{title_fold author_fold}}: "{phrase}"'
        elif q is not None:
            conditions.append("(title_fold LIKE :pattern ESCAPE '\\' OR author_fold LIKE :pattern ESCAPE '\\')")
            escaped = re.sub(r"([\\%_])", r"\\\1", q.casefold())
            values["pattern"] = f"%{escaped}%"
        keyset, order = self.SORTS[sort]
        if after is not None:
            conditions.append(keyset)
            values["after_title"], values["after_id"] = after
            if sort in ("id", "-id"):
                del values["after_title"]
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        return await self.query(f"SELECT {self.BOOK} FROM books {where} ORDER BY {order} LIMIT :limit", values,
                                scan=q is not None)

    # -- orders ----------------------------------------------------------------------------------

    ORDER = "id, buyer_id, status, total_cents, version, created_at, updated_at"
    LINE = "order_id, book_id, title, quantity, unit_price_cents, quantity * unit_price_cents AS line_total_cents"

    async def place_order(self, run: Run, *, buyer_id: int, lines: list[tuple[int, int]]) -> Row:
        """Take each line's (book id, quantity) off its book's stock and record the order, in the
        caller's transaction. Raises `Refused` for the first line, in book-id order, that cannot
        be served; the caller's rollback then undoes the lines taken before it.

        Books are updated in book-id order, whatever order the lines came in: each UPDATE locks its
        row until the commit, and two orders taking the same rows in opposite orders could each
        hold a lock the other waits for, a deadlock that PostgreSQL breaks by failing one of them.
        The stock check is the UPDATE's own condition (`stock >= :quantity`), never a read and
        then a write in Python, so two orders can never both take the last copy.
        """
        now = utc_now()
        taken: dict[int, Row] = {}
        for position, (book_id, quantity) in sorted(enumerate(lines), key=lambda line: line[1][0]):
            rows = await run(
                "UPDATE books SET stock = stock - :quantity, version = version + 1, updated_at = :now "
                "WHERE id = :id AND price_cents IS NOT NULL AND stock >= :quantity RETURNING title, price_cents",
                {"id": book_id, "quantity": quantity, "now": now})
            if not rows:
                book = await run("SELECT stock, price_cents FROM books WHERE id = :id", {"id": book_id})
                if not book or book[0]["price_cents"] is None:
                    raise Refused(position, "not-for-sale")
                raise Refused(position, "out-of-stock", left=book[0]["stock"])
            taken[position] = rows[0]
        items = [{"book_id": book_id, "title": taken[position]["title"], "quantity": quantity,
                  "unit_price_cents": taken[position]["price_cents"],
                  "line_total_cents": quantity * taken[position]["price_cents"]}
                 for position, (book_id, quantity) in enumerate(lines)]
        [order] = await run(
            f"INSERT INTO orders (buyer_id, status, total_cents, created_at, updated_at) "
            f"VALUES (:buyer_id, 'placed', :total, :now, :now) RETURNING {self.ORDER}",
            {"buyer_id": buyer_id, "total": sum(item["line_total_cents"] for item in items), "now": now})
        for position, item in enumerate(items):
            await run("INSERT INTO order_lines (order_id, position, book_id, title, quantity, unit_price_cents) "
                      "VALUES (:order_id, :position, :book_id, :title, :quantity, :unit_price_cents)",
                      {"order_id": order["id"], "position": position, **{k: item[k] for k in (
                          "book_id", "title", "quantity", "unit_price_cents")}})
        return {**order, "items": items}

    async def _with_items(self, orders: list[Row], run: Run | None = None) -> list[Row]:
        """The orders with their lines (`items`, in the order placed), read in one query."""
        if not orders:
            return orders
        values = {f"o{n}": order["id"] for n, order in enumerate(orders)}
        sql = (f"SELECT {self.LINE} FROM order_lines WHERE order_id IN ({', '.join(':' + name for name in values)}) "
               f"ORDER BY order_id, position")
        items: dict[int, list[Row]] = {order["id"]: [] for order in orders}
        for line in await (run(sql, values) if run else self.query(sql, values)):
            items[line.pop("order_id")].append(line)
        return [{**order, "items": items[order["id"]]} for order in orders]

    async def get_order(self, order_id: int) -> Row | None:
        order = await self.one(f"SELECT {self.ORDER} FROM orders WHERE id = :id", {"id": order_id})
        return (await self._with_items([order]))[0] if order else None

    async def list_orders(self, *, limit: int, descending: bool, after: int | None,
                          buyer_id: int | None, status: str | None) -> list[Row]:
        """Up to `limit` orders in id order after the id `after` (keyset), with their lines."""
        conditions, values = [], {"limit": limit}
        for column, value in (("buyer_id", buyer_id), ("status", status)):
            if value is not None:
                conditions.append(f"{column} = :{column}")
                values[column] = value
        if after is not None:
            conditions.append("id < :after" if descending else "id > :after")
            values["after"] = after
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        orders = await self.query(f"SELECT {self.ORDER} FROM orders {where} "
                                  f"ORDER BY id {'DESC' if descending else 'ASC'} LIMIT :limit", values)
        return await self._with_items(orders)

    async def move_order(self, order_id: int, *, from_status: str, to_status: str,
                         version: int | None) -> Row | None:
        """Move the order from `from_status` to `to_status` in one conditional UPDATE; None when it
        is gone, no longer has that status or, if `version` is given, that version. Cancelling
        puts each line's quantity back on its book (when the book still exists) in the same
        transaction, again in book-id order."""
        now = utc_now()
        condition = "" if version is None else " AND version = :version"
        values = {"id": order_id, "from": from_status, "to": to_status, "now": now}
        if version is not None:
            values["version"] = version
        async with self.transaction() as run:
            rows = await run(f"UPDATE orders SET status = :to, version = version + 1, updated_at = :now "
                             f"WHERE id = :id AND status = :from{condition} RETURNING {self.ORDER}", values)
            if not rows:
                return None
            if to_status == "cancelled":
                for line in await run("SELECT book_id, quantity FROM order_lines WHERE order_id = :id "
                                      "ORDER BY book_id", {"id": order_id}):
                    await run("UPDATE books SET stock = stock + :quantity, version = version + 1, updated_at = :now "
                              "WHERE id = :book_id", {**line, "now": now})
            return (await self._with_items(rows, run))[0]

    # -- idempotency keys ------------------------------------------------------------------------

    async def purge_expired_keys(self) -> None:
        """Forget every expired key, at most every ten minutes. In a statement of its own, on the
        writer's thread (`scan`): after a busy day they may be many, and the loop would wait."""
        now = int(time.time())
        if now - self._last_purge >= 600:
            self._last_purge = now
            await self.query("DELETE FROM idempotency_keys WHERE expires_at <= :now", {"now": now},
                             write=True, scan=True)

    async def claim_key(self, run: Run, *, user_id: int, key_hash: str, fingerprint: str,
                        ttl: int) -> Row | None:
        """Write the key first, in the caller's transaction: None when this request now holds it,
        else the record of the request that did (`fingerprint`, `status`, `body`, `location`, `etag`).

        Written first, a concurrent request with the same key waits on this row (PostgreSQL's
        unique index; SQLite's write lock) until the first commits, then finds its response; and a
        crash leaves the key and the write it guards both committed or neither. A key past its
        expiry is forgotten here; `purge_expired_keys` forgets the others.
        """
        now = int(time.time())
        await run("DELETE FROM idempotency_keys WHERE user_id = :user_id AND key_hash = :key_hash "
                  "AND expires_at <= :now", {"user_id": user_id, "key_hash": key_hash, "now": now})
        values = {"user_id": user_id, "key_hash": key_hash}
        while True:
            if await run("INSERT INTO idempotency_keys (user_id, key_hash, fingerprint, expires_at) "
                         "VALUES (:user_id, :key_hash, :fingerprint, :expires_at) "
                         "ON CONFLICT (user_id, key_hash) DO NOTHING RETURNING user_id",
                         {**values, "fingerprint": fingerprint, "expires_at": now + ttl}):
                return None
            rows = await run("SELECT fingerprint, status, body, location, etag FROM idempotency_keys "
                             "WHERE user_id = :user_id AND key_hash = :key_hash", values)
            if rows:
                return rows[0]
            # Gone between the two (PostgreSQL): it expired meanwhile and another request's purge
            # deleted it. The key is free now: claim it again.

    async def record_response(self, run: Run, *, user_id: int, key_hash: str, status: int, body: str,
                              location: str | None, etag: str | None) -> None:
        """Keep the answer to a key's first request, in that request's own transaction."""
        await run("UPDATE idempotency_keys SET status = :status, body = :body, location = :location, etag = :etag "
                  "WHERE user_id = :user_id AND key_hash = :key_hash",
                  {"user_id": user_id, "key_hash": key_hash, "status": status, "body": body,
                   "location": location, "etag": etag})
