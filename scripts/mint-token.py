#!/usr/bin/env python3
"""Mints an HS256 ledger token with JWT_SECRET (and JWT_ISSUER, JWT_AUDIENCE, defaulting to
`ledger` and `ledger-api`, which every service checks), for trying a service directly.

Standard library only. The `ledger token` CLI does the same for operators.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import time
import uuid


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sub", required=True, help="customer id (UUID)")
    parser.add_argument("--role", action="append", choices=["customer", "operator", "admin", "auditor"], required=True)
    parser.add_argument("--ttl", type=int, default=3600, help="seconds of validity")
    args = parser.parse_args()
    secret = os.environ.get("JWT_SECRET")
    if not secret:
        print("JWT_SECRET is not set", file=sys.stderr)
        return 2
    uuid.UUID(args.sub)
    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {
        "sub": args.sub,
        "roles": args.role,
        "iss": os.environ.get("JWT_ISSUER", "ledger"),
        "aud": os.environ.get("JWT_AUDIENCE", "ledger-api"),
        "iat": now,
        "nbf": now,
        "exp": now + args.ttl,
        "jti": str(uuid.uuid4()),
    }
    payload = b64(json.dumps(claims).encode())
    signature = b64(hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest())
    print(f"{header}.{payload}.{signature}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
