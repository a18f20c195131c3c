#!/bin/sh
# Run once by the postgres image on an empty volume: the databases segsweep's services use.
set -eu
for db in mlflow mlflow_auth optuna; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c "CREATE DATABASE $db"
done
