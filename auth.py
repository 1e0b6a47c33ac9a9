"""Passwords, tokens and permissions, with the standard library alone.

auth.py knows nothing about HTTP or SQL. It hashes and checks passwords (scrypt, in a small
thread pool so that the event loop never waits for one), makes and verifies HS256 JSON Web
Tokens, and holds the permission rules as named functions. Its failures are `InvalidToken`
(for api.py to answer 401) or a False from a check; it never raises anything else on bad input.
"""

import asyncio
import base64
import binascii
import concurrent.futures
import functools
import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from typing import Any

# -- passwords -----------------------------------------------------------------------------------

# One of OWASP's equivalent scrypt settings (N=2**13, r=8, p=10): the cost of N=2**14, p=5 (some
# 0.1 s of one core per hash here, idle), in half the memory (8 MiB), so that two hashes at once
# keep a worker under 80 MiB. The stored form names its scheme and parameters, so changing them later
# needs no migration: old hashes still verify with the parameters they were made with.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**13, 8, 10
# Two hashes at a time at most: bounds their memory (2 x 8 MiB) and leaves a core for requests.
_hashing = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="scrypt")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * r * n, dklen=32)


def make_password_hash(password: str) -> str:
    """`scrypt$n,r,p$salt$hash`, salt and hash in base64url; a fresh random salt every time."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N},{SCRYPT_R},{SCRYPT_P}${_b64encode(salt)}${_b64encode(digest)}"


def check_password_hash(stored: str, password: str) -> bool:
    """True when `password` matches; False for a wrong password or a hash it cannot read."""
    try:
        scheme, params, salt, digest = stored.split("$")
        n, r, p = (int(value) for value in params.split(","))
        if scheme != "scrypt":
            return False
        return hmac.compare_digest(_scrypt(password, _b64decode(salt), n, r, p), _b64decode(digest))
    except (ValueError, binascii.Error):
        return False


@functools.cache
def _dummy_hash() -> str:
    """Checked when the email is unknown, so that such a login costs what a wrong password costs
    and response times do not tell which emails are registered. Made on first use, not at import."""
    return make_password_hash(secrets.token_urlsafe(16))


async def hash_password(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(_hashing, make_password_hash, password)


async def verify_password(stored: str | None, password: str) -> bool:
    """Check `password` against `stored`, or against a dummy hash when there is no user. The dummy
    is made in the hashing thread too (making it is a hash, and must not stall the event loop),
    at the first check of any kind: made at the first unknown email's, that one check would take
    twice as long and tell, once per process, that the email is not registered."""
    def check() -> bool:
        dummy = _dummy_hash()
        return check_password_hash(stored or dummy, password)

    matches = await asyncio.get_running_loop().run_in_executor(_hashing, check)
    return matches and stored is not None


# -- tokens --------------------------------------------------------------------------------------

MAX_TOKEN_BYTES = 8192
LEEWAY_SECONDS = 30  # clocks of several hosts disagree a little; never more than this
_HEADER = {"alg": "HS256", "typ": "JWT"}
SUBJECT = re.compile(r"[1-9][0-9]{0,18}")  # a user id, as make_token writes it
TOKEN_ID = re.compile(r"[\x21-\x7e]{1,128}")  # what the store can keep of a logged-out token


class InvalidToken(Exception):
    """The token is malformed, forged, expired or otherwise unusable; the message says which."""


class TokenExpired(InvalidToken):
    """The token was good, but its `exp` (plus the leeway) has passed: the client should refresh."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    """Strict base64url without padding; raises ValueError for anything else."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # Decoding ignores stray bits in the last character: "AB" and "AC" both decode to b"\x00".
    # Re-encoding tells canonical input from such a variant, which would be a malleable token.
    if _b64encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _json_object(data: bytes) -> dict[str, Any]:
    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate key")
        return dict(pairs)

    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")  # json.loads would accept NaN and Infinity

    value = json.loads(data, object_pairs_hook=refuse_duplicates, parse_constant=refuse_constant)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _sign(signing_input: bytes, key: bytes) -> bytes:
    # An HMAC object, not the one-shot `hmac.digest`: that one lets go of the GIL for a 2 µs hash,
    # and while a database thread is busy the event loop then waits for it to come back (measured:
    # 2.8 µs per signature against 625 µs with a thread running Python beside it).
    return hmac.new(key, signing_input, hashlib.sha256).digest()


def make_token(user_id: int, key: bytes, ttl: int, *, session_id: int | None = None,
               generation: int = 0) -> tuple[str, dict[str, Any]]:
    """A signed token for the user, valid `ttl` seconds, and its claims. `sid` names the session
    it belongs to (revoked with it) and `gen` the user's token generation (a password change
    moves it on, refusing every older token); a token without them is of no session, generation 0."""
    now = int(time.time())
    claims = {"sub": str(user_id), "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex}
    if session_id is not None:
        claims["sid"] = session_id
    if generation:
        claims["gen"] = generation
    header = _b64encode(json.dumps(_HEADER, separators=(",", ":")).encode())
    payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
    signature = _sign(f"{header}.{payload}".encode(), key)
    return f"{header}.{payload}.{_b64encode(signature)}", claims


def read_token(token: str, key: bytes, *, now: float | None = None) -> dict[str, Any]:
    """The claims of a valid token; raises `InvalidToken` on anything else, whatever the input.

    Refused: over 8 KB, not three base64url parts, a header other than HS256 (`none` included) or
    with `crit`, a bad signature, duplicate JSON keys, a missing, non-numeric or endless `exp`, expiry
    beyond the leeway, an `nbf` not yet reached (or not a number), a `sub` that is not a user id in
    digits, and a `jti` that is not 1–128 visible ASCII characters.
    """
    try:
        return _read_token(token, key, time.time() if now is None else now)
    except InvalidToken:
        raise
    except Exception as error:  # a verifier must not leak a stray exception on hostile input
        raise InvalidToken("the token is malformed") from error


def _read_token(token: str, key: bytes, now: float) -> dict[str, Any]:
    if len(token) > MAX_TOKEN_BYTES or not token.isascii():
        raise InvalidToken("the token is too long or not ASCII")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("the token does not have three parts")
    header = _json_object(_b64decode(parts[0]))
    if header.get("alg") != "HS256" or "crit" in header:
        raise InvalidToken("the token is not signed with HS256")
    expected = _sign(f"{parts[0]}.{parts[1]}".encode(), key)
    if not hmac.compare_digest(expected, _b64decode(parts[2])):
        raise InvalidToken("the token's signature does not match")
    claims = _json_object(_b64decode(parts[1]))
    exp = claims.get("exp")
    # Beyond 2**53 seconds (and infinity, NaN) no clock reaches it, nor the store's 64-bit columns.
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not -2**53 < exp < 2**53:
        raise InvalidToken("the token has no numeric expiry")
    if now > exp + LEEWAY_SECONDS:
        raise TokenExpired("the token has expired")
    nbf = claims.get("nbf", now)  # quire issues none; a token that has one is held to it (RFC 7519 §4.1.5)
    if isinstance(nbf, bool) or not isinstance(nbf, int | float) or now < nbf - LEEWAY_SECONDS:
        raise InvalidToken("the token is not valid yet")
    sub, jti = claims.get("sub"), claims.get("jti")
    if not (isinstance(sub, str) and SUBJECT.fullmatch(sub) and isinstance(jti, str) and TOKEN_ID.fullmatch(jti)):
        raise InvalidToken("the token lacks a subject or an id")
    for name in ("sid", "gen"):
        value = claims.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise InvalidToken(f"the token's `{name}` is not a number")
    return claims


# -- refresh tokens ------------------------------------------------------------------------------


def new_refresh_token() -> tuple[str, str]:
    """An opaque refresh token (32 random bytes) and the hash to store in its place."""
    token = secrets.token_urlsafe(32)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> str:
    """SHA-256, unsalted: the token is random, so a hash is enough to make a leaked table useless
    for signing in, and the same token always finds its row."""
    return hashlib.sha256(token.encode()).hexdigest()


# -- permissions ---------------------------------------------------------------------------------
# Users are the store's rows: dicts with at least `id` and `role`.

def is_admin(user: dict[str, Any]) -> bool:
    return user["role"] == "admin"


def can_change_book(user: dict[str, Any], book: dict[str, Any]) -> bool:
    """The owner of a book and admins may replace, patch or delete it."""
    return book["owner_id"] == user["id"] or is_admin(user)


def can_see_user(viewer: dict[str, Any], user_id: int) -> bool:
    """Users see themselves; admins see everyone."""
    return viewer["id"] == user_id or is_admin(viewer)


def can_see_order(user: dict[str, Any], order: dict[str, Any]) -> bool:
    """The buyer sees an order, and admins see every order; for anyone else it does not exist."""
    return order["buyer_id"] == user["id"] or is_admin(user)


def can_move_order(user: dict[str, Any], order: dict[str, Any], to_status: str) -> bool:
    """Admins move an order along its life (paid, shipped, cancelled); its buyer may only cancel it.
    Whether the move itself is possible from the order's status is the state machine's business."""
    return is_admin(user) or (order["buyer_id"] == user["id"] and to_status == "cancelled")
