#!/usr/bin/env bash
# Regenerate the Python gRPC code for KEDA's external scaler protocol (`make proto`).
#
# Usage: [PYTHON=.venv/bin/python] scripts/gen_proto.sh [OUTPUT_ROOT]
#
# PYTHON needs grpcio-tools at the pinned version (the output depends on it); it defaults to the
# repository's .venv/bin/python. OUTPUT_ROOT defaults to the repository root; the files land in
# OUTPUT_ROOT/forecaster/scaler/generated/. The include mapping forecaster/scaler/generated=keda
# makes protoc see the proto under its package path, so the generated _grpc module imports
# `from forecaster.scaler.generated import externalscaler_pb2` with no post-editing.
# Never edit the generated files by hand.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo_root/.venv/bin/python}"
out_root="${1:-$repo_root}"
package_dir="forecaster/scaler/generated"

# Paths given relative to the caller's directory stay valid after the cd below.
if [[ "$python" == */* && "$python" != /* ]]; then
    python="$PWD/$python"
fi
mkdir -p "$out_root/$package_dir"
out_root="$(cd "$out_root" && pwd)"

# protoc resolves --proto_path and the proto file against the repository root.
cd "$repo_root"
"$python" -m grpc_tools.protoc \
    --proto_path="$package_dir=keda" \
    --python_out="$out_root" \
    --pyi_out="$out_root" \
    --grpc_python_out="$out_root" \
    "$package_dir/externalscaler.proto"
