"""What `python api.py create-admin` and `python api.py demo` do, on a store of their own.

commands.py runs outside any request: it connects the store, does its work and disconnects.
It knows the store and auth.py, not HTTP; api.py's `main` reads the command line and calls it.
"""

import getpass
import sys
from collections.abc import Callable

import auth
import store as storage


def read_password() -> str:
    """From the terminal without echo, or one plain line when stdin is piped."""
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    return sys.stdin.readline().rstrip("\r\n")


async def create_admin(store: storage.Store, email: str, name: str, password: str, *,
                       check_new_user: Callable[[dict[str, str]], object]) -> int:
    """Create an admin, or promote the existing user with that email (password unchanged).

    `check_new_user` holds a new user's fields to the registration rules, raising what it raises.
    """
    try:
        await store.connect()
        user = await store.promote_user(email.lower())
        if user is None:
            check_new_user({"email": email, "name": name, "password": password})
            password_hash = await auth.hash_password(password)
            user = await store.create_user(email=email.lower(), name=name, password_hash=password_hash, role="admin")
        return user["id"]
    finally:
        await store.disconnect()


DEMO_USER = {"email": "demo@example.com", "name": "Demo", "password": "demo password"}
DEMO_BOOKS = [
    {"title": "Clean Code", "author": "Robert C. Martin", "year": 2008, "pages": 464, "isbn": "9780132350884",
     "price_cents": 3999, "stock": 12},
    {"title": "Structure and Interpretation of Computer Programs", "author": "Harold Abelson",
     "year": 1996, "pages": 657, "isbn": "9780262510875", "price_cents": 5500, "stock": 3},
    {"title": "The Pragmatic Programmer", "author": "Andrew Hunt", "year": 1999, "pages": 352, "isbn": None,
     "price_cents": 4250, "stock": 7},
    {"title": "Fluent Python", "author": "Luciano Ramalho", "year": 2022, "pages": 1012, "isbn": "9781492056355",
     "price_cents": 6599, "stock": 1},
    {"title": "Designing Data-Intensive Applications", "author": "Martin Kleppmann", "year": 2017,
     "pages": 616, "isbn": "9781449373320", "price_cents": None, "stock": 0},  # not for sale
]


async def fill_demo(store: storage.Store) -> str:
    """Give an empty database a sample user and a few books with prices and stock, so that a first
    visit to /docs has something to show and to buy."""
    try:
        await store.connect()
        if await store.list_books(limit=1, sort="id", author=None, q=None, after=None):
            return "The database already has books; nothing added."
        user = await store.get_login(DEMO_USER["email"])
        if user["id"] is None:
            user = await store.create_user(email=DEMO_USER["email"], name=DEMO_USER["name"],
                                           password_hash=await auth.hash_password(DEMO_USER["password"]))
        for book in DEMO_BOOKS:
            await store.create_book(owner_id=user["id"], fields=book)
        return (f"Added {len(DEMO_BOOKS)} books and the user {DEMO_USER['email']} "
                f"(password: {DEMO_USER['password']!r}); sign in at /docs.")
    finally:
        await store.disconnect()
