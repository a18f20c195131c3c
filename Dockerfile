# segsweep's image: the MLflow server, the Ray head and GPU workers, the dashboards.
# The pinned torch wheel is a CUDA build: GPU workers need only the NVIDIA container toolkit.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends git curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/segsweep
COPY requirements.lock pyproject.toml README.md ./
RUN pip install -r requirements.lock
COPY platform ./platform
COPY experiments ./experiments
COPY deploy ./deploy
# Not editable: the dashboard's page and the reference data ship as package data.
RUN pip install --no-deps .
# Not root: a service writes only to its mounted volumes.
RUN useradd --create-home --uid 1000 segsweep && mkdir -p /data /sweeps && chown segsweep /data /sweeps
USER segsweep
WORKDIR /sweeps
CMD ["segsweep", "--help"]
