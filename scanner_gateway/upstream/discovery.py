"""Replicas found in DNS: an upstream spelt `dns+http://NAME:PORT` is every A and AAAA
record of NAME (a Kubernetes headless Service lists one per ready pod), re-resolved every
interval. The pool adds the new ones and lets the gone ones finish (`ReplicaPool.sync`).

A lookup that fails (timeout, SERVFAIL) changes nothing: a DNS hiccup must not empty the
pool. A name that exists with no records, or does not exist, means no replicas there.
Lookups go through dnspython's async resolver: the system's nameservers
(/etc/resolv.conf, search domains included), or the one `SCANNER_DNS_SERVER` names.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from scanner_gateway.upstream.client import EngineClient

if TYPE_CHECKING:
    from scanner_gateway.metrics import GatewayMetrics
    from scanner_gateway.upstream.pool import ReplicaPool

log = logging.getLogger(__name__)
DNS_PREFIX = "dns+"
DNS_TIMEOUT_S = 2.0
DNS_PORT = 53


class DiscoveryFailed(Exception):
    """The name could not be looked up now (not: it has no records)."""


@dataclass(frozen=True)
class DnsUpstream:
    """`dns+http://vllm.ns.svc.cluster.local:8000`: the replicas at NAME's addresses."""

    scheme: str
    name: str
    port: int

    @classmethod
    def parse(cls, spec: str) -> DnsUpstream:
        spec = spec.strip()
        parts = urlsplit(spec[len(DNS_PREFIX):] if is_dns_upstream(spec) else spec)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{spec!r}: a DNS upstream is dns+http://NAME:PORT (or dns+https)")
        if parts.path.strip("/") or parts.query or parts.username:
            raise ValueError(f"{spec!r}: a DNS upstream is a name and a port, no path, query or user")
        try:
            ipaddress.ip_address(parts.hostname)
        except ValueError:
            pass
        else:
            raise ValueError(f"{spec!r}: an address, not a name: write it without dns+")
        return cls(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))

    def url(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return f"{DNS_PREFIX}{self.scheme}://{self.name}:{self.port}"


def parse_dns_server(server: str) -> tuple[str, int]:
    """"10.96.0.10", "127.0.0.1:5353", "[::1]:53": the address and port."""
    parts = urlsplit(f"//{server.strip()}")
    try:
        address, port = parts.hostname, parts.port or DNS_PORT
        ipaddress.ip_address(address or "")
    except ValueError:
        raise ValueError(f"{server!r} is not a nameserver address (HOST or HOST:PORT, [IPv6]:PORT)") from None
    return str(address), port


def is_dns_upstream(spec: str) -> bool:
    return spec.strip().lower().startswith(DNS_PREFIX)


class DnsResolver:
    def __init__(self, server: str | None = None, timeout_s: float = DNS_TIMEOUT_S) -> None:
        """`server`: "HOST" or "HOST:PORT" of the nameserver to ask; None: the system's."""
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=server is None)
        except dns.resolver.NoResolverConfiguration:
            raise DiscoveryFailed("no nameserver in /etc/resolv.conf: set SCANNER_DNS_SERVER") from None
        if server is not None:
            where = parse_dns_server(server)
            self._resolver.nameservers = [dns.nameserver.Do53Nameserver(where[0], where[1])]
        self._resolver.lifetime = timeout_s

    async def addresses(self, name: str) -> set[str]:
        found: set[str] = set()
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype, search=True)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                raise DiscoveryFailed(f"{name} ({rdtype}): {exc}") from exc
            found.update(record.address for record in answer)
        return found


class ReplicaDiscovery:
    """Keeps the pool's discovered replicas equal to what DNS says, every `interval_s`."""

    def __init__(
        self, pool: ReplicaPool, sources: Sequence[DnsUpstream], resolver: DnsResolver | None,
        make_client: Callable[[str], EngineClient], interval_s: float,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.pool, self.sources, self.resolver = pool, list(sources), resolver
        self.make_client, self.interval_s, self.metrics = make_client, interval_s, metrics
        self._found: dict[DnsUpstream, set[str]] = {source: set() for source in self.sources}
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        assert self.resolver is not None, "a resolver is needed to look names up"
        for source in self.sources:
            try:
                addresses = await self.resolver.addresses(source.name)
            except DiscoveryFailed as exc:
                log.warning("could not look up %s (keeping its %d replicas): %s",
                            source, len(self._found[source]), exc)
                if self.metrics is not None:
                    self.metrics.discovery_failures.labels(str(source)).inc()
                continue
            self._found[source] = {source.url(a) for a in addresses}
        await self.pool.sync(set().union(*self._found.values()), self.make_client)

    async def start(self) -> None:
        """Look up once (so readiness is right from the start), then every interval."""
        if not self.sources:
            return
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="replica-discovery")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception:  # discovery must outlive any surprise
                log.exception("replica discovery round failed")
