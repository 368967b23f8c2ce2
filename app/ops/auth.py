"""Who may use the rollout page, and proof that a form was sent by the page itself.

HTTP basic auth against `OPS_BASIC_AUTH` (`user:password`, as Flower's); without the setting the
page does not exist (404). Every action is a POST carrying a CSRF token: an HMAC of the
basic-auth user and the time it was issued, keyed by a secret derived from `AUTH_SECRET`, valid
for `CSRF_MAX_AGE_SECONDS`. A browser sends basic-auth credentials with any request to the
page's origin, a forged cross-site form included; only the page can put a valid token in it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, status

from app.settings import Settings

REALM = "chat-dualwrite rollout"
CSRF_MAX_AGE_SECONDS = 3600
CSRF_FIELD = "csrf_token"


class Forbidden(Exception):
    """A POST that does not prove it came from the page: answered 403, naming why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def basic_user(request: Request, settings: Settings) -> str:
    """The basic-auth user of this request; 404 when the page is off, 401 on anything else
    than the configured user and password."""
    if settings.ops_basic_auth is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Not Found")
    user, _, password = settings.ops_basic_auth.get_secret_value().partition(":")
    given_user, given_password = _credentials(request.headers.get("authorization", ""))
    # Both compared in full, in constant time, whatever the first one says.
    user_ok = hmac.compare_digest(given_user.encode(), user.encode())
    password_ok = hmac.compare_digest(given_password.encode(), password.encode())
    if not (user_ok and password_ok):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "the rollout page needs the user and password of OPS_BASIC_AUTH",
            headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
        )
    return user


def _credentials(header: str) -> tuple[str, str]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    user, _, password = decoded.partition(":")
    return user, password


def _key(settings: Settings) -> bytes:
    # Its own key, so that a CSRF token can never pass for anything else signed with the secret.
    return hmac.new(settings.signing_secret.encode(), b"chat-dualwrite ops csrf", "sha256").digest()


def _mac(settings: Settings, user: str, action: str, issued: str) -> str:
    # The page's credentials are in the MAC too: a rotated password voids the tokens issued.
    credentials = settings.ops_basic_auth.get_secret_value() if settings.ops_basic_auth else ""
    digest = hashlib.sha256(credentials.encode()).hexdigest()
    message = f"{user}\n{action}\n{digest}\n{issued}".encode()
    return hmac.new(_key(settings), message, hashlib.sha256).hexdigest()


def csrf_token(settings: Settings, user: str, action: str, now: float | None = None) -> str:
    """A token for one action (the path its form posts to), issued to `user` now."""
    issued = str(int(time.time() if now is None else now))
    return f"{issued}.{_mac(settings, user, action, issued)}"


def check_csrf(
    settings: Settings, user: str, action: str, token: str | None, now: float | None = None
) -> None:
    """Raise `Forbidden` unless `token` was issued by the page to `user`, for this `action`,
    within the last `CSRF_MAX_AGE_SECONDS`."""
    if not token:
        raise Forbidden(CSRF_FIELD, "missing: reload the page and confirm again")
    issued, _, mac = token.partition(".")
    if not issued.isdigit() or not hmac.compare_digest(
        mac.encode(), _mac(settings, user, action, issued).encode()
    ):
        raise Forbidden(CSRF_FIELD, "not issued by this page: reload the page and confirm again")
    elapsed = (time.time() if now is None else now) - int(issued)
    if not 0 <= elapsed <= CSRF_MAX_AGE_SECONDS:
        raise Forbidden(CSRF_FIELD, "expired: reload the page and confirm again")


def check_origin(request: Request) -> None:
    """When the browser says where a POST comes from (`Origin`, else `Referer`), it must be this
    page's own origin: scheme and host. Behind a proxy that ends TLS, the scheme is the one the
    proxy reports (`X-Forwarded-Proto`, which uvicorn takes from `--forwarded-allow-ips`)."""
    host = request.headers.get("host", "")
    own = f"{request.url.scheme}://{host}"
    for header in ("origin", "referer"):
        value = request.headers.get(header)
        if value is None:
            continue
        parts = urlsplit(value) if value != "null" else None
        source = f"{parts.scheme}://{parts.netloc}" if parts else ""
        if not host or not hmac.compare_digest(source.encode(), own.encode()):
            raise Forbidden(header, f"{value!r} is not this page's origin {own!r}")
        return
