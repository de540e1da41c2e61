#!/usr/bin/env bash
# Soak run: a release Halyard on loopback with its default limits (STARTTLS required), and
# `halyard-bench soak` against it for $DURATION: chat pairs, connection churn, presence storms and
# archive queries at steady rates, a row every $INTERVAL (server RSS, open descriptors, CPU,
# latency, errors) and a verdict on whether they stayed flat. See docs/soak.md.
#
#   bench/soak.sh                       30 minutes with the default load
#   DURATION=5m bench/soak.sh           a short trial
#   EXTRA='--rate 1000 --churn-rate 10' bench/soak.sh   more halyard-bench soak arguments
#
# Environment: DURATION (30m; 90s, 5m, 1h or seconds), INTERVAL (30s), WARMUP (20 % of DURATION),
# PORT (18222), SOURCES (16 loopback source addresses 127.0.0.2…), PAIRS (50), PRESENCE (100),
# CHURN_ACCOUNTS (1000), RUN_ROOT (/tmp/halyard-soak), RESULTS_DIR (bench/results),
# HALYARD_BIN / BENCH_BIN (target/release of this checkout), EXTRA, LABEL, EXTRA_CONFIG (TOML
# appended to the server's config, for diagnosis only: the soak itself runs the defaults).
#
# Writes $RESULTS_DIR/soak-<UTC date and time>.jsonl (a params line, one line per row, the
# verdict) and .md (the table and the verdict), and keeps the server's log in $RUN_ROOT. The
# server is this script's own child and is stopped by its pid, also on Ctrl-C.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO="$(cd "$HERE/.." && pwd -P)"
DURATION="${DURATION:-30m}"
INTERVAL="${INTERVAL:-30s}"
PORT="${PORT:-18222}"
SOURCES="${SOURCES:-16}"
PAIRS="${PAIRS:-50}"
PRESENCE="${PRESENCE:-100}"
CHURN_ACCOUNTS="${CHURN_ACCOUNTS:-1000}"
RUN_ROOT="${RUN_ROOT:-/tmp/halyard-soak}"
RESULTS_DIR="${RESULTS_DIR:-$HERE/results}"
HALYARD_BIN="${HALYARD_BIN:-$REPO/target/release/halyard}"
BENCH_BIN="${BENCH_BIN:-$REPO/target/release/halyard-bench}"
STAMP="$(date -u +%Y-%m-%dT%H%MZ)"
JSONL="$RESULTS_DIR/soak-$STAMP.jsonl"
MD="$RESULTS_DIR/soak-$STAMP.md"

log() { echo "[soak $(date -u +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

secs() { # 30m / 90s / 1h / 600 -> seconds
    case $1 in
        *h) echo $(( ${1%h} * 3600 )) ;;
        *m) echo $(( ${1%m} * 60 )) ;;
        *s) echo "${1%s}" ;;
        *) echo "$1" ;;
    esac
}
DURATION_S=$(secs "$DURATION")
INTERVAL_S=$(secs "$INTERVAL")
WARMUP_S=$(secs "${WARMUP:-$(( DURATION_S / 5 ))}")

[ -x "$HALYARD_BIN" ] || die "no $HALYARD_BIN (nice -n 10 cargo build --release -j 1 -p halyard -p halyard-bench)"
[ -x "$BENCH_BIN" ] || die "no $BENCH_BIN (nice -n 10 cargo build --release -j 1 -p halyard -p halyard-bench)"

wait_port() { # port timeout_s
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

SERVER_PID=""
stop_server() {
    local pid=$SERVER_PID i
    [ -n "$pid" ] || return 0
    SERVER_PID=""
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "halyard (pid $pid) ignored SIGTERM for 20 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}
trap stop_server EXIT
trap 'exit 130' INT TERM

if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "port $PORT is in use (PORT=… to choose another)"
fi

# Descriptors: the server holds one per session plus its store; the tool as many.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# A fresh data directory with the accounts: chat pairs, presence, churn (password "pw").
ACCOUNTS=$(( 2 * PAIRS + PRESENCE + CHURN_ACCOUNTS ))
RUN="$RUN_ROOT/run"
rm -rf "$RUN"; mkdir -p "$RUN/data" "$RESULTS_DIR"; chmod 700 "$RUN/data"
log "creating $ACCOUNTS accounts in $RUN/data"
nice -n 5 "$BENCH_BIN" users --count "$ACCOUNTS" --data-dir "$RUN/data" >&2

# Defaults everywhere except the loopback listener and the paths: require_tls stays true (a
# self-signed certificate is generated), archiving on, every limit at its default.
cat > "$RUN/halyard.toml" <<EOF
domains = ["localhost"]
data_dir = "$RUN/data"
certs_dir = "$RUN/certs"
log = "warn"

[listeners]
c2s = ["127.0.0.1:$PORT"]
c2s_tls = []
http = []
https = []
EOF
if [ -n "${EXTRA_CONFIG:-}" ]; then
    log "appending EXTRA_CONFIG to the config: not a default-limits run"
    printf '\n%s\n' "$EXTRA_CONFIG" >> "$RUN/halyard.toml"
fi

( cd "$RUN"; exec "$HALYARD_BIN" --config "$RUN/halyard.toml" > "$RUN/halyard.log" 2>&1 ) &
SERVER_PID=$!
if ! wait_port "$PORT" 60; then
    tail -20 "$RUN/halyard.log" >&2 || true
    die "halyard did not listen on $PORT"
fi
[ "$(cat "/proc/$SERVER_PID/comm" 2>/dev/null)" = halyard ] \
    || log "warning: pid $SERVER_PID is '$(cat "/proc/$SERVER_PID/comm" 2>/dev/null)', not halyard"
VERSION="$("$HALYARD_BIN" --version 2>/dev/null | awk '{print $NF}')"
COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
LABEL="${LABEL:-halyard $VERSION ($COMMIT) starttls, default limits}"
log "halyard $VERSION ($COMMIT) pid $SERVER_PID on 127.0.0.1:$PORT; soak for ${DURATION_S} s, rows every ${INTERVAL_S} s"

# The server's warnings and errors, without the two every start of this config logs (the
# generated self-signed certificate, upload without an HTTP listener).
server_warnings() {
    grep -E 'WARN|ERROR' "$RUN/halyard.log" | grep -v -e 'SELF-SIGNED' -e 'upload slots are refused' || true
}

status=0
# shellcheck disable=SC2086
"$BENCH_BIN" soak --port "$PORT" --domain localhost --tls --pid "$SERVER_PID" \
    --sources "$SOURCES" --pairs "$PAIRS" --presence-sessions "$PRESENCE" \
    --churn-accounts "$CHURN_ACCOUNTS" \
    --duration "$DURATION_S" --warmup "$WARMUP_S" --interval "$INTERVAL_S" \
    --label "$LABEL" \
    --json "$JSONL" --markdown "$RUN/table.md" ${EXTRA:-} 2>&1 | tee "$RUN/soak.out" || status=$?

alive=yes; kill -0 "$SERVER_PID" 2>/dev/null || alive="NO (it died during the run)"
stop_server

if [ -s "$RUN/table.md" ]; then
    {
        echo "# Soak run $STAMP"
        echo
        echo "$LABEL; \`bench/soak.sh\` with DURATION=$DURATION INTERVAL=$INTERVAL WARMUP=${WARMUP_S}s" \
             "PAIRS=$PAIRS PRESENCE=$PRESENCE CHURN_ACCOUNTS=$CHURN_ACCOUNTS SOURCES=$SOURCES EXTRA='${EXTRA:-}'" \
             "EXTRA_CONFIG='$(printf '%s' "${EXTRA_CONFIG:-}" | tr '\n' ' ')';" \
             "$(nproc) cores, load average at the end $(cut -d' ' -f1-3 /proc/loadavg). Server alive at the end: $alive."
        echo
        grep -E '^  (chat|presence|churn|archive):' "$RUN/soak.out" | sed 's/^  /- /' || true
        echo
        cat "$RUN/table.md"
        echo
        echo "Server warnings/errors logged after startup: $(server_warnings | wc -l)"
    } > "$MD"
    log "rows: $JSONL; table: $MD"
fi
if [ -n "$(server_warnings)" ]; then
    log "server log ($RUN/halyard.log), last warnings:"
    server_warnings | tail -5 >&2
fi
exit "$status"
