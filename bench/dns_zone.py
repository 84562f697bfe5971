"""A DNS server on loopback (dnslib) whose records a test or bench changes as it runs:
what a headless Service's name answers as pods come and go.

    zone = DnsZone(); zone.set("vllm.test", ["127.0.0.2", "127.0.0.3"])
    with zone.serving() as server:   # "127.0.0.1:PORT", for SCANNER_DNS_SERVER
        ...
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dnslib import AAAA, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

TTL_S = 1


class DnsZone(BaseResolver):
    def __init__(self) -> None:
        self._records: dict[str, list[str] | None] = {}
        self._lock = threading.Lock()
        self.queries = 0

    def set(self, name: str, addresses: list[str] | None) -> None:
        """`name`'s A/AAAA records; None: the server fails its lookups (SERVFAIL)."""
        with self._lock:
            self._records[name.rstrip(".").lower()] = None if addresses is None else list(addresses)

    def resolve(self, request, handler):  # dnslib's resolver interface
        reply = request.reply()
        question = request.q
        with self._lock:
            self.queries += 1
            name = str(question.qname).rstrip(".").lower()
            if name not in self._records:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            addresses = self._records[name]
        if addresses is None:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        for address in addresses:
            if question.qtype == QTYPE.A and ":" not in address:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=TTL_S))
            elif question.qtype == QTYPE.AAAA and ":" in address:
                reply.add_answer(RR(question.qname, QTYPE.AAAA, rdata=AAAA(address), ttl=TTL_S))
        return reply

    @contextmanager
    def serving(self) -> Iterator[str]:
        """Answer on a free UDP port of 127.0.0.1 until the block ends; its HOST:PORT."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = DNSServer(self, address="127.0.0.1", port=port, logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"))
        server.start_thread()
        try:
            yield f"127.0.0.1:{port}"
        finally:
            server.stop()
            server.server.server_close()
