"""The bookstore API the FastAPI way: pydantic v2 models, SQLAlchemy 2 ORM with a sync Session per
request and plain `def` endpoints (FastAPI's "SQL (Relational) Databases" tutorial), and a PyJWT
bearer check on POST (its "OAuth2 with Password, Bearer with JWT tokens" tutorial).

Only what the benchmark calls: one book, a page of books (limit/offset), create a book.
Run: BENCH_DB=books.db BENCH_SECRET=... uvicorn fastapi_app:app
On PostgreSQL, through psycopg 3 as SQLAlchemy's docs name it, with SQLAlchemy's default pool:
BENCH_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/books BENCH_SECRET=... uvicorn fastapi_app:app
"""
import os
from datetime import datetime, timezone
from typing import Annotated

import jwt
from fastapi import Depends, FastAPI, HTTPException, Query, status
from fastapi.security import OAuth2PasswordBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

SECRET_KEY = os.environ["BENCH_SECRET"]
DATABASE_URL = os.environ.get("BENCH_DATABASE_URL") or f"sqlite:///{os.environ['BENCH_DB']}"
# The tutorial's SQLite setting: FastAPI runs `def` endpoints in a thread pool, so a pooled SQLite
# connection may be used by a thread other than the one that opened it.
connect_args = {"check_same_thread": False} if DATABASE_URL.startswith("sqlite") else {}
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
    owner_id: Mapped[int]
    created_at: Mapped[str]  # RFC 3339 text, as every app in the benchmark stores it
    updated_at: Mapped[str]


class BookIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    author: str = Field(min_length=1, max_length=200)
    year: int | None = Field(default=None, ge=1, le=2100)
    pages: int | None = Field(default=None, ge=1, le=100_000)
    isbn: str | None = Field(default=None, pattern=r"^\d{13}$")


class BookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    author: str
    year: int | None
    pages: int | None
    isbn: str | None
    owner_id: int
    created_at: datetime
    updated_at: datetime


class BookPage(BaseModel):
    items: list[BookOut]


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
               offset: Annotated[int, Query(ge=0)] = 0):
    books = session.scalars(select(Book).order_by(Book.id).offset(offset).limit(limit)).all()
    return {"items": books}


@app.post("/api/v1/books", response_model=BookOut, status_code=status.HTTP_201_CREATED)
def create_book(book: BookIn, session: SessionDep, user_id: Annotated[int, Depends(get_current_user_id)]):
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    db_book = Book(**book.model_dump(), owner_id=user_id, created_at=now, updated_at=now)
    session.add(db_book)
    session.commit()
    session.refresh(db_book)
    return db_book
