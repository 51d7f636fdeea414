#!/usr/bin/env bash
# A staging cluster in one command: one PostgreSQL, three tandem hosts
# (web1..web3), the example app beside each (examples/pages/app.py) and
# HAProxy in front, all on loopback, all under $DEMO_DIR.
#
#   scripts/demo-cluster.sh up       start everything, seed a page, print what to try
#   scripts/demo-cluster.sh check    the automated test: a change through one server is
#                                    served by all, the apps got the event, the leader fails over
#   scripts/demo-cluster.sh status   processes, roles, HAProxy's view
#   scripts/demo-cluster.sh start webN   start a tandem host again (after killing it)
#   scripts/demo-cluster.sh down     stop everything, remove $DEMO_DIR (safe to run twice)
#
# Environment:
#   DEMO_DIR          state directory (default /tmp/tandem-demo)
#   TANDEM_BIN        the tandem binary (default target/release/tandem, then `tandem` on
#                     PATH, else `cargo build --release`)
#   DEMO_API_PORT     first tandem API port (default 7071: web1 7071, web2 7072, web3 7073)
#   DEMO_APP_PORT     first app port (default 8081)
#   DEMO_HTTP_PORT    HAProxy's front end (default 8080); its stats page on DEMO_STATS_PORT (8404)
#   DEMO_LEASE        leader.lease (default 5s); heartbeats every DEMO_HEARTBEAT (1s)
#   DEMO_TANDEM_ENV   more settings for every tandem host, e.g. "TANDEM_LOG_LEVEL=debug TANDEM_EVENTS_HEARTBEAT=5s"
#   DEMO_KEEP=1       up: when it fails, leave the processes and $DEMO_DIR for a look
#   DEMO_TOKEN=1      protect writes with an API token (api.token_file; the apps get TANDEM_TOKEN)
#   DEMO_SKIP_EVENTS=1  check: skip the assertions on the event stream (/v1/events)
#   PYTHON            the Python 3 interpreter for the apps (default python3)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO/scripts/demo-cluster.sh"
D="${DEMO_DIR:-/tmp/tandem-demo}"
D="${D%/}"
HOSTS=(web1 web2 web3)
MARKER=".tandem-demo"

say() { printf '%s\n' "$*"; }
info() { printf '==> %s\n' "$*"; }
die() {
    printf 'demo-cluster: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------- helpers

# The newest /usr/lib/postgresql/*/bin holding initdb.
pg_bin_dir() {
    local d best=""
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V); do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] && best="$d"
    done
    printf '%s' "$best"
}

find_tandem() {
    if [[ -n "${TANDEM_BIN:-}" ]]; then
        [[ -x "$TANDEM_BIN" ]] || die "TANDEM_BIN=$TANDEM_BIN is not an executable"
        printf '%s' "$TANDEM_BIN"
    elif [[ -x "$REPO/target/release/tandem" ]]; then
        printf '%s' "$REPO/target/release/tandem"
    elif command -v tandem >/dev/null 2>&1; then
        command -v tandem
    else
        command -v cargo >/dev/null 2>&1 || die "no tandem binary (TANDEM_BIN, target/release/tandem, PATH) and no cargo to build one"
        info "building tandem (cargo build --release)" >&2
        (cd "$REPO" && cargo build --release --locked --bin tandem >&2)
        printf '%s' "$REPO/target/release/tandem"
    fi
}

# Is something listening on 127.0.0.1:$1?
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Runs a command as the PostgreSQL user (when root) or as ourselves.
as_pg() {
    if [[ -z "${PG_USER:-}" ]]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$PG_USER" -- "$@"
    else
        su -s /bin/sh "$PG_USER" -c "$(printf '%q ' "$@")"
    fi
}

alive() {
    local pid="$1"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    # a zombie is gone for our purposes
    ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

pid_of() { cat "$1" 2>/dev/null || true; }

# Sends SIGTERM, waits up to $2 seconds (default 15), then SIGKILL.
stop_pid() {
    alive "$1" || return 0
    kill -TERM "$1" 2>/dev/null || true
    wait_gone "$@"
}

# Waits up to $2 seconds for process $1 to end, then SIGKILL.
wait_gone() {
    local pid="$1" secs="${2:-15}" what="$3" i
    for ((i = 0; i < secs * 10; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    say "   $what (pid $pid) did not stop within ${secs}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
}

# HTTP status of a GET (000 when nothing answers).
http_status() { curl -s -o /dev/null -w '%{http_code}' --max-time "${2:-3}" "$1" 2>/dev/null || true; }

# Reads a field of a JSON document on stdin: json_get leader  /  json_get a.b
json_get() {
    "$PYTHON" -c '
import json, sys
try:
    v = json.load(sys.stdin)
    for p in sys.argv[1].split("."):
        v = v.get(p) if isinstance(v, dict) else None
except Exception:
    v = None
print("" if v is None else v)' "$1"
}

api_port() { echo $((API_PORT0 + $1 - 1)); }
app_port() { echo $((APP_PORT0 + $1 - 1)); }
host_num() { echo "${1#web}"; }

load_state() {
    [[ -f "$D/demo.env" ]] || die "no demo cluster in $D (run: $SELF up)"
    # shellcheck source=/dev/null
    source "$D/demo.env"
}

# ---------------------------------------------------------------- starting things

start_postgres() {
    PG_BIN="$(pg_bin_dir)"
    if [[ -z "$PG_BIN" ]]; then
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            info "installing the PostgreSQL server binaries (apt-get install postgresql)"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
            PG_BIN="$(pg_bin_dir)"
        fi
        [[ -n "$PG_BIN" ]] || die "PostgreSQL server binaries are missing (/usr/lib/postgresql/*/bin): apt-get install postgresql"
    fi
    PG_USER=""
    if [[ $(id -u) -eq 0 ]]; then
        # PostgreSQL refuses to run as root: use its own user, else nobody
        if id postgres >/dev/null 2>&1; then PG_USER=postgres; else PG_USER=nobody; fi
    fi
    mkdir -p "$D/pg"
    chmod 755 "$D" "$D/pg"
    [[ -n "$PG_USER" ]] && chown "$PG_USER:" "$D/pg"
    info "PostgreSQL: initdb ($PG_BIN${PG_USER:+, as $PG_USER})"
    (cd "$D/pg" && as_pg "$PG_BIN/initdb" -D "$D/pg/data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >"$D/pg/initdb.log" 2>&1) ||
        {
            cat "$D/pg/initdb.log" >&2
            die "initdb failed${PG_USER:+ (it runs as $PG_USER, who must be able to enter every parent directory of $D)}"
        }
    local try
    for try in 1 2 3 4 5; do
        PG_PORT="$(free_port)"
        if (cd "$D/pg" && as_pg "$PG_BIN/pg_ctl" start -w -t 60 -D "$D/pg/data" -l "$D/pg/server.log" \
            -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $D/pg -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
            >>"$D/pg/pg_ctl.log" 2>&1); then
            break
        fi
        PG_PORT=""
    done
    [[ -n "$PG_PORT" ]] || {
        tail -20 "$D/pg/server.log" >&2 || true
        die "could not start PostgreSQL"
    }
    "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres tandem_demo
    DB_URL="postgres://postgres@127.0.0.1:$PG_PORT/tandem_demo"
    info "PostgreSQL on 127.0.0.1:$PG_PORT, database tandem_demo"
}

# Starts tandem host webN (its settings: TANDEM_* environment variables).
start_host() {
    local h="$1" n api
    n="$(host_num "$h")"
    api="$(api_port "$n")"
    mkdir -p "$D/$h/data"
    if port_busy "$api"; then die "port $api (tandem $h) is in use"; fi
    local token=()
    [[ -n "${TOKEN_FILE:-}" ]] && token=("TANDEM_API_TOKEN_FILE=$TOKEN_FILE")
    local extra=()
    read -r -a extra <<<"${EXTRA_ENV:-}"
    setsid env -i PATH="$PATH" HOME="${HOME:-/root}" \
        TANDEM_HOST_ID="$h" \
        TANDEM_DATABASE_URL="$DB_URL" \
        TANDEM_API_LISTEN="127.0.0.1:$api" \
        TANDEM_DATA_DIR="$D/$h/data" \
        TANDEM_LEADER_LEASE="$LEASE" \
        TANDEM_CLUSTER_HEARTBEAT_INTERVAL="$HEARTBEAT" \
        TANDEM_SYNC_POLL_INTERVAL=1s \
        TANDEM_LOG_LEVEL=info \
        "${token[@]}" \
        "${extra[@]}" \
        "$BIN" run --config "$D/tandem.toml" </dev/null >>"$D/$h/tandem.log" 2>&1 &
    echo $! >"$D/$h/tandem.pid"
}

# wait_readyz WHAT URL PIDFILE LOG SECS: until URL answers 200; dies with
# the log's tail if the process exits first or SECS pass.
wait_readyz() {
    local what="$1" url="$2" pidfile="$3" log="$4" secs="$5" i
    for ((i = 0; i < secs * 10; i++)); do
        [[ "$(http_status "$url")" == 200 ]] && return 0
        if ! alive "$(pid_of "$pidfile")"; then
            tail -30 "$log" >&2 || true
            die "$what exited while starting (log: $log)"
        fi
        sleep 0.1
    done
    tail -30 "$log" >&2 || true
    die "$what not ready after ${secs}s (log: $log)"
}

wait_ready() {
    local h="$1" api
    api="$(api_port "$(host_num "$h")")"
    wait_readyz "tandem $h" "http://127.0.0.1:$api/readyz" "$D/$h/tandem.pid" "$D/$h/tandem.log" "${2:-60}"
}

start_app() {
    local h="$1" n port api
    n="$(host_num "$h")"
    port="$(app_port "$n")"
    api="$(api_port "$n")"
    if port_busy "$port"; then die "port $port (app $h) is in use"; fi
    local token=()
    [[ -n "${TOKEN_FILE:-}" ]] && token=("TANDEM_TOKEN=$(cat "$TOKEN_FILE")")
    setsid env -i PATH="$PATH" HOME="${HOME:-/root}" LANG=C.UTF-8 PYTHONUNBUFFERED=1 \
        APP_NAME="$h" APP_PORT="$port" \
        TANDEM_URL="http://127.0.0.1:$api" \
        TANDEM_CACHE_DIR="$D/$h/data/cache" \
        "${token[@]}" \
        "$PYTHON" "$REPO/examples/pages/app.py" --pidfile "$D/$h/app.pid" </dev/null >>"$D/$h/app.log" 2>&1 &
    echo $! >"$D/$h/app.pid"
}

wait_app() {
    local h="$1" port
    port="$(app_port "$(host_num "$h")")"
    wait_readyz "app $h" "http://127.0.0.1:$port/readyz" "$D/$h/app.pid" "$D/$h/app.log" 10
}

write_haproxy_cfg() {
    local h n
    {
        cat <<EOF
# HAProxy in front of the three example apps (scripts/demo-cluster.sh)
global
    log stdout format raw local0 notice

defaults
    mode http
    log global
    option dontlognull
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend site
    bind 127.0.0.1:$HTTP_PORT
    default_backend apps

backend apps
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 1s fall 2 rise 2
EOF
        for h in "${HOSTS[@]}"; do
            n="$(host_num "$h")"
            printf '    server %s 127.0.0.1:%s\n' "$h" "$(app_port "$n")"
        done
        cat <<EOF

listen stats
    bind 127.0.0.1:$STATS_PORT
    stats enable
    stats uri /
    stats refresh 2s
EOF
    } >"$D/haproxy.cfg"
}

ensure_haproxy() {
    command -v haproxy >/dev/null 2>&1 && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        info "installing haproxy (apt-get install haproxy)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null 2>&1 || {
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null
        }
        command -v haproxy >/dev/null 2>&1 && return 0
    fi
    die "haproxy is not installed: run 'sudo apt-get install haproxy' (or your system's equivalent) and try again"
}

start_haproxy() {
    write_haproxy_cfg
    haproxy -c -q -f "$D/haproxy.cfg" || die "haproxy rejects $D/haproxy.cfg"
    setsid haproxy -f "$D/haproxy.cfg" -db </dev/null >>"$D/haproxy.log" 2>&1 &
    echo $! >"$D/haproxy.pid"
}

# HAProxy's state of each server ("web1 UP", ...), from its stats CSV.
haproxy_states() {
    curl -s --max-time 2 "http://127.0.0.1:$STATS_PORT/;csv" 2>/dev/null |
        awk -F, '$1 == "apps" && $2 != "BACKEND" && $2 != "FRONTEND" { print $2, $18 }'
}

wait_haproxy_all_up() {
    local secs="${1:-20}" i
    for ((i = 0; i < secs * 4; i++)); do
        [[ "$(haproxy_states | grep -c ' UP$' || true)" == "${#HOSTS[@]}" ]] && return 0
        sleep 0.25
    done
    return 1
}

# ---------------------------------------------------------------- up

cmd_up() {
    if [[ -e "$D" ]]; then
        if [[ -f "$D/$MARKER" ]] && any_running; then
            die "a demo cluster is already running in $D (scripts/demo-cluster.sh down first)"
        fi
        [[ -f "$D/$MARKER" || -z "$(ls -A "$D" 2>/dev/null)" ]] ||
            die "$D exists and is not a demo directory; set DEMO_DIR or remove it"
        rm -rf "$D"
    fi
    command -v curl >/dev/null 2>&1 || die "curl is required"
    PYTHON="${PYTHON:-python3}"
    command -v "$PYTHON" >/dev/null 2>&1 || die "python3 is required for the example app"
    # the interpreter itself (not a version manager's shim)
    PYTHON="$("$PYTHON" -c 'import sys; print(sys.executable)')"
    API_PORT0="${DEMO_API_PORT:-7071}"
    APP_PORT0="${DEMO_APP_PORT:-8081}"
    HTTP_PORT="${DEMO_HTTP_PORT:-8080}"
    STATS_PORT="${DEMO_STATS_PORT:-8404}"
    LEASE="${DEMO_LEASE:-5s}"
    HEARTBEAT="${DEMO_HEARTBEAT:-1s}"
    EXTRA_ENV="${DEMO_TANDEM_ENV:-}"
    [[ "$EXTRA_ENV" =~ ^([A-Z0-9_]+=[^[:space:]]*([[:space:]]+|$))*$ ]] ||
        die "DEMO_TANDEM_ENV must be NAME=VALUE words separated by spaces: $EXTRA_ENV"
    local p n
    for p in "$HTTP_PORT" "$STATS_PORT"; do
        if port_busy "$p"; then die "port $p is in use (set DEMO_HTTP_PORT / DEMO_STATS_PORT)"; fi
    done
    for n in 1 2 3; do
        if port_busy "$(api_port "$n")"; then die "port $(api_port "$n") is in use (set DEMO_API_PORT)"; fi
        if port_busy "$(app_port "$n")"; then die "port $(app_port "$n") is in use (set DEMO_APP_PORT)"; fi
    done
    ensure_haproxy
    BIN="$(find_tandem)"

    mkdir -p "$D"
    touch "$D/$MARKER"
    UP_DONE=0
    trap 'up_failed' EXIT
    trap 'exit 130' INT TERM

    TOKEN_FILE=""
    if [[ "${DEMO_TOKEN:-}" == 1 ]]; then
        TOKEN_FILE="$D/api-token"
        (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(16))' >"$TOKEN_FILE")
    fi
    start_postgres
    cat >"$D/tandem.toml" <<'EOF'
# Shared config of the demo's tandem hosts (scripts/demo-cluster.sh). Each
# host's own settings (host id, database, API address, data directory, lease,
# heartbeat) come from TANDEM_* environment variables; see docs/config.md.
# [[jobs]] tables, which have no environment overrides, would go here.
EOF
    save_state
    info "tandem: $BIN ($("$BIN" --version 2>/dev/null || echo '?'))"
    local h
    for h in "${HOSTS[@]}"; do
        start_host "$h"
    done
    for h in "${HOSTS[@]}"; do
        wait_ready "$h"
        info "tandem $h ready on http://127.0.0.1:$(api_port "$(host_num "$h")") (pid $(pid_of "$D/$h/tandem.pid"))"
    done
    for h in "${HOSTS[@]}"; do
        start_app "$h"
    done
    for h in "${HOSTS[@]}"; do
        wait_app "$h"
        info "app $h on http://127.0.0.1:$(app_port "$(host_num "$h")")/ (pid $(pid_of "$D/$h/app.pid"))"
    done
    start_haproxy
    info "seeding page 'home' through web1"
    local auth=()
    [[ -n "$TOKEN_FILE" ]] && auth=(-H "Authorization: Bearer $(cat "$TOKEN_FILE")")
    curl -fsS "${auth[@]}" -X PUT -H 'Content-Type: text/html; charset=utf-8' \
        --data-binary '<h1>Welcome to the tandem demo</h1><p>This page lives in the cache <code>pages</code>, as a file on every server.</p>' \
        "http://127.0.0.1:$(api_port 1)/v1/cache/pages/home?wait=cluster" >/dev/null
    curl -fsS "${auth[@]}" -X PUT -H 'Content-Type: text/html; charset=utf-8' \
        --data-binary '<h1>About</h1><p>Three web servers, one PostgreSQL, one tandem beside each app.</p>' \
        "http://127.0.0.1:$(api_port 1)/v1/cache/pages/about?wait=cluster" >/dev/null
    wait_haproxy_all_up 30 || {
        haproxy_states >&2 || true
        tail -20 "$D/haproxy.log" >&2 || true
        die "HAProxy does not see all three apps up"
    }
    info "HAProxy on http://127.0.0.1:$HTTP_PORT/ (pid $(pid_of "$D/haproxy.pid")): all three apps UP"
    UP_DONE=1
    trap - EXIT INT TERM
    print_guide
}

save_state() {
    {
        printf '# written by scripts/demo-cluster.sh up\n'
        local v
        for v in BIN PYTHON PG_BIN PG_USER PG_PORT DB_URL API_PORT0 APP_PORT0 HTTP_PORT STATS_PORT LEASE HEARTBEAT TOKEN_FILE EXTRA_ENV; do
            printf '%s=%q\n' "$v" "${!v}"
        done
    } >"$D/demo.env"
}

up_failed() {
    local rc=$?
    [[ "${UP_DONE:-0}" == 1 ]] && return
    trap - EXIT INT TERM
    if [[ "${DEMO_KEEP:-}" == 1 ]]; then
        say "demo-cluster: up failed (exit $rc); DEMO_KEEP=1: leaving $D as it is (then: $SELF down)" >&2
        exit "$rc"
    fi
    say "demo-cluster: up failed (exit $rc); stopping what was started (DEMO_KEEP=1 keeps it)" >&2
    do_down quiet || true
    exit "$rc"
}

print_guide() {
    local auth="" a1 a2 a3 p1 p2 p3
    [[ -n "$TOKEN_FILE" ]] && auth=" -H \"Authorization: Bearer \$(cat $TOKEN_FILE)\""
    a1="http://127.0.0.1:$(api_port 1)" a2="http://127.0.0.1:$(api_port 2)" a3="http://127.0.0.1:$(api_port 3)"
    p1="http://127.0.0.1:$(app_port 1)" p2="http://127.0.0.1:$(app_port 2)" p3="http://127.0.0.1:$(app_port 3)"
    cat <<EOF

The demo cluster is up; its state, logs and pid files are in $D.

Open:
  http://127.0.0.1:$HTTP_PORT/                the site through HAProxy (round robin; the footer names the server)
  http://127.0.0.1:$HTTP_PORT/page/about      another page
  http://127.0.0.1:$STATS_PORT/                HAProxy's view of the three apps (health check: GET /readyz)

  web1: app $p1/   tandem $a1   cache directory $D/web1/data/cache
  web2: app $p2/   tandem $a2   cache directory $D/web2/data/cache
  web3: app $p3/   tandem $a3   cache directory $D/web3/data/cache
  logs: $D/web*/tandem.log  $D/web*/app.log  $D/haproxy.log  $D/pg/server.log

Three requests, three servers:
  for i in 1 2 3; do curl -s -D - http://127.0.0.1:$HTTP_PORT/ | grep -iE '^x-served-by|<h1>'; done

Watch a change propagate:
  # in one terminal: tandem's event stream on web3, and what the apps log
  curl -N '$a3/v1/events?cache=pages'
  tail -f $D/web*/app.log
  # change the page through web2's app (it writes through web2's tandem, ?wait=cluster)
  curl -X POST --data-urlencode 'body=<h1>Hello from web2</h1>' $p2/page/home
  # every server has it, as a file and through HAProxy
  cat $D/web1/data/cache/pages/home; echo
  for i in 1 2 3; do curl -s -D - http://127.0.0.1:$HTTP_PORT/ | grep -iE '^x-served-by|<h1>'; done
  # the events each app received
  curl -s $p1/events-seen
  # or write to tandem directly
  curl$auth -X PUT -H 'Content-Type: text/html' --data-binary '<h1>Direct</h1>' '$a1/v1/cache/pages/home?wait=cluster'

Fail the leader over (leader.lease = $LEASE):
  # who leads?
  curl -s $a1/v1/role; echo
  TANDEM_API_LISTEN=127.0.0.1:$(api_port 1) $BIN status --config /dev/null
  # crash it (N = its number), and watch another host take over within about $LEASE
  kill -9 \$(cat $D/webN/tandem.pid)
  watch -n 0.5 "$SELF status"
  # the site stays up meanwhile; then start the host again
  $SELF start webN

  $SELF check    # all of the above, automated (what CI runs)
  $SELF down     # stop everything and remove $D
EOF
}

# ---------------------------------------------------------------- status / start

any_running() {
    local f
    for f in "$D"/*/tandem.pid "$D"/*/app.pid "$D/haproxy.pid"; do
        [[ -f "$f" ]] && alive "$(pid_of "$f")" && return 0
    done
    [[ -f "$D/pg/data/postmaster.pid" ]] && alive "$(head -1 "$D/pg/data/postmaster.pid" 2>/dev/null)" && return 0
    return 1
}

cmd_status() {
    load_state
    local h n pid
    for h in "${HOSTS[@]}"; do
        n="$(host_num "$h")"
        pid="$(pid_of "$D/$h/tandem.pid")"
        if alive "$pid"; then
            printf '%s: tandem pid %s, readyz %s, role %s\n' "$h" "$pid" \
                "$(http_status "http://127.0.0.1:$(api_port "$n")/readyz")" \
                "$(curl -s --max-time 2 "http://127.0.0.1:$(api_port "$n")/v1/role" || echo '?')"
        else
            printf '%s: tandem not running\n' "$h"
        fi
        pid="$(pid_of "$D/$h/app.pid")"
        printf '%s: app %s\n' "$h" "$(alive "$pid" && echo "pid $pid" || echo "not running")"
    done
    printf 'HAProxy: %s\n' "$(haproxy_states | tr '\n' ' ')"
}

cmd_start() {
    local h="${1:-}"
    [[ " ${HOSTS[*]} " == *" $h "* ]] || die "usage: $SELF start web1|web2|web3"
    load_state
    if alive "$(pid_of "$D/$h/tandem.pid")"; then
        say "tandem $h is already running"
    else
        start_host "$h"
        wait_ready "$h"
        say "tandem $h started (pid $(pid_of "$D/$h/tandem.pid")) and ready"
    fi
    if ! alive "$(pid_of "$D/$h/app.pid")"; then
        start_app "$h"
        wait_app "$h"
        say "app $h started"
    fi
}

# ---------------------------------------------------------------- check

IN_FAIL=0

fail() {
    IN_FAIL=1
    trap - EXIT
    say "FAIL: $*"
    local h
    for h in "${HOSTS[@]}"; do
        say "--- $D/$h/tandem.log (tail)"
        tail -15 "$D/$h/tandem.log" 2>/dev/null || true
        say "--- $D/$h/app.log (tail)"
        tail -15 "$D/$h/app.log" 2>/dev/null || true
    done
    say "--- $D/haproxy.log (tail)"
    tail -10 "$D/haproxy.log" 2>/dev/null || true
    say "--- HAProxy: $(haproxy_states | tr '\n' ' ')"
    exit 1
}

pass() { say "PASS: $*"; }

# events_total of an app's /events-seen (0 when it does not answer)
events_total() {
    local t
    t="$(curl -s --max-time 3 "http://127.0.0.1:$(app_port "$1")/events-seen" | json_get events_total || true)"
    echo "${t:-0}"
}

# Does app N's /events-seen hold a change event put pages/$3 (default home)
# numbered after $2?
saw_change() {
    curl -s --max-time 3 "http://127.0.0.1:$(app_port "$1")/events-seen" | "$PYTHON" -c '
import json, sys
after = int(sys.argv[1])
try:
    d = json.load(sys.stdin)
except Exception:
    sys.exit(1)
for e in d.get("events", []):
    data = e.get("data") if isinstance(e.get("data"), dict) else {}
    if (e.get("n", 0) > after and e.get("event") == "change" and data.get("cache") == "pages"
            and data.get("key") == sys.argv[2] and data.get("op") == "put"):
        print(e.get("id"))
        sys.exit(0)
sys.exit(1)' "$2" "${3:-home}"
}

# Did app N receive a resync event numbered after $2?
saw_resync() {
    curl -s --max-time 3 "http://127.0.0.1:$(app_port "$1")/events-seen" | "$PYTHON" -c '
import json, sys
d = json.load(sys.stdin)
sys.exit(0 if any(e.get("n", 0) > int(sys.argv[1]) and e.get("event") == "resync"
                  for e in d.get("events", [])) else 1)' "$2"
}

# Writes page $2 through app N's POST /page/$2.
write_page() {
    local code
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 15 -X POST \
        --data-urlencode "body=<h1>$2</h1>" "http://127.0.0.1:$(app_port "$1")/page/$2" || true)"
    [[ "$code" == 200 ]] || fail "POST /page/$2 to web$1's app answered $code"
}

# Reads / through HAProxy $1 times; every answer must be 200 with $2 in it.
# Sets SEEN to the X-Served-By values, space separated, sorted.
read_through_haproxy() {
    local count="$1" want="$2" min_all="${3:-0}" i code by tmp
    tmp="$(mktemp)"
    local -A seen=()
    for ((i = 1; i <= count; i++)); do
        code="$(curl -s -o "$tmp.body" -D "$tmp.hdr" -w '%{http_code}' --max-time 5 "http://127.0.0.1:$HTTP_PORT/" || true)"
        by="$(tr -d '\r' <"$tmp.hdr" 2>/dev/null | awk -F': ' 'tolower($1) == "x-served-by" { print $2 }')"
        if [[ "$code" != 200 ]]; then
            rm -f "$tmp" "$tmp.body" "$tmp.hdr"
            fail "read $i through HAProxy answered $code (served by ${by:-?})"
        fi
        if ! grep -qF "$want" "$tmp.body"; then
            say "   read $i from ${by:-?}: $(grep -o '<h1>[^<]*</h1>' "$tmp.body" | head -1)"
            rm -f "$tmp" "$tmp.body" "$tmp.hdr"
            fail "read $i through HAProxy (served by ${by:-?}) does not have the new content"
        fi
        seen[${by:-?}]=1
        # at least $min_all reads, and go on (up to $count) until all three were seen
        if ((min_all > 0 && i >= min_all && ${#seen[@]} >= ${#HOSTS[@]})); then
            break
        fi
    done
    rm -f "$tmp" "$tmp.body" "$tmp.hdr"
    READS="$i"
    ((READS > count)) && READS="$count"
    SEEN="$(printf '%s\n' "${!seen[@]}" | sort | tr '\n' ' ')"
    SEEN="${SEEN% }"
}

cmd_check() {
    load_state
    # a command failing unexpectedly is a failure too, with the logs
    trap 'rc=$?; ((rc == 0 || IN_FAIL)) || fail "unexpected error (exit status $rc)"' EXIT
    local h n pid
    for h in "${HOSTS[@]}"; do
        alive "$(pid_of "$D/$h/tandem.pid")" || fail "tandem $h is not running (run: $SELF start $h)"
        alive "$(pid_of "$D/$h/app.pid")" || fail "app $h is not running (run: $SELF start $h)"
    done
    alive "$(pid_of "$D/haproxy.pid")" || fail "HAProxy is not running"
    wait_haproxy_all_up 20 || fail "HAProxy does not see all three apps up"
    local skip_events="${DEMO_SKIP_EVENTS:-0}"
    local -A before=()
    if [[ "$skip_events" != 1 ]]; then
        for n in 1 2 3; do before[$n]="$(events_total "$n")"; done
    fi

    # 1. a change through web2's app
    local content="Changed by check $(date -u +%Y-%m-%dT%H:%M:%S.%NZ) #$RANDOM"
    local answer code
    answer="$(mktemp)"
    code="$(curl -s -o "$answer" -w '%{http_code}' --max-time 15 -X POST \
        --data-urlencode "body=<h1>$content</h1><p>Written through web2's app.</p>" \
        "http://127.0.0.1:$(app_port 2)/page/home" || true)"
    local body
    body="$(tr -d '\n' <"$answer")"
    rm -f "$answer"
    [[ "$code" == 200 ]] || fail "POST /page/home to web2's app answered $code: $body"
    [[ "$(json_get tandem.applied <<<"$body")" == True ]] || fail "the write was not applied on every host: $body"
    pass "changed page home through web2's app (wait=cluster: $(json_get tandem.token <<<"$body" | sed 's/^/token /'), applied on every live host)"

    # 2. every server serves it
    SEEN=""
    read_through_haproxy 12 "$content" 6
    ((READS >= 6)) || fail "only $READS reads"
    [[ "$SEEN" == "web1 web2 web3" ]] || fail "after $READS reads through HAProxy only these servers answered: $SEEN"
    pass "$READS reads through HAProxy all have the new content; served by $SEEN"

    # 3. every app got the change event
    if [[ "$skip_events" == 1 ]]; then
        say "SKIP: event stream assertions (DEMO_SKIP_EVENTS=1)"
    else
        local i id
        for n in 1 2 3; do
            id=""
            for ((i = 0; i < 50; i++)); do
                if id="$(saw_change "$n" "${before[$n]}")"; then break; fi
                id=""
                sleep 0.2
            done
            if [[ -z "$id" ]]; then
                local seen_json
                seen_json="$(curl -s --max-time 3 "http://127.0.0.1:$(app_port "$n")/events-seen" | head -c 800 || true)"
                [[ "$seen_json" == *'"last_error": "HTTP 404'* ]] &&
                    say "   (this tandem has no event stream, GET /v1/events answers 404: DEMO_SKIP_EVENTS=1 skips this check)"
                fail "web$n's app did not receive the change event of pages/home within 10s (its /events-seen: $seen_json)"
            fi
            pass "web$n's app received the change event (id $id)"
        done

        # 3b. resume: web1's app leaves the stream after the next event and
        # comes back 3 s later with Last-Event-ID; a change made meanwhile
        # reaches it from tandem's window, without a resync.
        local mark connects_before
        mark="$(events_total 1)"
        connects_before="$(curl -s --max-time 3 "http://127.0.0.1:$(app_port 1)/events-seen" | json_get connects)"
        curl -s -o /dev/null --max-time 5 -X POST "http://127.0.0.1:$(app_port 1)/events/reconnect?pause=3" ||
            fail "POST /events/reconnect to web1's app failed"
        write_page 2 resume-a
        for ((i = 0; i < 50; i++)); do saw_change 1 "$mark" resume-a >/dev/null && break; sleep 0.2; done
        sleep 0.5
        write_page 2 resume-b
        id=""
        for ((i = 0; i < 75; i++)); do
            if id="$(saw_change 1 "$mark" resume-b)"; then break; fi
            id=""
            sleep 0.2
        done
        [[ -n "$id" ]] || fail "web1's app did not get the change made while it was away, after resuming"
        local connects_after
        connects_after="$(curl -s --max-time 3 "http://127.0.0.1:$(app_port 1)/events-seen" | json_get connects)"
        ((connects_after > connects_before)) || fail "web1's app did not reconnect ($connects_before -> $connects_after)"
        ! saw_resync 1 "$mark" || fail "web1's app was told to resync although it resumed within the window"
        pass "web1's app left the stream, resumed with Last-Event-ID and got the change made meanwhile (id $id), no resync"
    fi

    # 4. the leader fails over
    local leader="" token="" role="" tries=0
    while [[ -z "$leader" ]] && ((tries++ < 60)); do
        for n in 1 2 3; do
            role="$(curl -s --max-time 2 "http://127.0.0.1:$(api_port "$n")/v1/role" || true)"
            leader="$(json_get leader <<<"$role")"
            token="$(json_get fencing_token <<<"$role")"
            [[ -n "$leader" ]] && break
        done
        [[ -n "$leader" ]] || sleep 0.5
    done
    [[ " ${HOSTS[*]} " == *" $leader "* ]] || fail "no host reports a leader (GET /v1/role: $role)"
    pid="$(pid_of "$D/$leader/tandem.pid")"
    alive "$pid" || fail "the leader $leader (pid $pid) is not running"
    say "   the leader is $leader (fencing token $token); killing it (SIGKILL, pid $pid)"
    local app_mark
    app_mark="$(events_total "$(host_num "$leader")")"
    kill -KILL "$pid"
    local t0
    t0="$(date +%s%N)"
    # the site stays up meanwhile: the apps read the cache files, even beside a dead tandem
    read_through_haproxy 6 "$content"
    pass "6 reads through HAProxy right after the kill all answered with the new content (served by $SEEN)"
    local new="" new_token="" elapsed
    while [[ -z "$new" ]]; do
        for h in "${HOSTS[@]}"; do
            [[ "$h" == "$leader" ]] && continue
            role="$(curl -s --max-time 2 "http://127.0.0.1:$(api_port "$(host_num "$h")")/v1/role" || true)"
            if [[ "$(json_get leader <<<"$role")" == "$h" && "$(json_get host <<<"$role")" == "$h" ]] &&
                [[ "$(json_get role <<<"$role")" =~ ^(leader|single)$ ]]; then
                new="$h"
                new_token="$(json_get fencing_token <<<"$role")"
                break
            fi
        done
        elapsed=$((($(date +%s%N) - t0) / 1000000))
        if [[ -z "$new" ]]; then
            ((elapsed < 30000)) || fail "no other host became leader within 30s of killing $leader (last /v1/role: $role)"
            sleep 0.25
        fi
    done
    pass "$new took over as leader $((elapsed / 1000)).$((elapsed % 1000 / 100))s after $leader was killed (fencing token $token -> $new_token, lease $LEASE)"

    # 5. the killed host comes back
    start_host "$leader"
    local t1
    t1="$(date +%s)"
    wait_ready "$leader" 60
    pass "$leader restarted and ready in $(($(date +%s) - t1))s"
    local got
    got="$(curl -s --max-time 5 "http://127.0.0.1:$(api_port "$(host_num "$leader")")/v1/cache/pages/home" || true)"
    [[ "$got" == *"$content"* ]] || fail "$leader's cache does not have the new page after its restart: $got"
    wait_haproxy_all_up 30 || fail "HAProxy does not see all three apps up again"
    pass "HAProxy sees all three apps up again; $leader serves the new page"
    if [[ "$skip_events" != 1 ]]; then
        # Its app reconnects with an id of the dead process: told to resync.
        local ln i
        ln="$(host_num "$leader")"
        for ((i = 0; i < 75; i++)); do saw_resync "$ln" "$app_mark" && break; sleep 0.2; done
        saw_resync "$ln" "$app_mark" || fail "$leader's app was not told to resync after its tandem restarted"
        write_page 1 after-restart
        for ((i = 0; i < 50; i++)); do saw_change "$ln" "$app_mark" after-restart >/dev/null && break; sleep 0.2; done
        saw_change "$ln" "$app_mark" after-restart >/dev/null || fail "$leader's app gets no events after the restart"
        pass "$leader's app was told to resync (its tandem restarted) and follows the new stream"
    fi
    say "PASS: all checks passed"
    trap - EXIT
}

# ---------------------------------------------------------------- down

do_down() {
    local quiet="${1:-}"
    if [[ ! -d "$D" ]]; then
        [[ -n "$quiet" ]] || say "nothing to stop ($D does not exist)"
        return 0
    fi
    [[ -f "$D/$MARKER" ]] || die "$D is not a demo directory (no $MARKER); not touching it"
    [[ -f "$D/demo.env" ]] && source "$D/demo.env"
    local h pid
    pid="$(pid_of "$D/haproxy.pid")"
    if alive "$pid"; then
        [[ -n "$quiet" ]] || say "stopping HAProxy (pid $pid)"
        stop_pid "$pid" 10 haproxy
    fi
    for h in "${HOSTS[@]}"; do
        pid="$(pid_of "$D/$h/app.pid")"
        if alive "$pid"; then
            [[ -n "$quiet" ]] || say "stopping app $h (pid $pid)"
            stop_pid "$pid" 10 "app $h"
        fi
    done
    # the tandem hosts: SIGTERM to all (a clean stop hands the lease over), then wait
    local pids=()
    for h in "${HOSTS[@]}"; do
        pid="$(pid_of "$D/$h/tandem.pid")"
        if alive "$pid"; then
            [[ -n "$quiet" ]] || say "stopping tandem $h (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for pid in "${pids[@]}"; do
        wait_gone "$pid" 30 tandem
    done
    if [[ -f "$D/pg/data/postmaster.pid" ]]; then
        pid="$(head -1 "$D/pg/data/postmaster.pid" 2>/dev/null || true)"
        if alive "$pid"; then
            [[ -n "$quiet" ]] || say "stopping PostgreSQL (pid $pid)"
            PG_BIN="${PG_BIN:-$(pg_bin_dir)}"
            (cd "$D/pg" && as_pg "$PG_BIN/pg_ctl" stop -D "$D/pg/data" -m fast -w -t 30 >/dev/null 2>&1) ||
                stop_pid "$pid" 10 postgres
        fi
    fi
    # anything of ours left (a process whose pid file was lost): by its command line
    # (only the demo's own programs: not, say, a `tail -f` of one of its logs)
    local left=() exe
    for pid in $(pgrep -f -- "$D/" || true); do
        exe="$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null || true)")"
        [[ "$exe" =~ ^(tandem|postgres|haproxy|python.*)$ ]] && left+=("$pid")
    done
    if ((${#left[@]})); then
        say "killing leftover processes: ${left[*]}"
        kill -KILL "${left[@]}" 2>/dev/null || true
        sleep 0.3
    fi
    rm -rf "$D"
    [[ -n "$quiet" ]] || say "demo cluster stopped; $D removed"
}

cmd_down() { do_down ""; }

# ---------------------------------------------------------------- main

case "${1:-}" in
up) cmd_up ;;
check) cmd_check ;;
down) cmd_down ;;
status) cmd_status ;;
start) cmd_start "${2:-}" ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
    ;;
esac
