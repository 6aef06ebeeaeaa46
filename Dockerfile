# mj-relay: docker build -t mj-relay . && docker run -p 8080:8080 -v mj-data:/data mj-relay
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY adapters ./adapters
RUN pip install . && rm -rf /src \
    && useradd --system --uid 10001 --user-group --home-dir /data --create-home mjrelay

USER mjrelay
WORKDIR /data
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz').status != 200)"

# Configuration: mount a file and set MJ_RELAY_CONFIG, or pass --config. Data (SQLite, images) lives in /data.
ENTRYPOINT ["mj-relay", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080"]
