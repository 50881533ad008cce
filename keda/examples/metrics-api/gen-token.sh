#!/usr/bin/env bash
# Make the API token the metrics-api example shares between forecaster (its apiToken) and KEDA
# (the TriggerAuthentication's bearer token): 32 random bytes as hex, with no newline at the end,
# so that KEDA's Authorization header carries the token alone. kustomization.yaml beside this
# script turns the file into the Secret forecaster-api-token in each of the two namespaces.
#
# Usage: keda/examples/metrics-api/gen-token.sh [FILE]     (default: api-token beside this script)
#
# A new token: run it again, apply, then `kubectl -n forecaster rollout restart
# statefulset/forecaster` (forecaster reads the token at start). Needs only openssl.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/api-token}"
umask 077
token="$(openssl rand -hex 32)"
printf '%s' "$token" >"$out"
echo "wrote $out"
