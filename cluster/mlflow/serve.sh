#!/usr/bin/env bash
# A shared MLflow tracking server for ulsweep as one plain command line: PostgreSQL backend store, artifacts in
# an S3-compatible bucket that the server proxies (clients upload through it, so Ray workers need no bucket keys
# for MLflow artifacts).
#
#   pip install 'ulsweep[server]'          # mlflow + psycopg (PostgreSQL driver) + boto3 (S3)
#   export ULSWEEP_MLFLOW_DB=postgresql://mlflow@db.internal:5432/mlflow
#   export ULSWEEP_MLFLOW_ARTIFACTS=s3://YOUR-BUCKET/mlflow
#   export PGPASSWORD=...  AWS_ACCESS_KEY_ID=...  AWS_SECRET_ACCESS_KEY=...   # from your secret store
#   cluster/mlflow/serve.sh
#
# Settings (environment):
#   ULSWEEP_MLFLOW_DB             backend store URI, WITHOUT a password: libpq reads PGPASSWORD (or ~/.pgpass),
#                                 so the password shows up in no command line and no log
#   ULSWEEP_MLFLOW_ARTIFACTS      where the server stores artifacts: s3://..., gs://..., or a local directory
#   ULSWEEP_MLFLOW_HOST           address to bind (default 127.0.0.1; 0.0.0.0 only behind a firewall/auth proxy)
#   ULSWEEP_MLFLOW_PORT           port (default 5000)
#   ULSWEEP_MLFLOW_WORKERS        server worker processes (default 4)
#   ULSWEEP_MLFLOW_ALLOWED_HOSTS  Host headers to accept besides localhost and private IPs, comma separated,
#                                 e.g. mlflow.example.org,mlflow.example.org:*
#   MLFLOW_S3_ENDPOINT_URL        for S3-compatible stores other than AWS (MinIO, Ceph, ...)
set -euo pipefail

db="${ULSWEEP_MLFLOW_DB:?set ULSWEEP_MLFLOW_DB, e.g. postgresql://mlflow@db.internal:5432/mlflow}"
artifacts="${ULSWEEP_MLFLOW_ARTIFACTS:?set ULSWEEP_MLFLOW_ARTIFACTS, e.g. s3://YOUR-BUCKET/mlflow}"
host="${ULSWEEP_MLFLOW_HOST:-127.0.0.1}"
port="${ULSWEEP_MLFLOW_PORT:-5000}"
workers="${ULSWEEP_MLFLOW_WORKERS:-4}"

# user:password@ in the URI would land in `ps` output and in logs: refuse it
if [[ "$db" =~ ^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*:[^/@]*@ ]]; then
  echo "serve.sh: ULSWEEP_MLFLOW_DB carries a password; drop it from the URI and export PGPASSWORD instead" >&2
  exit 2
fi

args=(server --backend-store-uri "$db" --serve-artifacts --artifacts-destination "$artifacts"
      --host "$host" --port "$port" --workers "$workers")
if [[ -n "${ULSWEEP_MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$ULSWEEP_MLFLOW_ALLOWED_HOSTS")
fi
exec "${ULSWEEP_MLFLOW_BIN:-mlflow}" "${args[@]}"
