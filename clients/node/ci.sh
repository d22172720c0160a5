#!/usr/bin/env bash
# CI for the Node.js follower: the Rust binaries the tests run against (the
# standalone leader, the registry, the conformance harness), then `npm ci`
# (package-lock.json) and `npm test` (node --test, which runs the harness
# against conformance.js too).
#   clients/node/ci.sh                 # from anywhere
#   TANDEM_SKIP_CARGO=1 clients/node/ci.sh   # when .ci/run built them already
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [ "${TANDEM_SKIP_CARGO:-0}" != 1 ]; then
  (cd "$repo" && cargo build --example standalone --example bench_leader -p tandem && cargo build -p tandem-registry \
    && cargo build -p tandem-conformance)
fi
cd "$here"
npm ci --no-audit --no-fund
npm test
