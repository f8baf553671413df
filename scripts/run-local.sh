#!/usr/bin/env bash
# Runs what exists of the ledger on this machine, against PostgreSQL, RabbitMQ and Redis on their
# default local ports: today the write side (command-api) and the fraud worker, as separate
# processes. Logs go to logs/. JWT_SECRET is taken from the environment, or generated and
# printed. Ctrl-C stops everything gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@localhost:5432/ledger}
if [ -z "${JWT_SECRET:-}" ]; then
    JWT_SECRET=$(head -c 32 /dev/urandom | base64 | tr -d '\n=+/')
    export JWT_SECRET
    echo "JWT_SECRET was not set; generated one for this run: $JWT_SECRET"
fi

# Create the database on first run.
database=${DATABASE_URL##*/}
database=${database%%\?*}
server=${DATABASE_URL%/*}
if ! psql "$server/postgres" -Atc "SELECT 1 FROM pg_database WHERE datname = '$database'" | grep -q 1; then
    echo "creating database $database"
    psql "$server/postgres" -qc "CREATE DATABASE \"$database\""
fi

cargo build --release --bin command-api --bin fraud-worker
mkdir -p logs
pids=()
stop() {
    trap - INT TERM EXIT
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT
./target/release/command-api >>logs/command-api.log 2>&1 &
pids+=($!)
./target/release/fraud-worker >>logs/fraud-worker.log 2>&1 &
pids+=($!)

wait_healthy() { # wait_healthy <name> <port>
    for _ in $(seq 60); do
        if curl -fsS "http://127.0.0.1:$2/health" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    echo "$1 did not become healthy; see logs/$1.log" >&2
    exit 1
}
wait_healthy command-api 8081
wait_healthy fraud-worker 8083
echo "command-api is up on http://127.0.0.1:8081, the fraud worker on :8083 (logs under logs/)."
echo "A customer token for trying it out (valid 1 hour):"
python3 scripts/mint-token.py --sub "$(python3 -c 'import uuid; print(uuid.uuid4())')" --role customer
echo "Press Ctrl-C to stop."
wait "${pids[@]}"
