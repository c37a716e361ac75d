#!/usr/bin/env bash
# Prints the hookgate-secrets Secret that the Deployment mounts, made from
# the environment, for `kubectl apply -f -`:
#
#   VENDOR_SECRET=... deploy/kubernetes/secret.sh | kubectl apply -f -
#
#   VENDOR_SECRET    the HMAC secret the moderation API signs with (required)
#   PREVIOUS_SECRET  the one before it, only while the vendor rotates
#   ADMIN_TOKEN      the admin API's bearer token (made with openssl when unset)
#
# Refuses an empty or missing secret rather than writing one that verifies
# nothing. The values never appear on a command line: they go through files
# only this user can read, removed on exit.
set -euo pipefail
if [ -z "${VENDOR_SECRET:-}" ]; then
  echo "secret.sh: VENDOR_SECRET is empty or not set: export the secret the moderation API signs with" >&2
  exit 1
fi
if [ "${#VENDOR_SECRET}" -lt 16 ]; then
  echo "secret.sh: warning: VENDOR_SECRET is shorter than 16 bytes; the vendor issues longer ones" >&2
fi
command -v kubectl >/dev/null || { echo "secret.sh: kubectl is not installed" >&2; exit 1; }
umask 077
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
printf '%s' "$VENDOR_SECRET" >"$dir/current"
printf '%s' "${ADMIN_TOKEN:-$(openssl rand -hex 32)}" >"$dir/admin-token"
files=(--from-file=current="$dir/current" --from-file=admin-token="$dir/admin-token")
if [ -n "${PREVIOUS_SECRET:-}" ]; then
  printf '%s' "$PREVIOUS_SECRET" >"$dir/previous"
  files+=(--from-file=previous="$dir/previous")
fi
kubectl create secret generic hookgate-secrets "${files[@]}" --dry-run=client -o yaml
