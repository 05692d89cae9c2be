#!/bin/sh
# Creates (or, with --dry-run, prints) the four Secrets emo's manifests refer to, with fresh
# random passwords. Credentials live only in these Secrets, never in k8s/.
#
#   k8s/create-secrets.sh NAMESPACE             create them in NAMESPACE (kubectl context)
#   k8s/create-secrets.sh NAMESPACE --dry-run   print them as YAML, create nothing
#
# Existing Secrets are left alone (rotating a database password needs the database too).
set -eu
namespace=${1:?usage: k8s/create-secrets.sh NAMESPACE [--dry-run]}
mode=${2:-}
kubectl=${KUBECTL:-kubectl}

random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

emo_db=$(random)
prefect_db=$(random)
s3_key="emo-worker-$(random | cut -c1-8)"
s3_secret=$(random)

secret() {  # name, then key=value pairs
  name=$1
  shift
  args=""
  for pair in "$@"; do
    args="$args --from-literal=$pair"
  done
  if [ "$mode" = "--dry-run" ]; then
    echo "---"
    # shellcheck disable=SC2086
    $kubectl create secret generic "$name" --namespace "$namespace" $args \
      --dry-run=client -o yaml
  elif $kubectl get secret "$name" --namespace "$namespace" >/dev/null 2>&1; then
    echo "secret $name exists in $namespace; left as it is" >&2
  else
    # shellcheck disable=SC2086
    $kubectl create secret generic "$name" --namespace "$namespace" $args
  fi
}

secret emo-postgres \
  "POSTGRES_PASSWORD=$(random)" "EMO_DB_PASSWORD=$emo_db" "PREFECT_DB_PASSWORD=$prefect_db"
secret emo-minio "MINIO_ROOT_USER=admin-$(random | cut -c1-8)" "MINIO_ROOT_PASSWORD=$(random)"
secret emo-app \
  "EMO_DATABASE_URL=postgresql+psycopg://emo:$emo_db@emo-postgres:5432/emo" \
  "EMO_S3_ACCESS_KEY=$s3_key" "EMO_S3_SECRET_KEY=$s3_secret"
secret emo-prefect \
  "PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:$prefect_db@emo-postgres:5432/prefect"
