"""Bearer tokens: HS256 JWTs whose `sub` is the user id and whose `admin` claim marks admins."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
# A token cannot be revoked (there is no list of them to strike it from): bound how long a leaked
# one stays good.
MAX_TTL_SECONDS = 30 * 86400


@dataclass(frozen=True, slots=True)
class User:
    id: str
    admin: bool = False


class InvalidToken(Exception):
    pass


def issue_token(secret: str, user_id: str, *, admin: bool = False, ttl_seconds: int = 86400) -> str:
    if not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise ValueError(f"a token's lifetime must be 1 to {MAX_TTL_SECONDS} seconds")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl_seconds}
    if admin:
        claims["admin"] = True
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str) -> User:
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]}
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise InvalidToken("token has no subject")
    return User(id=subject, admin=claims.get("admin") is True)
