# segsweep's image: the Ray head and GPU workers run it (docker-compose.yml).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends git curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/segsweep
COPY requirements.lock pyproject.toml README.md ./
RUN pip install -r requirements.lock
COPY platform ./platform
COPY experiments ./experiments
RUN pip install --no-deps -e .
# Non-root: sweeps write only to mounted volumes.
RUN useradd --create-home --uid 1000 segsweep && mkdir -p /data /sweeps && chown segsweep /data /sweeps
USER segsweep
WORKDIR /sweeps
CMD ["segsweep", "--help"]
