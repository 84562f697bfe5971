"""API keys: `Authorization: Bearer <key>` on every API route (probes, page and docs stay open; metrics too unless SCANNER_METRICS_NEED_KEY).

Off when no key is configured. Comparison is constant-time against every key, and keys
never appear in logs or error messages.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from scanner_gateway.api.errors import error_response
from scanner_gateway.api.paths import METRICS_PATH, OPEN_PATHS, OPEN_PREFIXES
from scanner_gateway.errors import Unauthorized

# Probes, the Prometheus scrape, the web page's static files and the API docs stay open
# (no secrets there; scrapers rarely hold keys; the page and the docs' "Authorize"
# button ask for a key before calling the API, and a browser cannot send one to load them).


# Set only by the batch worker's in-process calls (api/batch_dispatch.py): a scope from the
# network never carries it (servers build scopes from the wire), and the batch's key was
# checked when the batch was created.
BATCH_CALLER_SCOPE_KEY = "scanner_gateway.batch_owner"


def key_matches(presented: str, keys: Sequence[str]) -> bool:
    presented_b = presented.encode()
    matched = False
    for key in keys:  # no early exit: timing does not tell which key, or how many
        matched |= hmac.compare_digest(presented_b, key.encode())
    return matched


def client_scope(authorization: str | None) -> str:
    """A short, non-reversible tag of the caller's credentials (for per-client caches)."""
    return hashlib.sha256((authorization or "").encode()).hexdigest()[:16]


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: Sequence[str], *, metrics_need_key: bool = False) -> None:
        self.app = app
        self.keys = tuple(keys)
        # A gateway reachable from the internet may keep its traffic figures and replica
        # addresses (metric labels) to key holders; the scraper then sends a key too.
        self.open_paths = OPEN_PATHS - {METRICS_PATH} if metrics_need_key else OPEN_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or not self.keys or path in self.open_paths or path.startswith(OPEN_PREFIXES)
                or BATCH_CALLER_SCOPE_KEY in scope):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            err = Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        elif not key_matches(token.strip(), self.keys):
            err = Unauthorized("invalid API key")
        else:
            await self.app(scope, receive, send)
            return
        err.headers["WWW-Authenticate"] = "Bearer"
        await error_response(err)(scope, receive, send)
