"""The domain and the Python client load no web framework, metrics or settings library:
a store app installs the client light, and the domain can change without FastAPI."""

import subprocess
import sys

DOMAIN = (
    "scanner_gateway.errors", "scanner_gateway.admission", "scanner_gateway.scan.tasks",
    "scanner_gateway.scan.schema", "scanner_gateway.scan.images", "scanner_gateway.scan.results",
    "scanner_gateway.scan.service", "scanner_gateway.upstream.pool", "scanner_gateway.upstream.client",
    "scanner_gateway.batches.service", "scanner_gateway.batches.runner", "scanner_gateway.batches.store",
    "scanner_gateway.batches.database",
)
CLIENT = ("scanner_gateway.client", "scanner_gateway.client.bulk")
SERVER_ONLY = ("fastapi", "starlette", "prometheus_client", "pydantic_settings")


def loaded_after_importing(modules: tuple[str, ...]) -> list[str]:
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(' '.join(m for m in {SERVER_ONLY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_the_domain_loads_no_web_framework_metrics_or_settings():
    assert loaded_after_importing(DOMAIN) == []


def test_the_client_loads_no_web_framework_metrics_or_settings():
    assert loaded_after_importing(CLIENT) == []


def test_the_server_does_load_them():  # the check above can see them
    assert sorted(loaded_after_importing(("scanner_gateway.app",))) == sorted(SERVER_ONLY)
