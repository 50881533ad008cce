#!/usr/bin/env bash
# Make the certificates for mutual TLS between KEDA and forecaster: a private CA, forecaster's
# server certificate (for the name KEDA dials: forecaster.forecaster.svc.cluster.local) and
# KEDA's client certificate. kustomization.yaml beside this script turns them into Secrets.
#
# Usage: keda/examples/tls/gen-certs.sh [OUT_DIR]     (default: certs/ beside this script)
# Env:   DAYS (validity, default 365), SERVER_NAME (default forecaster.forecaster.svc.cluster.local)
#
# ca.key signs both certificates and is not put in any Secret: keep it offline, or delete it and
# make a new CA when the certificates expire. Needs only openssl.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/certs}"
days="${DAYS:-365}"
server_name="${SERVER_NAME:-forecaster.forecaster.svc.cluster.local}"
short_name="${server_name%%.*}"

mkdir -p "$out"
cd "$out"
umask 077

# quiet COMMAND...: run it, showing its stderr (openssl's progress dots) only if it fails.
quiet() {
    local log
    log="$(mktemp)"
    if ! "$@" 2>"$log"; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

quiet openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
    -keyout ca.key -out ca.crt -subj "/CN=forecaster-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"

# sign NAME CN EXTENSIONS: NAME.key and NAME.crt, signed by the CA above.
sign() {
    quiet openssl req -newkey rsa:2048 -nodes -sha256 -keyout "$1.key" -out "$1.csr" \
        -subj "/CN=$2"
    printf '%s\n' "$3" >"$1.ext"
    quiet openssl x509 -req -sha256 -days "$days" -in "$1.csr" -CA ca.crt -CAkey ca.key \
        -CAcreateserial -out "$1.crt" -extfile "$1.ext"
    rm -f "$1.csr" "$1.ext"
}

# Go (KEDA) checks the subjectAltName, never the CN: the name in scalerAddress must be listed.
sign server "$server_name" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:$server_name,DNS:${server_name%.cluster.local},DNS:$short_name"

sign client "keda" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"

rm -f ca.srl
echo "wrote $out: ca.crt ca.key server.crt server.key client.crt client.key"
