#!/bin/sh
# Creates (or, with --dry-run, prints) the four Secrets emo's manifests refer to, with fresh
# random passwords. Credentials live only in these Secrets, never in k8s/.
#
#   k8s/create-secrets.sh NAMESPACE             create them in NAMESPACE (kubectl context)
#   k8s/create-secrets.sh NAMESPACE --dry-run   print them as YAML, create nothing
#
# All four or none: the URLs in emo-app and emo-prefect carry the passwords of emo-postgres, so
# if some exist and others do not, nothing is created (delete the rest or restore them).
set -eu
namespace=${1:?usage: k8s/create-secrets.sh NAMESPACE [--dry-run]}
mode=${2:-}
kubectl=${KUBECTL:-kubectl}

random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

emo_db=$(random)
prefect_db=$(random)
s3_key="emo-worker-$(random | cut -c1-8)"
s3_secret=$(random)
# The Prefect API's basic-auth string: the server requires it, every client sends it.
prefect_auth="emo:$(random)"

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
  else
    # shellcheck disable=SC2086
    $kubectl create secret generic "$name" --namespace "$namespace" $args
  fi
}

if [ "$mode" != "--dry-run" ]; then
  existing=""
  for name in emo-postgres emo-minio emo-app emo-prefect; do
    if $kubectl get secret "$name" --namespace "$namespace" >/dev/null 2>&1; then
      existing="$existing $name"
    fi
  done
  if [ "$existing" = " emo-postgres emo-minio emo-app emo-prefect" ]; then
    echo "all four Secrets exist in $namespace; nothing to do" >&2
    exit 0
  elif [ -n "$existing" ]; then
    echo "only some Secrets exist in $namespace:$existing; their passwords must match the" >&2
    echo "others, so nothing was created. Delete them (and the database volumes made with" >&2
    echo "them) or create the missing ones by hand from the existing passwords." >&2
    exit 1
  fi
fi

secret emo-postgres \
  "POSTGRES_PASSWORD=$(random)" "EMO_DB_PASSWORD=$emo_db" "PREFECT_DB_PASSWORD=$prefect_db"
secret emo-minio "MINIO_ROOT_USER=admin-$(random | cut -c1-8)" "MINIO_ROOT_PASSWORD=$(random)"
secret emo-app \
  "EMO_DATABASE_URL=postgresql+psycopg://emo:$emo_db@emo-postgres:5432/emo" \
  "EMO_S3_ACCESS_KEY=$s3_key" "EMO_S3_SECRET_KEY=$s3_secret" \
  "PREFECT_API_AUTH_STRING=$prefect_auth"
secret emo-prefect \
  "PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:$prefect_db@emo-postgres:5432/prefect" \
  "PREFECT_SERVER_API_AUTH_STRING=$prefect_auth"
