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
# `serve` reads these (its --data-dir, --host and --port options), over what a config file says: data (SQLite, the
# signing key, images) in /data itself, on every interface; `docker exec ... mj-relay keys ...` reads MJ_RELAY_DATA_DIR
# too, so it works on the same database. Arguments after the image name go to `mj-relay serve`.
ENV MJ_RELAY_DATA_DIR=/data MJ_RELAY_HOST=0.0.0.0 MJ_RELAY_PORT=8080
EXPOSE 8080
# The check asks the relay on the container's own loopback, never through a proxy the environment names for the
# providers (HTTP_PROXY), which would answer for 127.0.0.1 itself or not at all.
HEALTHCHECK --interval=30s --timeout=3s \
    CMD python -c "import os,sys,urllib.request as u; sys.exit(u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/readyz' % os.environ.get('MJ_RELAY_PORT', '8080')).status != 200)"

# Configuration: mount a file and set MJ_RELAY_CONFIG, or pass --config:
#   docker run -p 8080:8080 -v mj-data:/data -v ./config.yaml:/config/config.yaml:ro \
#       -e MJ_RELAY_CONFIG=/config/config.yaml mj-relay
#   docker run -p 8080:8080 -v mj-data:/data -v ./config.yaml:/config/config.yaml:ro mj-relay --config /config/config.yaml
ENTRYPOINT ["mj-relay", "serve"]
