"""Every route path, and which are open without an API key: declared once here."""

from __future__ import annotations

SCAN_PATH = "/v1/scan"
MODELS_PATH = "/v1/models"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
RESPONSES_PATH = "/v1/responses"  # the OpenAI SDKs' `client.responses.create`, which vLLM serves
RELAYED_PATHS = frozenset({CHAT_PATH, COMPLETIONS_PATH, RESPONSES_PATH})
FILES_PATH = "/v1/files"  # OpenAI's Files and Batches APIs, for batch jobs
BATCHES_PATH = "/v1/batches"
BATCH_ENDPOINTS = frozenset({SCAN_PATH, CHAT_PATH, COMPLETIONS_PATH, RESPONSES_PATH})  # what a batch line may call
SCAN_MODEL_PATHS = frozenset({CHAT_PATH, RESPONSES_PATH})  # where a `scan/<task>` model is served

HOME_PATH = "/"
HEALTH_PATH = "/health"
READY_PATH = "/ready"
METRICS_PATH = "/metrics"
UI_PATH = "/ui"
DOCS_ASSETS_PATH = "/docs-assets"
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})

# Open without a key: the page, probes, metrics (unless SCANNER_METRICS_NEED_KEY), the API docs.
OPEN_PATHS = frozenset({HOME_PATH, HEALTH_PATH, READY_PATH, METRICS_PATH, *DOCS_PATHS})
OPEN_PREFIXES = (UI_PATH + "/", DOCS_ASSETS_PATH + "/")
