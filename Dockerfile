# syntax=docker/dockerfile:1
#
# One image for every role; the command picks it:
#   API     uvicorn api.main:app --host 0.0.0.0 --port 8000 --timeout-keep-alive 75
#           (the default CMD; keep-alive past clients' ~60 s idle timeouts, see backend/cli.py)
#   worker  python -m worker
#   CLI     render-video ...                                    (e.g. render-video migrate)
#   local render server (no Replicate account)
#           python -m local_replicate --host 0.0.0.0 --port 5055 --data-dir /data/render-server
#
# Configuration comes only from environment variables at run time (README: Configuration);
# nothing secret is baked in. Probes, as docker-compose.yml runs them:
#   API     python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=5)"
#   worker  the same against http://127.0.0.1:9464/metrics (with WORKER_METRICS_ADDRESS=0.0.0.0:9464)
# There is no image-wide HEALTHCHECK because the roles answer on different ports.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
# All of them come as wheels (PyAV with its FFmpeg, psycopg[binary], pydantic-core, ...).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --only-binary=:all: -r requirements.txt

# Then the project itself, as a regular (non-editable) install into the same venv.
COPY README.md worker.py ./
COPY activities ./activities
COPY api ./api
COPY backend ./backend
COPY local_replicate ./local_replicate
COPY workflows ./workflows
RUN pip install --no-deps . \
    && python -c "import api.main, worker, backend.cli, local_replicate.server"


FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATA_DIR=/data
# A fixed numeric uid, so orchestrators can check runAsNonRoot and volumes can be chowned.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin app \
    && install -d -o app -g app /app /data
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
EXPOSE 8000 9464
# Idle connections are kept 75 s, past the ~60 s clients and load balancers keep theirs: a
# server that closes first races with a client reusing the connection (API_KEEP_ALIVE_SECONDS).
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-keep-alive", "75"]
