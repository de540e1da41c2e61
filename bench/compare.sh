#!/usr/bin/env bash
# Side-by-side load runs: Halyard, Prosody 0.12 and ejabberd 23.01 on this machine, same load tool
# (halyard-bench), same accounts, equivalent settings (issue 6).
#
#   bench/compare.sh setup                       install missing peers, certificates, accounts
#   bench/compare.sh run <scenario> [server...]  run a scenario REPEAT times per server (default:
#                                                halyard prosody ejabberd), a fresh server process
#                                                on a fresh copy of the prepared data each time
#   bench/compare.sh table FILE...               markdown table: medians per (scenario, server),
#                                                ratios to Halyard
#   bench/compare.sh list                        the scenarios
#   bench/compare.sh stop                        stop servers this script left running
#
# Scenarios: idle-plain-5k idle-plain-19k idle-tls-5k login-5k chat-100 chat-1000 latency-500,
# with suffixes: -mam (archive on; chat/latency), -tls / -plain (transport). Idle and login runs are
# plain unless named -tls (idle-tls-5k) or TLS=1; chat and latency runs are STARTTLS unless -plain
# or TLS=0.
#
# Environment: REPEAT (3), RESULTS (bench/results/<UTC date>.jsonl), RUN_ROOT
# (/tmp/halyard-compare), ACCOUNTS (20000), HALYARD_BIN, BENCH_BIN (target/release of this
# checkout, else /work/main's), TLS (0/1 overrides the default transport), EXTRA (more
# halyard-bench arguments), ARGS_OVERRIDE (replaces the scenario's load arguments), SETTLE_SECS (pause between runs, 2).
#
# Everything listens on 127.0.0.1 only: Halyard 17222, Prosody 27222, ejabberd 37222 (epmd on
# 127.0.0.1:4369, node hcmp@localhost). Domain "localhost" everywhere; accounts u0..u<ACCOUNTS-1>,
# password "pw", SCRAM credentials with 4096 PBKDF2 iterations (Halyard SCRAM-SHA-256/-1,
# Prosody internal_hashed = SCRAM-SHA-1, ejabberd scram with sha256).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO="$(cd "$HERE/.." && pwd -P)"
PEERS="$HERE/peers"
RUN_ROOT="${RUN_ROOT:-/tmp/halyard-compare}"
REPEAT="${REPEAT:-3}"
ACCOUNTS="${ACCOUNTS:-20000}"
SETTLE_SECS="${SETTLE_SECS:-2}"
RESULTS="${RESULTS:-$HERE/results/$(date -u +%F).jsonl}"
ITERATIONS=4096

pick_bin() { # name
    if [ -x "$REPO/target/release/$1" ]; then echo "$REPO/target/release/$1"
    else echo "/work/main/target/release/$1"; fi
}
HALYARD_BIN="${HALYARD_BIN:-$(pick_bin halyard)}"
BENCH_BIN="${BENCH_BIN:-$(pick_bin halyard-bench)}"

HALYARD_PORT=17222
PROSODY_PORT=27222
EJABBERD_PORT=37222
EJ_NODE=hcmp@localhost
EJ_COOKIE=halyardcompare
SCRAM_CACHE="$RUN_ROOT/scram.cache"

log() { echo "[compare $(date -u +%T)] $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- process helpers ------------------------------------------------------------------------

wait_port() { # port timeout_s
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

stop_pid() { # pid [grace_s]
    local pid=$1 grace=${2:-15} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for ${grace}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
}

port_free() { # port: free now or within 30 s (a previous server still shutting down)
    local i
    for ((i = 0; i < 300; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

# The Debian packages start system instances on the standard ports: stop them (systemctl when it
# works, else their processes, matched by the system config/node name, never ours).
stop_system_instances() {
    if command -v systemctl >/dev/null 2>&1; then
        systemctl stop prosody ejabberd >/dev/null 2>&1 || true
        systemctl disable prosody ejabberd >/dev/null 2>&1 || true
    fi
    local pid
    for pid in $(pgrep -f 'prosody' || true); do
        [ "$pid" = "$$" ] && continue
        if ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$RUN_ROOT"; then
            if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qE '(lua[0-9.]* )?/usr/bin/prosody( |$)'; then
                log "stopping system prosody (pid $pid)"; stop_pid "$pid" 5
            fi
        fi
    done
    for pid in $(pgrep -f 'beam.smp.*ejabberd@' || true); do
        log "stopping system ejabberd (pid $pid)"; stop_pid "$pid" 10
    done
}

# --- certificates ---------------------------------------------------------------------------

make_certs() {
    local d="$RUN_ROOT/certs"
    [ -s "$d/localhost.pem" ] && return 0
    mkdir -p "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -keyout "$d/localhost.key" -out "$d/localhost.crt" 2>/dev/null
    cat "$d/localhost.crt" "$d/localhost.key" > "$d/localhost.pem"
    chmod 600 "$d/localhost.key" "$d/localhost.pem"
}

# --- configs --------------------------------------------------------------------------------

render() { # template out run port require_tls(true/false) mam(true/false)
    local mam_mod="" mam_block=""
    if [ "$6" = true ]; then
        mam_mod='"mam";'
        mam_block=$'  mod_mam:\n    db_type: mnesia\n    default: always'
    fi
    python3 - "$1" "$2" "$3" "$4" "$5" "$6" "$mam_mod" "$mam_block" <<'EOF'
import sys
src, out, run, port, tls, mam, mam_mod, mam_block = sys.argv[1:]
s = open(src).read()
for k, v in {"@RUN@": run, "@PORT@": port, "@REQUIRE_TLS@": tls, "@MAM@": mam,
             "@MAM_MODULE@": mam_mod, "@MAM_BLOCK@": mam_block}.items():
    s = s.replace(k, v)
open(out, "w").write(s)
EOF
}

# --- ejabberd as a plain Erlang node (ejabberdctl would su to the ejabberd user) -------------

ej_env() { # run
    export ERL_LIBS=/usr/lib/x86_64-linux-gnu
    export EJABBERD_CONFIG_PATH="$1/ejabberd.yml"
    export EJABBERD_LOG_PATH="$1/log/ejabberd.log"
    export EJABBERD_PID_PATH="$1/ejabberd.pid"
    export ERL_CRASH_DUMP="$1/log/erl_crash.dump"
    export ERL_EPMD_ADDRESS=127.0.0.1
    export CONTRIB_MODULES_PATH="$1/contrib"
    export CONTRIB_MODULES_CONF_DIR="$1/contrib/conf"
    # ports (sockets) up to the fd limit, plenty of processes (ejabberdctl's defaults otherwise)
    export ERL_MAX_PORTS="$(ulimit -n)"
    export ERL_MAX_ETS_TABLES=1400
}

EJ_PID=""
ej_start_bg() { # run  -> sets EJ_PID (erl execs erlexec, which execs beam.smp: same pid)
    local run=$1
    mkdir -p "$run/log" "$run/db"
    ( ej_env "$run"; cd "$run"
      exec erl -sname "$EJ_NODE" -setcookie "$EJ_COOKIE" +K true +P 250000 \
          -env ERL_CRASH_DUMP_BYTES 0 -noinput \
          -mnesia dir "\"$run/db\"" -ejabberd log_rotate_count 0 -s ejabberd \
          > "$run/log/stdout" 2>&1 ) &
    EJ_PID=$!
}

ej_rpc_eval() { # erlang expression using N (the node); prints its result
    ERL_EPMD_ADDRESS=127.0.0.1 erl -sname "ctl$$@localhost" -setcookie "$EJ_COOKIE" -noinput -eval "
        N = '$EJ_NODE', $1, halt()."
}

# --- accounts -------------------------------------------------------------------------------

# Prosody internal_hashed (0.12): <data>/localhost/accounts/uN.dat, SCRAM-SHA-1 keys in hex, a
# UUID-like salt string, as prosodyctl writes them. ejabberd: an Erlang term file of
# {User, StoredKey, ServerKey, Salt} (base64, SHA-256) loaded into mnesia's passwd table.
gen_peer_accounts() { # kind out count
    python3 - "$@" <<'EOF'
import sys, os, hashlib, hmac, base64, uuid
from multiprocessing import Pool
kind, out, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
IT = 4096
def keys(i):
    if kind == "prosody":
        salt = str(uuid.uuid4())
        s = hashlib.pbkdf2_hmac("sha1", b"pw", salt.encode(), IT)
        ck = hmac.new(s, b"Client Key", "sha1").digest()
        return (i, salt, hashlib.sha1(ck).hexdigest(), hmac.new(s, b"Server Key", "sha1").hexdigest())
    salt = os.urandom(16)
    s = hashlib.pbkdf2_hmac("sha256", b"pw", salt, IT)
    ck = hmac.new(s, b"Client Key", "sha256").digest()
    b = lambda x: base64.b64encode(x).decode()
    return (i, b(salt), b(hashlib.sha256(ck).digest()), b(hmac.new(s, b"Server Key", "sha256").digest()))
with Pool(os.cpu_count()) as p:
    rows = p.map(keys, range(count), chunksize=256)
if kind == "prosody":
    d = os.path.join(out, "localhost", "accounts")
    os.makedirs(d, exist_ok=True)
    for i, salt, stored, server in rows:
        with open(os.path.join(d, f"u{i}.dat"), "w") as f:
            f.write('return {\n\t["server_key"] = "%s";\n\t["salt"] = "%s";\n'
                    '\t["iteration_count"] = %d;\n\t["stored_key"] = "%s";\n};\n' % (server, salt, IT, stored))
else:
    with open(out, "w") as f:
        for i, salt, stored, server in rows:
            f.write('{passwd,{<<"u%d">>,<<"localhost">>},{scram,<<"%s">>,<<"%s">>,<<"%s">>,sha256,%d}}.\n'
                    % (i, stored, server, salt, IT))
EOF
}

setup_halyard() {
    local p="$RUN_ROOT/halyard/pristine"
    if [ -f "$p/.accounts-$ACCOUNTS" ]; then log "halyard: accounts ready"; return; fi
    rm -rf "$p"; mkdir -p "$p/data"
    local t0=$SECONDS
    "$BENCH_BIN" users --count "$ACCOUNTS" --data-dir "$p/data" --iterations $ITERATIONS
    touch "$p/.accounts-$ACCOUNTS"
    log "halyard: $ACCOUNTS accounts in $((SECONDS - t0)) s"
}

setup_prosody() {
    local p="$RUN_ROOT/prosody/pristine"
    if [ -f "$p/.accounts-$ACCOUNTS" ]; then log "prosody: accounts ready"; return; fi
    rm -rf "$p"; mkdir -p "$p/data"
    local t0=$SECONDS
    gen_peer_accounts prosody "$p/data" "$ACCOUNTS"
    touch "$p/.accounts-$ACCOUNTS"
    log "prosody: $ACCOUNTS accounts in $((SECONDS - t0)) s"
}

setup_ejabberd() {
    local p="$RUN_ROOT/ejabberd/pristine"
    if [ -f "$p/.accounts-$ACCOUNTS" ]; then log "ejabberd: accounts ready"; return; fi
    port_free $EJABBERD_PORT || die "port $EJABBERD_PORT busy"
    rm -rf "$p"; mkdir -p "$p/log" "$p/db"
    local t0=$SECONDS
    gen_peer_accounts ejabberd "$p/accounts.eterm" "$ACCOUNTS"
    log "ejabberd: keys computed in $((SECONDS - t0)) s; loading them into mnesia"
    render "$PEERS/ejabberd.yml.in" "$p/ejabberd.yml" "$p" $EJABBERD_PORT false false
    sed -i "s|$p/certs/localhost.pem|$RUN_ROOT/certs/localhost.pem|" "$p/ejabberd.yml"
    ej_start_bg "$p"; local pid=$EJ_PID
    wait_port $EJABBERD_PORT 60 || { tail -20 "$p/log/stdout"; die "ejabberd did not start"; }
    ej_rpc_eval "{ok, Recs} = file:consult(\"$p/accounts.eterm\"),
        ok = rpc:call(N, lists, foreach, [fun mnesia:dirty_write/1, Recs]),
        io:format(\"ejabberd users: ~p~n\", [rpc:call(N, ejabberd_auth, count_users, [<<\"localhost\">>])])"
    stop_pid "$pid" 30
    rm -f "$p/accounts.eterm"
    touch "$p/.accounts-$ACCOUNTS"
    log "ejabberd: $ACCOUNTS accounts in $((SECONDS - t0)) s"
}

cmd_setup() {
    if ! dpkg -s prosody >/dev/null 2>&1 || ! dpkg -s ejabberd >/dev/null 2>&1; then
        log "installing prosody and ejabberd"
        DEBIAN_FRONTEND=noninteractive apt-get install -y prosody ejabberd
    fi
    stop_system_instances
    [ -x "$HALYARD_BIN" ] || die "no $HALYARD_BIN (cargo build --release)"
    [ -x "$BENCH_BIN" ] || die "no $BENCH_BIN (cargo build --release -p halyard-bench)"
    mkdir -p "$RUN_ROOT"
    make_certs
    setup_halyard
    setup_prosody
    setup_ejabberd
    log "versions: $(server_version halyard) / prosody $(server_version prosody) / ejabberd $(server_version ejabberd)"
}

server_version() {
    case $1 in
        halyard) "$HALYARD_BIN" --version 2>/dev/null | awk '{print $NF}' ;;
        *) dpkg-query -W -f='${Version}' "$1" 2>/dev/null ;;
    esac
}

# --- one server process ---------------------------------------------------------------------

SERVER_PID=""
SERVER_PORT=""
start_server() { # server run tls(true/false) mam(true/false)
    local server=$1 run=$2 tls=$3 mam=$4 port
    rm -rf "$run"; mkdir -p "$run"
    case $server in
    halyard)
        port=$HALYARD_PORT
        port_free $port || die "port $port busy"
        cp -a "$RUN_ROOT/halyard/pristine/data" "$run/data"
        render "$PEERS/halyard.toml.in" "$run/halyard.toml" "$run" $port "$tls" "$mam"
        ( cd "$run"; exec "$HALYARD_BIN" --config "$run/halyard.toml" > "$run/halyard.log" 2>&1 ) &
        SERVER_PID=$!
        ;;
    prosody)
        port=$PROSODY_PORT
        port_free $port || die "port $port busy"
        # accounts are only read during runs (no password changes): link the 20,000 files
        # instead of copying them; every other store (roster, archive, ...) starts empty
        mkdir -p "$run/data/localhost"
        ln -s "$RUN_ROOT/prosody/pristine/data/localhost/accounts" "$run/data/localhost/accounts"
        mkdir -p "$run/certs"
        cp "$RUN_ROOT/certs/localhost.crt" "$RUN_ROOT/certs/localhost.key" "$run/certs/"
        render "$PEERS/prosody.cfg.lua.in" "$run/prosody.cfg.lua" "$run" $port "$tls" "$mam"
        ( cd "$run"; exec prosody --config "$run/prosody.cfg.lua" -F > "$run/stdout.log" 2>&1 ) &
        SERVER_PID=$!
        ;;
    ejabberd)
        port=$EJABBERD_PORT
        port_free $port || die "port $port busy"
        mkdir -p "$run/certs"
        cp -a "$RUN_ROOT/ejabberd/pristine/db" "$run/db"
        cp "$RUN_ROOT/certs/localhost.pem" "$run/certs/"
        render "$PEERS/ejabberd.yml.in" "$run/ejabberd.yml" "$run" $port "$tls" "$mam"
        ej_start_bg "$run"; SERVER_PID=$EJ_PID
        ;;
    *) die "unknown server $server" ;;
    esac
    if ! wait_port $port 90; then
        tail -20 "$run"/*.log "$run"/log/* 2>/dev/null || true
        stop_pid "$SERVER_PID" 5
        die "$server did not listen on $port"
    fi
    # the process that does the work: halyard, lua5.4 (prosody), beam.smp (ejabberd: erl execs it)
    local comm; comm=$(cat "/proc/$SERVER_PID/comm" 2>/dev/null || echo '?')
    case "$server:$comm" in
        halyard:halyard|prosody:lua*|ejabberd:beam.smp) ;;
        *) log "warning: $server pid $SERVER_PID is '$comm'" ;;
    esac
    SERVER_PORT=$port
}

# SYNs dropped because a listen queue was full (machine-wide: other processes count too); a
# dropped SYN is retried by the client after 1 s, which shows as ~1 s login latency
listen_overflows() {
    awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) n[i] = $i; h = 1 } else { for (i = 1; i <= NF; i++) if (n[i] == "ListenOverflows") print $i } }' /proc/net/netstat
}

# --- scenarios ---
# Saturation runs keep up to 8 messages in flight per direction; a server whose queueing delay
# exceeds the drain (3 s default) would show those as losses, so chat-1000 drains for 10 s.---------------------------------------------------------------------------

SCENARIOS="idle-plain-5k idle-plain-19k idle-tls-5k login-5k chat-100 chat-1000 latency-500 chat-100-mam chat-1000-mam latency-500-mam"

# sets: KIND (connect|chat) ARGS TLS_ON MAM_ON
parse_scenario() {
    local name=$1 base tlsdef=""
    MAM_ON=false; base=$name
    case $base in *-tls) tlsdef=true; base=${base%-tls} ;; *-plain) tlsdef=false; base=${base%-plain} ;; esac
    case $base in *-mam) MAM_ON=true; base=${base%-mam} ;; esac
    case $base in
        idle-plain-5k)  KIND=connect; ARGS="-n 5000 --hold 10 --settle 2"; TLS_ON=false ;;
        idle-plain-19k) KIND=connect; ARGS="-n 19000 --hold 10 --settle 3 --sources 8"; TLS_ON=false ;;
        idle-tls-5k)    KIND=connect; ARGS="-n 5000 --hold 10 --settle 2"; TLS_ON=true ;;
        idle-tls-19k)   KIND=connect; ARGS="-n 19000 --hold 10 --settle 3 --sources 8"; TLS_ON=true ;;
        login-5k)       KIND=connect; ARGS="-n 5000 --rate 0 --hold 2 --settle 1"; TLS_ON=false ;;
        chat-100)       KIND=chat; ARGS="--pairs 100 --rate 0 --inflight 8 --warmup 3 --duration 15"; TLS_ON=true ;;
        chat-1000)      KIND=chat; ARGS="--pairs 1000 --rate 0 --inflight 8 --warmup 3 --duration 15 --drain 10"; TLS_ON=true ;;
        latency-500)    KIND=chat; ARGS="--pairs 500 --rate 2000 --warmup 5 --duration 20"; TLS_ON=true ;;
        *) die "unknown scenario '$name' (known: $SCENARIOS; suffixes -mam, -tls, -plain)" ;;
    esac
    if [ "$MAM_ON" = true ] && [ "$KIND" != chat ]; then die "-mam applies to chat/latency scenarios"; fi
    [ -n "${TLS:-}" ] && { [ "$TLS" = 1 ] && TLS_ON=true || TLS_ON=false; }
    [ -n "$tlsdef" ] && TLS_ON=$tlsdef
    [ -n "${ARGS_OVERRIDE:-}" ] && ARGS=$ARGS_OVERRIDE   # smoke tests: replace the load arguments
    return 0
}

canonical_name() { # scenario -> name with explicit transport, e.g. chat-100-mam-tls
    local base=$1
    case $base in *-tls|*-plain) base=${base%-*} ;; esac
    case $base in
        idle-plain-*|idle-tls-*) if [ "$TLS_ON" = true ]; then echo "${base/plain/tls}"; else echo "${base/tls/plain}"; fi ;;
        *) if [ "$TLS_ON" = true ]; then echo "$base-tls"; else echo "$base-plain"; fi ;;
    esac
}

run_one() { # scenario server rep
    local scenario=$1 server=$2 rep=$3 run="$RUN_ROOT/$2/run" port tmp status=0
    local name; name=$(canonical_name "$scenario")
    start_server "$server" "$run" "$TLS_ON" "$MAM_ON"
    local pid=$SERVER_PID; port=$SERVER_PORT
    tmp=$(mktemp "$RUN_ROOT/run.XXXXXX.jsonl")
    local tlsflag=""; [ "$TLS_ON" = true ] && tlsflag="--tls"
    local label="$server $( [ "$TLS_ON" = true ] && echo starttls || echo plain)$( [ "$MAM_ON" = true ] && echo ' mam')"
    local ovf0; ovf0=$(listen_overflows)
    log "$name on $server (pid $pid, port $port), run $rep/$REPEAT"
    # shellcheck disable=SC2086
    "$BENCH_BIN" "$KIND" --port "$port" --domain localhost --pid "$pid" $tlsflag \
        --scram-cache "$SCRAM_CACHE" --label "$label" --json "$tmp" $ARGS ${EXTRA:-} \
        2>&1 | tee "$run/bench.out" || status=$?
    local ovf=$(( $(listen_overflows) - ovf0 ))
    [ "$ovf" -gt 0 ] && log "note: $ovf listen-queue overflows (machine-wide TcpExt ListenOverflows) during the run"
    local alive=true; kill -0 "$pid" 2>/dev/null || alive=false
    stop_pid "$pid" 20
    [ "$server" = ejabberd ] && { ERL_EPMD_ADDRESS=127.0.0.1 epmd -kill >/dev/null 2>&1 || true; }
    if [ -s "$tmp" ]; then
        mkdir -p "$(dirname "$RESULTS")"
        python3 - "$tmp" "$RESULTS" "$name" "$server" "$(server_version "$server")" "$rep" "$alive" "$ovf" <<'EOF'
import json, sys, time
tmp, out, name, server, version, rep, alive, ovf = sys.argv[1:]
with open(tmp) as f, open(out, "a") as o:
    for line in f:
        line = line.strip()
        if not line:
            continue
        d = json.loads(line)
        d = {"compare": name, "server": server, "server_version": version, "rep": int(rep),
             "server_alive_after": alive == "true", "listen_overflows": int(ovf),
             "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **d}
        o.write(json.dumps(d) + "\n")
EOF
    else
        log "warning: no JSON from the load tool (exit $status)"
    fi
    rm -f "$tmp"
    if [ "$alive" != true ]; then
        log "warning: $server died during $name (logs kept in $RUN_ROOT/$server/died-$name-$rep)"
        mkdir -p "$RUN_ROOT/$server/died-$name-$rep"
        cp "$run"/*.log "$run"/*.out "$run"/log/* "$RUN_ROOT/$server/died-$name-$rep/" 2>/dev/null || true
    fi
    # warnings and errors the server logged during the run
    local lf
    for lf in "$run/halyard.log" "$run/prosody.log" "$run/log/error.log"; do
        [ -s "$lf" ] && { log "$server log ($lf), last lines:"; tail -3 "$lf" >&2; }
    done
    sleep "$SETTLE_SECS"
}

cmd_run() {
    [ $# -ge 1 ] || die "usage: compare.sh run <scenario> [server...]"
    local scenario=$1; shift
    local servers=("$@"); [ ${#servers[@]} -gt 0 ] || servers=(halyard prosody ejabberd)
    parse_scenario "$scenario"
    for s in "${servers[@]}"; do
        [ -f "$RUN_ROOT/$s/pristine/.accounts-$ACCOUNTS" ] || die "$s not set up: run 'compare.sh setup' first"
    done
    log "results: $RESULTS"
    local s rep
    for s in "${servers[@]}"; do
        for ((rep = 1; rep <= REPEAT; rep++)); do
            run_one "$scenario" "$s" "$rep"
        done
    done
}

cmd_stop() {
    local pid
    for pid in $(pgrep -f -- "$RUN_ROOT/" || true); do
        [ "$pid" = "$$" ] && continue
        log "stopping $pid: $(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null | cut -c1-100)"
        stop_pid "$pid" 10
    done
    ERL_EPMD_ADDRESS=127.0.0.1 epmd -kill >/dev/null 2>&1 || true
}

# --- table ----------------------------------------------------------------------------------

cmd_table() {
    [ $# -ge 1 ] || die "usage: compare.sh table FILE..."
    python3 - "$@" <<'EOF'
import json, sys, statistics
from collections import defaultdict, OrderedDict

rows = defaultdict(list)
dead = defaultdict(int)
order = []
for path in sys.argv[1:]:
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        d = json.loads(line)
        key = (d.get("compare", d.get("scenario")), d.get("server", d.get("label", "?")))
        if key[0] not in order:
            order.append(key[0])
        if d.get("server_alive_after") is False:
            dead[key] += 1   # the server went away during the run: not a measurement
            continue
        rows[key].append(d)

def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d

def med(runs, path):
    v = [get(r, path) for r in runs]
    v = [x for x in v if isinstance(x, (int, float))]
    return statistics.median(v) if v else None

# (title, json path, format, ratio?)
CONNECT = [("logins/s", "logins_per_s", "{:.0f}", False),
           ("login p50 ms", "login_latency.p50_ms", "{:.1f}", False),
           ("login p99 ms", "login_latency.p99_ms", "{:.1f}", False),
           ("server CPU ms/login", "server_cpu_ms_per_login", "{:.2f}", True),
           ("KiB/session", "server_kib_per_session", "{:.1f}", True),
           ("sessions ok", "sessions_ok", "{:.0f}", False),
           ("errors", "errors_total", "{:.0f}", False),
           ("dropped", "dropped_during_hold", "{:.0f}", False),
           ("listen overflows", "listen_overflows", "{:.0f}", False),
           ("tool cores", "tool_cores", "{:.2f}", False)]
CHAT = [("msg/s", "throughput_msg_s", "{:.0f}", True),
        ("server CPU µs/msg", "server_cpu_us_per_msg", "{:.1f}", True),
        ("p50 ms", "latency.p50_ms", "{:.2f}", False),
        ("p99 ms", "latency.p99_ms", "{:.2f}", False),
        ("max ms", "latency.max_ms", "{:.1f}", False),
        ("lost", "lost", "{:.0f}", False),
        ("server cores", "server_cores", "{:.2f}", False),
        ("tool cores", "tool_cores", "{:.2f}", False)]

def derived(d):
    # tolerate older/newer JSON layouts: compute a few figures from what is there
    if d.get("scenario") == "connect" and d.get("login_secs"):
        if isinstance(d.get("tool_cpu_login_s"), (int, float)):
            d.setdefault("tool_cores", d["tool_cpu_login_s"] / d["login_secs"])
    w = d.get("window_wall_s") or get(d, "params.duration_s")
    if d.get("server_cores") is None and isinstance(d.get("server_cpu_s"), (int, float)) and w:
        d["server_cores"] = d["server_cpu_s"] / w
    if d.get("tool_cores") is None and isinstance(d.get("tool_cpu_s"), (int, float)) and w:
        d["tool_cores"] = d["tool_cpu_s"] / w
    if d.get("errors_total") is None and isinstance(d.get("errors"), dict):
        d["errors_total"] = sum(v for v in d["errors"].values() if isinstance(v, (int, float)))
    return d

SERVERS = ["halyard", "prosody", "ejabberd"]
for scen in order:
    servers = [s for s in SERVERS if (scen, s) in rows] + sorted(
        s for (sc, s) in rows if sc == scen and s not in SERVERS)
    kind = rows[(scen, servers[0])][0].get("scenario")
    cols = CONNECT if kind == "connect" else CHAT
    for s in servers:
        for r in rows[(scen, s)]:
            derived(r)
    base = rows.get((scen, "halyard"))
    print(f"\n### {scen}\n")
    head = ["server", "runs"]
    for t, p, f, ratio in cols:
        head.append(t)
        if ratio and base:
            head.append("× halyard")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for s in servers:
        runs = rows[(scen, s)]
        cells = [s, str(len(runs))]
        for t, p, f, ratio in cols:
            m = med(runs, p)
            cells.append("—" if m is None else f.format(m))
            if ratio and base:
                b = med(base, p)
                cells.append("—" if (m is None or not b) else f"{m / b:.2f}")
        print("| " + " | ".join(cells) + " |")
if dead:
    print("Left out (server gone during the run): " +
          ", ".join(f"{s} {sc} ×{n}" for (sc, s), n in sorted(dead.items())))
print()
EOF
}

case "${1:-}" in
    setup) shift; cmd_setup "$@" ;;
    run) shift; cmd_run "$@" ;;
    table) shift; cmd_table "$@" ;;
    stop) shift; cmd_stop ;;
    list) echo "$SCENARIOS" | tr ' ' '\n'; echo "(suffixes: -mam for chat/latency, -tls / -plain)" ;;
    *) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
