"""The bearer check shared by the router and the agents: constant time, never an exception.

aiohttp hands header values over as `str` decoded from UTF-8 with `surrogateescape`, so a
header with bytes that are not UTF-8 (`Bearer \\xff\\xfe`) holds lone surrogates, which a plain
`.encode()` refuses: that was a 500 with a logged traceback instead of a 401.
"""

from __future__ import annotations

import hmac

_SCHEME = "bearer"


def bearer_matches(header_value: str, secret: str) -> bool:
    """Whether an `Authorization` header value is `Bearer SECRET`; False for an empty secret.

    The scheme is matched without regard to case (RFC 9110), the token in constant time.
    """
    if not secret:
        return False
    scheme, _, token = header_value.partition(" ")
    if scheme.lower() != _SCHEME:
        return False
    return hmac.compare_digest(_as_bytes(token), _as_bytes(secret))


def _as_bytes(text: str) -> bytes:
    # surrogatepass encodes any str, lone surrogates included: no input raises here
    return text.encode("utf-8", "surrogatepass")
