"""The Python client of the scan API and the bulk scan runner: httpx and pydantic only,
so a store app can use it without the server's dependencies.

    from scanner_gateway.client import ScanClient
"""

from scanner_gateway.client.scan_client import DEFAULT_URL, AsyncScanClient, ScanClient, ScanError

__all__ = ["DEFAULT_URL", "AsyncScanClient", "ScanClient", "ScanError"]
