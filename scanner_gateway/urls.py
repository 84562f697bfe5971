"""URL helpers shared by the server and the light client (no third-party imports)."""

from __future__ import annotations


def root_url(url: str) -> str:
    """A server's root URL, also from an OpenAI-style base URL ending in /v1 (what SDKs
    are given): callers add /v1/... themselves and probe /health at the root. Used for
    engine URLs here and for the gateway's URL in the Python client."""
    return url.rstrip("/").removesuffix("/v1")
