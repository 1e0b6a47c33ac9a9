"""The bookstore API the FastAPI way: pydantic v2 models, SQLAlchemy 2 ORM with a sync Session per
request and plain `def` endpoints (FastAPI's "SQL (Relational) Databases" tutorial), and a PyJWT
bearer check on POST (its "OAuth2 with Password, Bearer with JWT tokens" tutorial).

Only what the benchmark calls: one book, a page of books (limit/offset, `q` to search title and
author with SQLAlchemy's `icontains`), create a book, place an
order (one Session transaction: the books read with SELECT ... FOR UPDATE, a row lock on PostgreSQL
that SQLAlchemy leaves out on SQLite, their stock checked and decremented, the order and its lines
added, one commit).
Run: BENCH_DB=books.db BENCH_SECRET=... uvicorn fastapi_app:app
"""
import os
from datetime import datetime, timezone
from typing import Annotated

import jwt
from fastapi import Depends, FastAPI, HTTPException, Query, status
from fastapi.security import OAuth2PasswordBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import ForeignKey, create_engine, or_, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

SECRET_KEY = os.environ["BENCH_SECRET"]
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL") or f"sqlite:///{os.environ['BENCH_DB']}"
# The tutorial's SQLite setting: FastAPI runs `def` endpoints in a thread pool, so a pooled SQLite
# connection may be used by a thread other than the one that opened it. timeout: how long a
# connection waits for SQLite's one write lock; the default 5 s is too short for 32 clients placing
# orders at once ("database is locked"). On PostgreSQL, psycopg 3 as SQLAlchemy's docs name it,
# with SQLAlchemy's default pool.
connect_args = {"check_same_thread": False, "timeout": 20} if DATABASE_URL.startswith("sqlite") else {}
engine = create_engine(DATABASE_URL, connect_args=connect_args)


class Base(DeclarativeBase):
    pass


class Book(Base):
    __tablename__ = "books"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str]
    author: Mapped[str]
    year: Mapped[int | None]
    pages: Mapped[int | None]
    isbn: Mapped[str | None] = mapped_column(unique=True)
    price_cents: Mapped[int | None]
    stock: Mapped[int] = mapped_column(default=0)
    owner_id: Mapped[int]
    created_at: Mapped[str]  # RFC 3339 text, as every app in the benchmark stores it
    updated_at: Mapped[str]


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    buyer_id: Mapped[int]
    status: Mapped[str]
    total_cents: Mapped[int]
    created_at: Mapped[str]
    updated_at: Mapped[str]
    items: Mapped[list["OrderItem"]] = relationship(order_by="OrderItem.id")


class OrderItem(Base):
    __tablename__ = "order_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
    book_id: Mapped[int]  # no foreign key: the line keeps the book's title and price as they were
    title: Mapped[str]
    quantity: Mapped[int]
    unit_price_cents: Mapped[int]
    line_total_cents: Mapped[int]


class BookIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    author: str = Field(min_length=1, max_length=200)
    year: int | None = Field(default=None, ge=1, le=2100)
    pages: int | None = Field(default=None, ge=1, le=100_000)
    isbn: str | None = Field(default=None, pattern=r"^\d{13}$")
    price_cents: int | None = Field(default=None, ge=0, le=10_000_000)
    stock: int = Field(default=0, ge=0, le=1_000_000)


class BookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    author: str
    year: int | None
    pages: int | None
    isbn: str | None
    price_cents: int | None
    stock: int
    owner_id: int
    created_at: datetime
    updated_at: datetime


class BookPage(BaseModel):
    items: list[BookOut]


class OrderLineIn(BaseModel):
    book_id: int
    quantity: int = Field(ge=1, le=100)


class OrderIn(BaseModel):
    items: list[OrderLineIn] = Field(min_length=1, max_length=20)

    @field_validator("items")
    @classmethod
    def each_book_once(cls, items: list[OrderLineIn]) -> list[OrderLineIn]:
        if len({line.book_id for line in items}) < len(items):
            raise ValueError("a book may appear only once in an order")
        return items


class OrderLineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    book_id: int
    title: str
    quantity: int
    unit_price_cents: int
    line_total_cents: int


class OrderOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    buyer_id: int
    status: str
    items: list[OrderLineOut]
    total_cents: int
    created_at: datetime
    updated_at: datetime


def get_session():
    with Session(engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="token")


def get_current_user_id(token: Annotated[str, Depends(oauth2_scheme)]) -> int:
    try:
        return int(jwt.decode(token, SECRET_KEY, algorithms=["HS256"])["sub"])
    except (jwt.InvalidTokenError, KeyError, ValueError):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Could not validate credentials",
                            headers={"WWW-Authenticate": "Bearer"})


app = FastAPI()


@app.get("/api/v1/books/{book_id}", response_model=BookOut)
def read_book(book_id: int, session: SessionDep):
    book = session.get(Book, book_id)
    if book is None:
        raise HTTPException(status_code=404, detail="Book not found")
    return book


@app.get("/api/v1/books", response_model=BookPage)
def read_books(session: SessionDep, limit: Annotated[int, Query(ge=1, le=100)] = 20,
               offset: Annotated[int, Query(ge=0)] = 0,
               q: Annotated[str | None, Query(min_length=1, max_length=100)] = None):
    query = select(Book)
    if q is not None:  # a case-insensitive substring of the title or the author, % and _ literal
        query = query.where(or_(Book.title.icontains(q, autoescape=True), Book.author.icontains(q, autoescape=True)))
    books = session.scalars(query.order_by(Book.id).offset(offset).limit(limit)).all()
    return {"items": books}


@app.post("/api/v1/books", response_model=BookOut, status_code=status.HTTP_201_CREATED)
def create_book(book: BookIn, session: SessionDep, user_id: Annotated[int, Depends(get_current_user_id)]):
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    db_book = Book(**book.model_dump(), owner_id=user_id, created_at=now, updated_at=now)
    session.add(db_book)
    session.commit()
    session.refresh(db_book)
    return db_book


@app.post("/api/v1/orders", response_model=OrderOut, status_code=status.HTTP_201_CREATED)
def create_order(order: OrderIn, session: SessionDep, user_id: Annotated[int, Depends(get_current_user_id)]):
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    wanted = [line.book_id for line in order.items]
    # Lock the books' rows until the commit, in id order so that two orders never deadlock.
    books = {book.id: book for book in session.scalars(
        select(Book).where(Book.id.in_(wanted)).order_by(Book.id).with_for_update())}
    db_order = Order(buyer_id=user_id, status="placed", total_cents=0, created_at=now, updated_at=now)
    for line in order.items:
        book = books.get(line.book_id)
        if book is None or book.price_cents is None:
            raise HTTPException(status.HTTP_409_CONFLICT, f"Book {line.book_id} is not for sale")
        if book.stock < line.quantity:
            raise HTTPException(status.HTTP_409_CONFLICT, f"Only {book.stock} left of book {book.id}")
        book.stock -= line.quantity
        book.updated_at = now
        line_total = book.price_cents * line.quantity
        db_order.items.append(OrderItem(book_id=book.id, title=book.title, quantity=line.quantity,
                                        unit_price_cents=book.price_cents, line_total_cents=line_total))
        db_order.total_cents += line_total
    session.add(db_order)
    session.commit()  # after an HTTPException above, the session closes uncommitted: nothing changes
    session.refresh(db_order)
    return db_order
