# The gateway image: slim, non-root, no engine inside (vLLM runs in its own container).
#   docker build -t scanner-gateway:0.1.0 .    (the tag deploy/k8s/gateway.yaml names: the version in pyproject.toml)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scanner_gateway ./scanner_gateway
COPY prompts ./prompts
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[server,postgres]"

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 gateway && mkdir /data && chown gateway:gateway /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY --chown=gateway:gateway prompts /app/prompts
WORKDIR /app
USER gateway
ENV SCANNER_HOST=0.0.0.0 \
    SCANNER_PORT=8080 \
    SCANNER_PROMPTS_DIR=/app/prompts \
    SCANNER_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
# Batch files and (without SCANNER_DATABASE_URL) the SQLite database of batches.
VOLUME /data
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
# `serve` drains on SIGTERM (SCANNER_DRAIN_S) before stopping: give it time to.
STOPSIGNAL SIGTERM
CMD ["scanner-gateway", "serve"]
