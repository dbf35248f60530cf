"""Who may talk to the service, and what every answer carries.

- Host: DNS rebinding lets a page of ``evil.example``, its name now resolving to 127.0.0.1, read this server's
  answers; its requests say ``Host: evil.example``. Only IP literals (they cannot be rebound), ``localhost`` and
  the names the operator admits (``--allow-host``, for a proxy) are served.
- Origin: a page the user visits can POST forms here (no CORS preflight for them). A state-changing request
  that a browser marks as coming from another origin (``Origin``, else ``Referer``) is refused unless it carries
  the token. Clients that are not browsers send neither header and are served.
- Headers: a Content-Security-Policy that allows no inline script, no framing and no other origins, and the
  usual hardening headers.
"""
from __future__ import annotations

import hmac
import ipaddress
import re
from typing import Collection, Mapping, Optional, Tuple
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: the page and the health checks are served without a token (the page asks for it)
PUBLIC_PATHS = frozenset({"/", "/page.js", "/page.css", "/v2/health/live", "/v2/health/ready"})
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "cache-control": "no-store",
}
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def hostname(host: Optional[str]) -> Optional[str]:
    """The name in a Host header (lower case, IPv6 without brackets); None for anything malformed."""
    match = _HOST.match(host or "")
    return match.group(1).strip("[]").lower() if match else None


def host_allowed(host: Optional[str], allowed: Collection[str]) -> bool:
    """``allowed``: the admitted names in lower case."""
    name = hostname(host)
    if name is None:
        return False
    if name == "localhost" or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _origin(url: str) -> Optional[Tuple[str, str, int]]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[parts.scheme]


def same_origin(headers: Mapping[str, str], scheme: str) -> bool:
    """Whether a browser would call this request same-origin; True for clients that send no Origin or Referer."""
    claimed = headers.get("origin") or headers.get("referer")
    if claimed is None:
        return True
    own = _origin(f"{scheme}://{headers.get('host', '')}")
    return own is not None and _origin(claimed) == own


def token_ok(authorization: Optional[str], token: str) -> bool:
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())


def refusal(headers: Mapping[str, str], method: str, path: str, scheme: str, token: Optional[str],
            allowed_hosts: Collection[str]) -> Optional[Tuple[int, str]]:
    """(status, reason) when the request must be refused before it is read; None when it may go on."""
    host = headers.get("host")
    if not host_allowed(host, allowed_hosts):
        return 400, f"Host {host!r} is not this server's name; a proxy's name is admitted with --allow-host NAME"
    authorised = token is not None and token_ok(headers.get("authorization"), token)
    if token is not None and not authorised and path not in PUBLIC_PATHS:
        return 401, "missing or wrong bearer token"
    if method not in SAFE_METHODS and not authorised and not same_origin(headers, scheme):
        return 403, "a request from another origin cannot change or use this server without its token"
    return None
