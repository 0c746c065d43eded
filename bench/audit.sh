#!/usr/bin/env bash
# Audit log throughput (append with durability, verify) on 1M records, beside raw SQLite in
# the same run. Usage: bench/audit.sh [RECORDS]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --locked -q -p outpost-policy --example audit_bench -- "${1:-1000000}"
