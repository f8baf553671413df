#!/usr/bin/env bash
# Runs the whole ledger on this machine (SPEC §6): gateway (:8080), command-api (:8081),
# projector (:8082) and fraud-worker (:8083) as separate release-mode processes, against
# PostgreSQL, RabbitMQ and Redis on their default local ports (or DATABASE_URL, AMQP_URL and
# REDIS_URL). Logs go to logs/<service>.log (JSON lines, appended).
#
# - Creates the database of DATABASE_URL (and READ_DATABASE_URL) when it is missing.
# - JWT_SECRET, ADMIN_USERNAME and ADMIN_PASSWORD come from the environment; whatever is unset
#   is generated and printed once, here, and nowhere else. A secret you set is never printed.
# - Waits until every /health answers 200, then prints the URLs and how to get a token.
# - Ctrl-C or SIGTERM stops the gateway first (so its in-flight requests can still reach the
#   services), then the other three; each gets SIGTERM, then SIGKILL after STOP_GRACE_SECONDS.
# - A service that exits on its own stops the others and the script exits 1.
#
# The script's own knobs: LISTEN_HOST (127.0.0.1: the services are not exposed beyond this
# machine; 0.0.0.0 to expose them), HEALTH_TIMEOUT_SECONDS (90) per service,
# STOP_GRACE_SECONDS (40: longer than the services' own 30 s drain of their background workers).
# Every service variable of docs/operations.md passes through, except LISTEN_ADDR and the
# gateway's upstream URLs, which this script sets so the four processes find each other.
set -euo pipefail
cd "$(dirname "$0")/.."

# The four services, in start order: command-api creates the event log the projector reads,
# and the gateway checks the other three in its own /health, so it starts last.
SERVICES=(command-api projector fraud-worker gateway)
PORTS=(8081 8082 8083 8080)
# The gateway's metrics listener (METRICS_ADDR): never on its public port.
METRICS_ADDR=${METRICS_ADDR:-127.0.0.1:9080}
PIDS=()
LOG_OFFSETS=() # the size of each log when its service started: failures show only this run's lines

LISTEN_HOST=${LISTEN_HOST:-127.0.0.1}
HEALTH_TIMEOUT_SECONDS=${HEALTH_TIMEOUT_SECONDS:-90}
STOP_GRACE_SECONDS=${STOP_GRACE_SECONDS:-40}

say() { printf '%s\n' "$*"; }
fail() {
    printf 'run-local: %s\n' "$*" >&2
    exit 1
}

# A random string of [A-Za-z0-9] made from <bytes> random bytes (about 4/3 as many characters,
# minus the base64 punctuation removed).
random_text() {
    head -c "$1" /dev/urandom | base64 | tr -d '\n=+/'
}

# A URL as it may be printed: the password, if any, hidden.
redacted() { # redacted <url>
    printf '%s\n' "$1" | sed -E 's#^([a-z+]+://[^:/@]*):[^@/]*@#\1:***@#'
}

# Prints "host port" of a URL such as amqp://user:pass@host:5672/%2f or redis://[::1]:6379/0.
endpoint_of() { # endpoint_of <url> <default port>
    local rest=${1#*://} host port
    rest=${rest%%/*}
    rest=${rest%%\?*}
    rest=${rest##*@}
    if [[ $rest == \[* ]]; then
        host=${rest%%]*}
        host=${host#[}
        port=${rest##*]}
        port=${port#:}
    else
        host=${rest%%:*}
        port=${rest#"$host"}
        port=${port#:}
    fi
    printf '%s %s\n' "${host:-127.0.0.1}" "${port:-$2}"
}

# Whether something accepts TCP connections at host:port (bash's /dev/tcp, bounded when
# `timeout` exists, so an unroutable host cannot hang the script).
reachable() { # reachable <host> <port>
    local bounded=()
    if command -v timeout >/dev/null 2>&1; then bounded=(timeout 3); fi
    # shellcheck disable=SC2016 # $1 and $2 are the inner shell's arguments
    ${bounded[@]+"${bounded[@]}"} bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

require_commands() {
    local missing=() command
    for command in cargo curl psql; do
        command -v "$command" >/dev/null 2>&1 || missing+=("$command")
    done
    [ ${#missing[@]} -eq 0 ] || fail "missing commands: ${missing[*]} (install them and retry)"
}

# RabbitMQ and Redis must answer before anything starts: the fraud worker refuses to start
# without the broker, and it needs Redis for its velocity rule.
require_servers() {
    local host port
    read -r host port < <(endpoint_of "${AMQP_URL:-amqp://guest:guest@localhost:5672/%2f}" 5672)
    reachable "$host" "$port" ||
        fail "RabbitMQ is not reachable at $host:$port (AMQP_URL); start it, e.g. rabbitmq-server -detached"
    read -r host port < <(endpoint_of "${REDIS_URL:-redis://127.0.0.1:6379}" 6379)
    reachable "$host" "$port" ||
        fail "Redis is not reachable at $host:$port (REDIS_URL); start it, e.g. redis-server --daemonize yes"
}

# Whether the database exists; fails when the server cannot be asked.
database_exists() { # database_exists <maintenance url> <database>
    [ "$(psql "$1" -v ON_ERROR_STOP=1 -Atc "SELECT 1 FROM pg_database WHERE datname = '$2'")" = 1 ]
}

# Creates the database a PostgreSQL URL names, unless it exists. Safe to run twice, or
# concurrently: after a failed CREATE DATABASE (a lost race) the database is looked up again.
ensure_database() { # ensure_database <postgres url> <variable name>
    local url=$1 variable=$2 base query='' database maintenance
    base=${url%%\?*}
    [ "$base" = "$url" ] || query="?${url#*\?}"
    database=${base##*/}
    maintenance="${base%/*}/postgres$query"
    [[ $database =~ ^[A-Za-z0-9_]+$ ]] ||
        fail "$variable names the database '$database'; this script only creates names of [A-Za-z0-9_]"
    psql "$maintenance" -Atc 'SELECT 1' >/dev/null 2>&1 ||
        fail "PostgreSQL is not reachable at $(redacted "${base%/*}") ($variable): $(psql "$maintenance" -Atc 'SELECT 1' 2>&1 | head -n 1)"
    if ! database_exists "$maintenance" "$database"; then
        say "creating database $database"
        psql "$maintenance" -v ON_ERROR_STOP=1 -qc "CREATE DATABASE \"$database\"" 2>/dev/null ||
            database_exists "$maintenance" "$database" ||
            fail "could not create database $database on $(redacted "${base%/*}")"
    fi
}

# What the operator set is checked before anything happens, with the rules the services apply
# at start (docs/gateway.md): failing here is faster than after a build.
validate_operator_values() {
    if [ -n "${JWT_SECRET:-}" ] && [ $(($(printf '%s' "$JWT_SECRET" | wc -c))) -lt 32 ]; then
        fail "JWT_SECRET must be at least 32 bytes (docs/decisions.md §7)"
    fi
    if [ -n "${JWT_SECRET:-}" ] &&
        [ $(($(printf '%s' "$JWT_SECRET" | od -An -v -tx1 | tr -s ' ' '\n' | sed '/^$/d' | sort -u | wc -l))) -lt 16 ]; then
        fail "JWT_SECRET must have at least 16 distinct bytes (use a random one: openssl rand -hex 32)"
    fi
    if [ -n "${ADMIN_USERNAME:-}" ] && ! [[ $ADMIN_USERNAME =~ ^[a-z0-9_.-]{3,32}$ ]]; then
        fail "ADMIN_USERNAME must be 3-32 characters of [a-z0-9_.-]"
    fi
    if [ -n "${ADMIN_PASSWORD:-}" ] && { [ ${#ADMIN_PASSWORD} -lt 12 ] || [ ${#ADMIN_PASSWORD} -gt 128 ]; }; then
        fail "ADMIN_PASSWORD must be 12-128 characters"
    fi
}

# Secrets and the admin: the operator's values if set, else generated and printed once.
prepare_credentials() {
    if [ -z "${JWT_SECRET:-}" ]; then
        JWT_SECRET=$(random_text 48)
        say "JWT_SECRET was not set; generated one for this run:"
        say "  export JWT_SECRET=$JWT_SECRET"
    fi
    if [ -z "${ADMIN_USERNAME:-}" ]; then
        ADMIN_USERNAME='admin'
        say "ADMIN_USERNAME was not set; using: $ADMIN_USERNAME"
    fi
    ADMIN_PASSWORD_GENERATED=false
    if [ -z "${ADMIN_PASSWORD:-}" ]; then
        ADMIN_PASSWORD=$(random_text 18)
        ADMIN_PASSWORD_GENERATED=true
        say "ADMIN_PASSWORD was not set; generated one for this run:"
        say "  export ADMIN_PASSWORD=$ADMIN_PASSWORD"
    fi
    export JWT_SECRET ADMIN_USERNAME ADMIN_PASSWORD
}

require_free_ports() {
    local i port holder
    for i in "${!SERVICES[@]}"; do
        port=${PORTS[$i]}
        if reachable 127.0.0.1 "$port"; then
            holder=''
            if command -v ss >/dev/null 2>&1; then
                holder=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:.*' | head -n 1 || true)
            fi
            fail "port $port (${SERVICES[$i]}) is already in use${holder:+ by $holder}; stop that process first"
        fi
    done
    local metrics_host=${METRICS_ADDR%:*} metrics_port=${METRICS_ADDR##*:}
    if reachable "${metrics_host:-127.0.0.1}" "$metrics_port"; then
        fail "port $metrics_port (the gateway's METRICS_ADDR) is already in use; stop that process or set METRICS_ADDR"
    fi
}

# Starts a service in the background, in a process group of its own: job control is on only
# while it forks. So a Ctrl-C in the terminal, which goes to the terminal's foreground group,
# reaches this script (and a curl or sleep it is running) but not the services, and the script
# stops them in order. With job control left on, every foreground command would take the
# terminal in turn, and a Ctrl-C at the wrong moment would reach only that command.
start_service() { # start_service <index>
    local name=${SERVICES[$1]} port=${PORTS[$1]}
    say "starting $name on $LISTEN_HOST:$port (log: logs/$name.log)"
    LOG_OFFSETS[$1]=0 # a first run has no log yet: measure only one that exists
    if [ -f "logs/$name.log" ]; then LOG_OFFSETS[$1]=$(($(wc -c <"logs/$name.log"))); fi
    set -m
    if [ "$name" = gateway ]; then
        LISTEN_ADDR="$LISTEN_HOST:$port" \
            METRICS_ADDR="$METRICS_ADDR" \
            COMMAND_API_URL="http://127.0.0.1:${PORTS[0]}" \
            QUERY_API_URL="http://127.0.0.1:${PORTS[1]}" \
            FRAUD_WORKER_URL="http://127.0.0.1:${PORTS[2]}" \
            "./target/release/$name" >>"logs/$name.log" 2>&1 &
    else
        LISTEN_ADDR="$LISTEN_HOST:$port" "./target/release/$name" >>"logs/$name.log" 2>&1 &
    fi
    PIDS[$1]=$!
    set +m
}

# Explains why a service is not up: how it exited or what /health said, and its log's tail.
explain_failure() { # explain_failure <index> <reason>
    local name=${SERVICES[$1]}
    {
        say "run-local: $name $2"
        say "last lines of logs/$name.log (this run):"
        tail -c +$((${LOG_OFFSETS[$1]:-0} + 1)) "logs/$name.log" | tail -n 20 | sed 's/^/  /'
    } >&2
}

wait_healthy() { # wait_healthy <index>
    local name=${SERVICES[$1]} port=${PORTS[$1]} pid=${PIDS[$1]} deadline status answer=''
    deadline=$((SECONDS + HEALTH_TIMEOUT_SECONDS))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            status=0
            wait "$pid" 2>/dev/null || status=$?
            PIDS[$1]=''
            explain_failure "$1" "exited with status $status while starting"
            exit 1
        fi
        if answer=$(curl -sS --max-time 2 -w ' (HTTP %{http_code})' "http://127.0.0.1:$port/health" 2>&1) &&
            [[ $answer == *'(HTTP 200)' ]]; then
            say "  $name is up: ${answer% (HTTP 200)}"
            return 0
        fi
        sleep 0.5
    done
    explain_failure "$1" "did not answer 200 on http://127.0.0.1:$port/health within ${HEALTH_TIMEOUT_SECONDS}s; last answer: ${answer:-none}"
    exit 1
}

# Sends SIGTERM to the running services among <indexes>, waits up to STOP_GRACE_SECONDS for them
# to exit, then SIGKILLs the rest.
stop_services() { # stop_services <index>...
    local i pid deadline running
    for i in "$@"; do
        pid=${PIDS[$i]:-}
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            say "stopping ${SERVICES[$i]} (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    deadline=$((SECONDS + STOP_GRACE_SECONDS))
    while :; do
        running=()
        for i in "$@"; do
            pid=${PIDS[$i]:-}
            if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then running+=("$i"); fi
        done
        [ ${#running[@]} -gt 0 ] || break
        if [ "$SECONDS" -ge "$deadline" ]; then
            for i in "${running[@]}"; do
                say "${SERVICES[$i]} did not stop within ${STOP_GRACE_SECONDS}s; sending SIGKILL" >&2
                kill -KILL "${PIDS[$i]}" 2>/dev/null || true
            done
            break
        fi
        sleep 0.2
    done
    for i in "$@"; do
        pid=${PIDS[$i]:-}
        if [ -n "$pid" ]; then
            wait "$pid" 2>/dev/null || true
            PIDS[i]=''
        fi
    done
}

STOPPING=false
stop_all() {
    $STOPPING && return 0
    STOPPING=true
    # The gateway first: it drains its in-flight requests while the services behind it still
    # answer. Then the three services together.
    stop_services 3
    stop_services 0 1 2
    say "stopped"
}

on_signal() { # on_signal <exit status>
    trap - INT TERM
    say ""
    stop_all
    exit "$1"
}

main() {
    require_commands
    validate_operator_values
    if [ -n "${LISTEN_ADDR:-}" ]; then
        say "LISTEN_ADDR is ignored here: each service gets its own port (LISTEN_HOST=$LISTEN_HOST)" >&2
        unset LISTEN_ADDR
    fi
    export DATABASE_URL=${DATABASE_URL:-postgres://postgres@localhost:5432/ledger?sslmode=disable}
    ensure_database "$DATABASE_URL" DATABASE_URL
    if [ -n "${READ_DATABASE_URL:-}" ]; then ensure_database "$READ_DATABASE_URL" READ_DATABASE_URL; fi
    require_servers
    require_free_ports
    prepare_credentials

    say "building (cargo build --release --bins)"
    cargo build --release --bins

    mkdir -p logs
    trap 'on_signal 130' INT
    trap 'on_signal 143' TERM
    trap stop_all EXIT

    start_service 0
    wait_healthy 0
    start_service 1
    start_service 2
    wait_healthy 1
    wait_healthy 2
    start_service 3
    wait_healthy 3

    say ""
    say "The ledger is running (logs under logs/; Ctrl-C stops it):"
    say "  gateway       http://127.0.0.1:${PORTS[3]}   the public API, /api/v1/openapi.json"
    say "                http://$METRICS_ADDR   the gateway's /metrics"
    say "  command-api   http://127.0.0.1:${PORTS[0]}   /health, /metrics"
    say "  projector     http://127.0.0.1:${PORTS[1]}   /health, /metrics"
    say "  fraud-worker  http://127.0.0.1:${PORTS[2]}   /health, /metrics"
    say ""
    say "Next: a token for the admin '$ADMIN_USERNAME' through the gateway:"
    # A password the operator set is never printed: the hint names the variable instead.
    # shellcheck disable=SC2016
    local password_shown='$ADMIN_PASSWORD'
    if $ADMIN_PASSWORD_GENERATED; then password_shown=$ADMIN_PASSWORD; fi
    say "  curl -s -X POST http://127.0.0.1:${PORTS[3]}/api/v1/auth/token -H 'Content-Type: application/json' \\"
    say "       -d \"{\\\"username\\\":\\\"$ADMIN_USERNAME\\\",\\\"password\\\":\\\"$password_shown\\\"}\""
    say "or register a customer first with POST /api/v1/auth/register {\"username\",\"password\"} (12+ characters)."
    say "Customers cannot deposit: money enters through an operator (the payment rail) or the admin."
    say "An operator token: ./target/release/ledger token --sub \$(uuidgen) --role operator (with JWT_SECRET exported)."
    say "Operator tools: ./target/release/ledger --help (verify, rebuild, replay, token); runbook: docs/operations.md"

    # Supervise: a service that exits on its own takes the others down with it.
    local i status
    while :; do
        for i in "${!SERVICES[@]}"; do
            if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
                status=0
                wait "${PIDS[$i]}" 2>/dev/null || status=$?
                PIDS[i]=''
                explain_failure "$i" "exited on its own with status $status; stopping the others"
                exit 1
            fi
        done
        sleep 1 &
        wait $! || true
    done
}

main "$@"
