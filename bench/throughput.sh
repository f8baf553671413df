#!/usr/bin/env bash
# The end-to-end throughput benchmark of issue 9, in one command: builds the release binaries
# (gateway, command-api, projector, fraud-worker, ledger) and runs
# `cargo bench -p system-tests --bench throughput`, which starts them on a scratch database with
# its own AMQP prefix and Redis key prefix, measures through the gateway, prints every figure
# with its ratio to PostgreSQL's C1 of the same run (../shared/bench/pg-ceiling.sh), removes
# everything it created, and prints the medians of three runs. BENCH_MODE=embedded measures
# `ledger serve` instead (one process on SQLite in a temp directory, plus its start time and idle
# memory). See docs/benchmarks.md.
#
# usage: bench/throughput.sh
# env:   BENCH_MODE (distributed | embedded), BENCH_RUNS (3), BENCH_SCALE (1.0, multiplies every phase's duration), BENCH_EVENTS
#        (1000000, 0 skips the rebuild), BENCH_KEEP=1, BENCH_KEEP_ON_FAILURE=1,
#        PG_CEILING_SCRIPT, TEST_DATABASE_URL, TEST_AMQP_URL, TEST_REDIS_URL
#        e.g. BENCH_RUNS=1 BENCH_SCALE=0.2 BENCH_EVENTS=100000 bench/throughput.sh  (about 2 min)
# needs: PostgreSQL (127.0.0.1:5432, user postgres), RabbitMQ (:5672), Redis (:6379), pgbench
#        (embedded: PostgreSQL and pgbench only, for C1)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
cargo build --release --bins
exec cargo bench -p system-tests --bench throughput
