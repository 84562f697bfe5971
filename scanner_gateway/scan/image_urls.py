"""Image URLs in scan requests, fetched only from hosts the operator allows.

Store apps often upload a photo to object storage and send its presigned link instead
of the bytes. Fetching any URL a client names, from inside the network, would be an
SSRF hole, so nothing is fetched unless `SCANNER_IMAGE_URL_HOSTS` lists the host
(fnmatch patterns such as `*.s3.amazonaws.com`); redirects are followed only to allowed
hosts, the body is capped at the image byte limit while it streams in, and each fetch
has one overall timeout. Error messages name the host, never the URL: presigned URLs
carry credentials. Photos are fetched before their scan asks for an engine slot (a slow
host must not hold one), so the fetches are bounded on their own: at most `max_active`
at once (each buffers up to the image byte limit); more get 429.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Sequence
from typing import TypeGuard

import httpx
from opentelemetry.trace import SpanKind

from scanner_gateway.errors import ImageFetchFailed, ImageTooLarge, InvalidRequest, Overloaded, echo
from scanner_gateway.tracing import TRACER, server_attributes

MAX_REDIRECTS = 3
DEFAULT_MAX_ACTIVE_FETCHES = 64
URL_SCHEMES = ("http://", "https://")


def is_image_url(ref: object) -> TypeGuard[str]:
    return isinstance(ref, str) and ref[:8].lower().startswith(URL_SCHEMES)


class ImageFetcher:
    def __init__(
        self, client: httpx.AsyncClient, allowed_hosts: Sequence[str], *, max_bytes: int, timeout_s: float,
        max_active: int = DEFAULT_MAX_ACTIVE_FETCHES,
    ) -> None:
        self.client = client
        self.allowed_hosts = [h.lower() for h in allowed_hosts]
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_active = max_active
        self.active = 0

    def allowed_url(self, ref: str, param: str) -> httpx.URL:
        """`ref` parsed, if it is an http(s) URL on a host the operator allows; else a 400
        that names the host (never the URL: presigned URLs carry credentials)."""
        try:
            url = httpx.URL(ref)
        except (httpx.InvalidURL, TypeError) as exc:
            raise InvalidRequest(f"image URL is malformed: {exc}", param=param) from exc
        self._check(url, param)
        return url

    def _check(self, url: httpx.URL, param: str) -> None:
        host = url.host.lower()
        if url.scheme not in ("http", "https") or not any(fnmatch.fnmatchcase(host, p) for p in self.allowed_hosts):
            raise InvalidRequest(
                f"image URLs from host {echo(host)} are not fetched; the gateway's operator lists the hosts "
                "it fetches from in SCANNER_IMAGE_URL_HOSTS (or send the bytes as a data URL or base64)",
                param=param,
            )

    async def fetch(self, ref: str, *, param: str = "image") -> bytes:
        """The bytes behind an http(s) image URL. Raises 4xx gateway errors only."""
        return (await self.fetch_media(ref, param=param))[0]

    async def fetch_media(self, ref: str, *, param: str) -> tuple[bytes, str]:
        """The bytes behind an http(s) media URL and the media type its host declared."""
        url = self.allowed_url(ref, param)
        if self.active >= self.max_active:
            raise Overloaded(f"gateway overloaded ({self.active} image URL downloads running, its limit); "
                             "retry in 1 s", param=param)
        self.active += 1
        try:
            with TRACER.start_as_current_span("image fetch", kind=SpanKind.CLIENT,
                                              attributes=server_attributes(str(url))) as span:
                data, media_type = await self._fetch(url, param)
                span.set_attribute("scanner.image.bytes", len(data))
                return data, media_type
        finally:
            self.active -= 1

    async def _fetch(self, url: httpx.URL, param: str) -> tuple[bytes, str]:
        try:
            async with asyncio.timeout(self.timeout_s):
                for _ in range(MAX_REDIRECTS + 1):
                    self._check(url, param)
                    async with self.client.stream("GET", url) as response:
                        if response.is_redirect:
                            url = url.join(response.headers["location"])
                            continue
                        return await self._body(response, param)
        except TimeoutError as exc:
            raise ImageFetchFailed(
                f"image URL (host {url.host!r}) did not answer within {self.timeout_s:g} s", param=param
            ) from exc
        except httpx.HTTPError as exc:
            raise ImageFetchFailed(
                f"image URL (host {url.host!r}) could not be fetched: {type(exc).__name__}", param=param
            ) from exc
        raise ImageFetchFailed(f"image URL redirected more than {MAX_REDIRECTS} times", param=param)

    async def _body(self, response: httpx.Response, param: str) -> tuple[bytes, str]:
        host = response.url.host
        if response.status_code != 200:
            raise ImageFetchFailed(f"image URL (host {host!r}) answered HTTP {response.status_code}", param=param)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageTooLarge(f"image URL holds {declared} bytes; the limit is {self.max_bytes} bytes", param=param)
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise ImageTooLarge(f"image URL holds more than the limit of {self.max_bytes} bytes", param=param)
            chunks.append(chunk)
        return b"".join(chunks), response.headers.get("content-type", "")
