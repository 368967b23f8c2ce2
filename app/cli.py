"""Operator commands: `python -m app <command>`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app.auth import issue_token
from app.db import make_engine, make_sessionmaker, transaction
from app.services.drift import find_drift
from app.settings import get_settings


def cmd_token(args: argparse.Namespace) -> int:
    print(
        issue_token(
            get_settings().signing_secret, args.user, admin=args.admin, ttl_seconds=args.ttl
        )
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    engine = make_engine(get_settings(), worker=True, pool_size=1)
    with transaction(make_sessionmaker(engine)) as session:
        drifted = find_drift(session, batch_size=args.batch_size)
    engine.dispose()
    total = 0
    for chat in drifted:
        print(
            f"{chat.chat_id}  version {chat.version}: {chat.inserted} missing, "
            f"{chat.updated} stale, {chat.removed} extra"
        )
        total += chat.drift
    print(f"drift: {total} rows in {len(drifted)} chats")
    return 1 if total else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    token = commands.add_parser("token", help="print a bearer token for USER")
    token.add_argument("user")
    token.add_argument("--admin", action="store_true", help="the token may import chats")
    token.add_argument("--ttl", type=int, default=86400, help="seconds the token is valid")
    token.set_defaults(func=cmd_token)

    check = commands.add_parser("check", help="print drift between JSONB and table; exit 1 if any")
    check.add_argument("--batch-size", type=int, default=500)
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
