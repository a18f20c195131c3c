"""Which tracking store a command uses, and what never reaches it: the URI policy (absolute
SQLite paths, the schemes MLflow serves, no deprecated file stores), the credentials of a
server, and the scrubbing of secrets from params and tags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from segsweep.errors import ConfigError, redact

#: Credentials of an MLflow server; forwarded to the trials of a cluster sweep, never logged.
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "apikey", "access_key", "credential")

__all__ = [
    "CREDENTIAL_VARS",
    "SECRET_WORDS",
    "is_secret_key",
    "local_artifact_root",
    "redact",
    "resolve_uri",
    "safe_params",
    "safe_tags",
    "sqlite_path",
    "uri_origin",
]


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use, absolute: trials run in other folders and must hit one store."""
    field = "tracking.uri"
    if not uri:  # MLflow's own convention (the compose image)
        uri, field = os.environ.get("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI"
    if not uri:
        return f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"
    scheme = urlsplit(uri).scheme
    if scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if not path.startswith("/"):
            return f"sqlite:///{(Path.cwd() / path).resolve()}"
        return uri
    if scheme in ("http", "https", "postgresql", "postgresql+psycopg2", "mysql", "databricks"):
        return uri
    if scheme in ("", "file"):
        raise ConfigError(
            f"{field}: '{uri}': file stores are deprecated by MLflow; "
            "use sqlite:///path/mlflow.db or an http(s):// server"
        )
    raise ConfigError(f"{field}: unsupported scheme '{scheme}' in '{uri}'")


def uri_origin(*given: tuple[str | None, str]) -> tuple[str | None, str]:
    """The store URI a command was given and what an error about it should name: the first
    of the (value, flag or field) pairs, in order of precedence, with a value; with none,
    (None, the environment variable or default ``resolve_uri`` will use)."""
    for uri, named in given:
        if uri:
            return uri, named
    return None, "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default store"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def local_artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database (absolute, whatever the cwd)."""
    path = sqlite_path(uri)
    return (path.parent / "mlartifacts").resolve().as_uri() if path is not None else None


def is_secret_key(name: str) -> bool:
    """Whether a param's name says it holds a secret (it is then never logged)."""
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def safe_params(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow strings: secrets dropped, URI passwords hidden, long values cut."""
    out = {}
    for key, value in params.items():
        if is_secret_key(key):
            continue
        text = redact(str(value))
        out[key] = text if len(text) <= 6000 else text[:5997] + "..."
    return out


def safe_tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as MLflow strings, URI passwords hidden (an error line may quote a URI)."""
    return {key: redact(str(value)) for key, value in tags.items()}
