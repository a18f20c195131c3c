#!/bin/sh
# Start an MLflow tracking server with basic authentication, a PostgreSQL backend store and a
# proxied artifact store. Every secret comes from the environment (compose: the .env file);
# the auth config is written at start to a private temporary file, never to the image.
#
#   POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_HOST / POSTGRES_PORT   backend store
#   MLFLOW_ADMIN_USERNAME / MLFLOW_ADMIN_PASSWORD (12+ characters)      the first admin user
#   MLFLOW_FLASK_SERVER_SECRET_KEY                                      CSRF secret of the auth app
#   MLFLOW_ARTIFACTS_DESTINATION   s3://bucket (with MLFLOW_S3_ENDPOINT_URL, AWS_* keys) or file:///path
#   MLFLOW_HOST / MLFLOW_PORT / MLFLOW_ALLOWED_HOSTS
set -eu
: "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}" "${MLFLOW_ADMIN_PASSWORD:?}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?}"
POSTGRES_HOST="${POSTGRES_HOST:-postgres}"
POSTGRES_PORT="${POSTGRES_PORT:-5432}"
MLFLOW_ADMIN_USERNAME="${MLFLOW_ADMIN_USERNAME:-admin}"
MLFLOW_ARTIFACTS_DESTINATION="${MLFLOW_ARTIFACTS_DESTINATION:-s3://mlflow}"
MLFLOW_HOST="${MLFLOW_HOST:-0.0.0.0}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
MLFLOW_ALLOWED_HOSTS="${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:5000,localhost,localhost:5000,127.0.0.1,127.0.0.1:5000}"

db="postgresql+psycopg2://${POSTGRES_USER}:${POSTGRES_PASSWORD}@${POSTGRES_HOST}:${POSTGRES_PORT}"
umask 077
config="$(mktemp -t mlflow-auth.XXXXXX.ini)"
cat > "$config" <<INI
[mlflow]
default_permission = READ
database_uri = ${db}/mlflow_auth
admin_username = ${MLFLOW_ADMIN_USERNAME}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"
export MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_ADMIN_PASSWORD"
export MLFLOW_FLASK_SERVER_SECRET_KEY
exec mlflow server \
  --app-name basic-auth \
  --backend-store-uri "${db}/mlflow" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
  --workers "${MLFLOW_WORKERS:-2}"
