# quire in a container: SQLite on a volume by default, PostgreSQL through DATABASE_URL.
#   docker build -t quire .
#   docker run -p 8000:8000 -v quire-data:/data quire
#   docker run -p 8000:8000 -e DATABASE_URL=postgresql://quire@db/quire -e QUIRE_SECRET_KEY=... quire
# Pinned by version (and Debian release), so a rebuild takes the same Python.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATABASE_URL=sqlite:////data/quire.db

WORKDIR /app

# Dependencies in a layer of their own, rebuilt only when requirements.txt changes. Only the
# runtime block: everything above the "# Tests" line (pytest, the OAuth client, ... stay out).
COPY requirements.txt .
RUN sed '/^# Tests/,$d' requirements.txt > runtime-requirements.txt \
    && pip install --no-cache-dir -r runtime-requirements.txt

# Not root: the app needs to write nothing but its database, on the volume.
RUN useradd --system --uid 10001 --no-create-home quire \
    && mkdir /data && chown quire /data
COPY --chown=root:root api.py web.py openapi.py commands.py store.py auth.py ./
USER 10001
VOLUME /data
EXPOSE 8000

# Liveness: /healthz answers without touching the database (no curl in the slim image).
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

# Two workers, and /metrics sums them: prometheus-client's multiprocess mode keeps each worker's
# numbers in files here. Emptied at each start, or an earlier run's files would add to the counts.
ENV PROMETHEUS_MULTIPROC_DIR=/tmp/quire-metrics

# The README's deployment flags. Behind a proxy, add --proxy-headers --forwarded-allow-ips <its address>.
# `exec`: uvicorn replaces the shell, so it gets the SIGTERM of `docker stop` itself.
CMD ["sh", "-c", "rm -rf \"$PROMETHEUS_MULTIPROC_DIR\" && mkdir -p \"$PROMETHEUS_MULTIPROC_DIR\" && exec uvicorn api:app --host 0.0.0.0 --port 8000 --workers 2 --timeout-graceful-shutdown 20 --no-access-log"]
