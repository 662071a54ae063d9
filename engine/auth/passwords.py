"""Password hashes: salted scrypt, compared in constant time.

Design decisions
- hashlib.scrypt (RFC 7914) from the standard library: a memory-hard
  key-derivation function, so each guess costs an attacker who stole the
  file ~32 MiB and tens of milliseconds, and no dependency is needed.
  Parameters N=2**15, r=8, p=1 (OWASP's minimum for scrypt is N=2**17 with
  r=8 at 128 MiB; 2**15 keeps a login below ~0.1 s and 32 MiB on a 2-vCPU
  Space while costing a GPU cracker the same memory per guess).
- One string per user: `scrypt$N$r$p$<salt b64>$<key b64>`. The parameters
  travel with the hash, so they can be raised later without breaking
  existing lines; the salt is 16 random bytes per user, so equal passwords
  give different hashes.
- Verification recomputes the key and compares with hmac.compare_digest
  (constant time). A name that is not a user is checked against a dummy
  hash with the same parameters, so the reply time does not tell which
  names exist.
- Parameters read from a file are capped (N <= 2**20, r <= 32, p <= 16): a
  typo must not make every login allocate gigabytes.
- Nothing here logs: neither passwords nor hashes are ever written anywhere
  but the credentials file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from engine.errors import MedLensError

SCHEME = "scrypt"
N, R, P = 2**15, 8, 1
SALT_BYTES = 16
KEY_BYTES = 32
MIN_PASSWORD = 8  # characters
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16


class PasswordError(MedLensError):
    """A password or a stored hash cannot be used; the message says why (never quoting either)."""


@dataclass(frozen=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes = field(repr=False)
    key: bytes = field(repr=False)  # never shown in a repr or a log

    def __str__(self) -> str:
        b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
        return f"{SCHEME}${self.n}${self.r}${self.p}${b64(self.salt)}${b64(self.key)}"


def _derive(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # maxmem: scrypt needs 128 * r * n bytes (plus a little); OpenSSL's default cap is 32 MiB
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=2 * 128 * r * n + 2**20, dklen=length)


def hash_password(password: str) -> str:
    """A new salted scrypt hash of `password` (the string stored in the credentials file)."""
    if len(password) < MIN_PASSWORD:
        raise PasswordError(f"a password needs at least {MIN_PASSWORD} characters")
    salt = secrets.token_bytes(SALT_BYTES)
    return str(ScryptHash(N, R, P, salt, _derive(password, salt, N, R, P, KEY_BYTES)))


def parse_hash(text: str) -> ScryptHash:
    """The parts of a stored hash; PasswordError for anything else (plain-text passwords included)."""
    parts = str(text).strip().split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise PasswordError("not a password hash written by `medlens user` (plain-text passwords are refused)")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise PasswordError("a password hash is damaged (its numbers or base64 do not parse)") from None
    if not (2 <= n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise PasswordError(f"a password hash has unusable scrypt parameters (N a power of 2 up to {_MAX_N}, r <= {_MAX_R}, p <= {_MAX_P})")
    if len(salt) < 8 or len(key) < 16:
        raise PasswordError("a password hash is too short (salt or key)")
    return ScryptHash(n, r, p, salt, key)


_DUMMY = ScryptHash(N, R, P, b"\0" * SALT_BYTES, b"\0" * KEY_BYTES)


def verify_password(password: str, stored: ScryptHash | None) -> bool:
    """True when `password` matches `stored`; None (no such user) costs the same time and gives False."""
    target = stored or _DUMMY
    key = _derive(str(password), target.salt, target.n, target.r, target.p, len(target.key))
    return hmac.compare_digest(key, target.key) and stored is not None
