# benches/bench-lib.sh: what the load scripts beside it (compare.sh, outage.sh) and
# scripts/measure-memory.sh share, sourced by them after they set BENCH (their name, for
# messages) and their own defaults:
#   tools, the release binary, process priority, a work directory cleaned up on exit, free
#   ports, servers pinned to SERVER_CPU, the Talkdesk simulator, consent-proxy's configuration,
#   nginx from benches/nginx.conf, wrk runs with benches/compare.lua, a wait for a quiet
#   machine, and medians and ratios.
# Every function documents its arguments; globals it reads or sets are named in CAPITALS.

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
LUA="$HERE/compare.lua"
LOADGEN_CPU=${LOADGEN_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
PRIORITY=${PRIORITY:-nice}
QUIET_WAIT=${QUIET_WAIT:-0}
PATH=$PATH:/usr/sbin:/sbin
WRK_EXTRA=()

die() { echo "$BENCH: $*" >&2; exit 2; }

# need_tools TOOL=PACKAGE...: installs the missing ones (Debian, as root) and checks them all.
need_tools() {
    local missing=() spec
    for spec in "$@"; do command -v "${spec%%=*}" >/dev/null || missing+=("${spec#*=}"); done
    if ((${#missing[@]})) && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
        echo "$BENCH: installing ${missing[*]}" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
            || die "could not install ${missing[*]}"
    fi
    for spec in "$@"; do
        command -v "${spec%%=*}" >/dev/null || die "${spec%%=*} not found (Debian: apt-get install -y ${spec#*=})"
    done
}

# build_bin: BIN, or the release binary built now.
build_bin() {
    if [[ -z ${BIN:-} ]]; then
        echo "building consent-proxy (release)..." >&2
        (cd "$ROOT" && cargo build --release --quiet --bin consent-proxy) || die "build failed"
        BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/consent-proxy"
    fi
    [[ -x $BIN ]] || die "no binary at $BIN"
}

# PRIO: the prefix for every process under test and for wrk (PRIORITY nice, fifo or none).
case $PRIORITY in
    nice) if [[ $EUID -eq 0 ]]; then PRIO=(nice -n -10); else PRIO=(); fi ;;
    fifo) PRIO=(chrt -f 10) ;;
    none) PRIO=() ;;
    *) die "PRIORITY must be nice, fifo or none" ;;
esac

# WORK: a work directory; every process started with `start` is stopped on exit, NGINX_CACHE
# removed, WORK too unless KEEP_WORKDIR=1 or the run failed (its logs say why).
WORK=$(mktemp -d "/tmp/consent-$BENCH.XXXXXX")
chmod 755 "$WORK"
NGINX_CACHE=""
PIDS=()
declare -A SPID
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $NGINX_CACHE ]]; then rm -rf "$NGINX_CACHE"; fi
    if [[ ${KEEP_WORKDIR:-0} == 1 || $status != 0 ]]; then
        echo "work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'echo "$BENCH: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR
trap 'exit 130' INT TERM

# Ports below the kernel's ephemeral range, which wrk's thousands of connections (and their
# TIME_WAIT) cover: a port nobody listens on there may still be taken for binding. Ports handed
# out are remembered in a file, not a variable: callers take them as `$(free_port)`, a subshell,
# and two ports taken before either server binds (a proxy's two, nginx's two) must differ.
EPHEMERAL_FROM=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
: >"$WORK/ports-taken"
free_port() {
    local port
    for _ in $(seq 200); do
        port=$((10000 + RANDOM % (EPHEMERAL_FROM - 10000)))
        grep -qx "$port" "$WORK/ports-taken" && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port" >>"$WORK/ports-taken"
            echo "$port"
            return
        fi
    done
    die "no free port found"
}

# spawn NAME CMD...: run CMD in the background, output to $WORK/NAME.log, stopped on exit;
# SPID[NAME].
spawn() {
    local name=$1; shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    SPID[$name]=$!
}

# start NAME CMD...: spawn CMD pinned to the server core, with PRIO.
start() {
    local name=$1; shift
    spawn "$name" "${PRIO[@]}" taskset -c "$SERVER_CPU" "$@"
}

# wait_ok URL [CURL ARGS...]: until URL answers 2xx (20 s at most).
wait_ok() {
    local url=$1; shift
    for _ in $(seq 200); do
        curl -fsS -o /dev/null "$@" "$url" 2>/dev/null && return
        sleep 0.1
    done
    die "$url did not come up; logs in $WORK"
}

# header_of URL HEADER [CURL ARGS...]: the value of HEADER in one GET's answer.
header_of() {
    local url=$1 header=$2; shift 2
    (curl -sS -D - -o /dev/null "$@" "$url" || true) | tr -d '\r' \
        | awk -v h="$(echo "$header" | tr 'A-Z' 'a-z')" -F': ' 'tolower($1) == h {print $2}'
}

# expect_header URL HEADER VALUE [CURL ARGS...]: one GET shows HEADER: VALUE, else FAILED=1.
expect_header() {
    local url=$1 header=$2 value=$3; shift 3
    local got
    got=$(header_of "$url" "$header" "$@")
    [[ $got == "$value" ]] || { echo "$BENCH: $url: $header is '$got', expected '$value'" >&2; FAILED=1; }
}

# start_simulator: the Talkdesk simulator (SIM_PORT, SIM), answering unknown contacts
# 200 NO_CONSENT, with client bench/SECRET; TOKEN is a token fetched from it.
start_simulator() {
    SECRET="bench-secret-$RANDOM$RANDOM"
    SIM_PORT=$(free_port)
    SIM="http://127.0.0.1:$SIM_PORT"
    start simulator "$BIN" simulator --listen "127.0.0.1:$SIM_PORT" --client-id bench \
        --client-secret "$SECRET" --token-ttl-s 86400
    wait_ok "$SIM/_sim/stats"
    curl -fsS -o /dev/null -X POST -H 'content-type: application/json' \
        -d '{"answer":"no_consent"}' "$SIM/_sim/unknown-contact"
    TOKEN=$(curl -fsS -u "bench:$SECRET" -d grant_type=client_credentials "$SIM/oauth/token" \
        | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
    [[ -n $TOKEN ]] || die "no token from the simulator"
}

# proxy_config FILE PORT ADMIN_PORT LOG_LEVEL CACHE_LINES: a consent-proxy configuration in
# FILE, listening on PORT and ADMIN_PORT, in front of the simulator (SIM, SECRET), with one
# read-only client "bench" whose key is API_KEY; CACHE_LINES make up its [cache] section.
proxy_config() {
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
[log]
level = "$4"
[talkdesk]
api_base_url = "$SIM"
token_url = "$SIM/oauth/token"
client_id = "bench"
client_secret = "$SECRET"
[cache]
$5
[[clients]]
name = "bench"
api_key = "$API_KEY"
permissions = ["read"]
EOF
}

# sim_gets: consent GETs the simulator has received so far.
sim_gets() { curl -fsS "$SIM/_sim/stats" | grep -o '"gets":[0-9]*' | head -1 | cut -d: -f2; }

# start_nginx NAME VALID DIRECTIVES: nginx (benches/nginx.conf) in front of the simulator,
# caching 200 and 404 for VALID, with DIRECTIVES added to the consent location; NGINX_PORT,
# and NGINX_PASS_PORT: the same nginx's plain proxy_pass, without the cache.
start_nginx() {
    local name=$1 valid=$2 directives=$3
    NGINX_PORT=$(free_port)
    NGINX_PASS_PORT=$(free_port)
    # Cache files on tmpfs (a hit then reads memory, like the proxy and Varnish) unless the
    # working set is large: tmpfs spends a 4 KiB page per ~300-byte cache file.
    if [[ $WORKING_SET -le 100000 && -w /dev/shm ]]; then
        NGINX_CACHE=$(mktemp -d "/dev/shm/consent-$BENCH-nginx.XXXXXX")
    else
        NGINX_CACHE="$WORK/nginx-cache"
        mkdir -p "$NGINX_CACHE"
    fi
    chmod 777 "$NGINX_CACHE"
    local keys_mb=$((WORKING_SET / 4000 + 16)) size_mb=$((WORKING_SET * 8 / 1024 + 256))
    sed -e "s|@WORKDIR@|$WORK|g" -e "s|@CACHE_DIR@|$NGINX_CACHE|g" \
        -e "s|@KEYS_ZONE_MB@|$keys_mb|g" -e "s|@MAX_SIZE_MB@|$size_mb|g" \
        -e "s|@BACKEND@|127.0.0.1:$SIM_PORT|g" -e "s|@PORT@|$NGINX_PORT|g" \
        -e "s|@PASS_PORT@|$NGINX_PASS_PORT|g" \
        -e "s|@TOKEN@|$TOKEN|g" -e "s|@VALID@|$valid|g" -e "s|@DIRECTIVES@|$directives|g" \
        "$HERE/nginx.conf" >"$WORK/nginx.conf"
    # As root, workers would otherwise run as nobody, without access to the work directory.
    if [[ $EUID -eq 0 ]]; then sed -i '1i user root;' "$WORK/nginx.conf"; fi
    start "$name" nginx -p "$WORK" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf"
}

cpu_busy() { # CPU: prints "busy total" jiffies of cpuN
    awk -v cpu="cpu$1" '$1 == cpu {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat
}

# tree_ticks PID...: CPU time (user + system, in clock ticks) of these processes and all their
# descendants (nginx's worker, Varnish's child).
tree_ticks() {
    local queue=("$@") all=() p sum=0 rest
    while [[ ${#queue[@]} -gt 0 ]]; do
        p=${queue[0]}; queue=("${queue[@]:1}")
        all+=("$p")
        for c in $(pgrep -P "$p" || true); do queue+=("$c"); done
    done
    for p in "${all[@]}"; do
        rest=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
        # shellcheck disable=SC2086
        set -- $rest
        sum=$((sum + ${12} + ${13}))
    done
    echo "$sum"
}
CLK_TCK=$(getconf CLK_TCK)

# wrk_run LABEL MODE URL HEADER DURATION THREADS CONNECTIONS [SET]: one wrk pass over SET
# contacts (WORKING_SET); leaves its RESULT fields in R_* and wrk's own CPU use (% of one core)
# in R_wrk_cpu. WRK_EXTRA: more wrk options (e.g. -H "Connection: close"). Non-2xx answers
# and socket errors set FAILED=1 unless ALLOW_NON2XX=1 (then socket errors still do).
wrk_run() {
    local label=$1 mode=$2 url=$3 header=$4 duration=$5 threads=$6 conns=$7 set=${8:-$WORKING_SET}
    local out="$WORK/wrk-$1.txt" rc=0 TIMEFORMAT=%P
    { time "${PRIO[@]}" taskset -c "$LOADGEN_CPU" wrk -t"$threads" -c"$conns" -d"${duration}s" --timeout 5s \
        -s "$LUA" -H "$header" "${WRK_EXTRA[@]}" "$url/" -- "$mode" "$set" "$threads" >"$out" 2>&1 \
        || rc=$?; } 2>"$out.cpu"
    R_wrk_cpu=$(tail -1 "$out.cpu")
    R_wrk_cpu=${R_wrk_cpu%.*}
    [[ $rc -eq 0 ]] || { echo "$BENCH: wrk failed for $label:" >&2; cat "$out" >&2; FAILED=1; }
    local line
    line=$(grep '^RESULT ' "$out" | tail -1 || true)
    [[ -n $line ]] || { echo "$BENCH: no result from wrk for $label" >&2; FAILED=1; line="RESULT"; }
    R_rps=0 R_p50_us=0 R_p99_us=0 R_requests=0 R_non2xx=0 R_connect=0 R_read=0 R_write=0 R_timeout=0
    R_answered=0 R_stale=0
    local kv
    for kv in ${line#RESULT }; do
        printf -v "R_${kv%%=*}" '%s' "${kv#*=}"
    done
    local errors=$((R_connect + R_read + R_write + R_timeout))
    if [[ ($R_non2xx -ne 0 && ${ALLOW_NON2XX:-0} != 1) || $errors -ne 0 ]]; then
        echo "$BENCH: $label: $R_non2xx non-2xx answers, $errors socket errors" \
            "(connect $R_connect, read $R_read, write $R_write, timeout $R_timeout)" >&2
        FAILED=1
    fi
}

# repin CPUS PID...: move these processes, all their threads and their descendants to CPUS.
repin() {
    local cpus=$1 p c
    shift
    for p in "$@"; do
        taskset -a -p -c "$cpus" "$p" >/dev/null 2>&1 || true
        for c in $(pgrep -P "$p" || true); do repin "$cpus" "$c"; done
    done
}

# busy_now: the busier of the two cores over one second, in percent.
busy_now() {
    local b0 t0 b1 t1 b0e t0e b1e t1e
    read -r b0 t0 < <(cpu_busy "$LOADGEN_CPU"); read -r b1 t1 < <(cpu_busy "$SERVER_CPU")
    sleep 1
    read -r b0e t0e < <(cpu_busy "$LOADGEN_CPU"); read -r b1e t1e < <(cpu_busy "$SERVER_CPU")
    local p0=$(( (b0e - b0) * 100 / (t0e - t0 > 0 ? t0e - t0 : 1) ))
    local p1=$(( (b1e - b1) * 100 / (t1e - t1 > 0 ? t1e - t1 : 1) ))
    echo $(( p0 > p1 ? p0 : p1 ))
}

# wait_quiet: until both cores are >= 90% idle, at most QUIET_WAIT seconds.
wait_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT)) busy
    while :; do
        busy=$(busy_now)
        if [[ $busy -le 10 ]]; then return 0; fi
        if [[ $SECONDS -ge $deadline ]]; then
            if [[ $QUIET_WAIT -gt 0 ]]; then
                echo "$BENCH: cores still ${busy}% busy; measuring anyway" >&2
            fi
            return 0
        fi
        sleep 4
    done
}

# median VALUES...: the middle value (lower middle for an even count).
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
spread() { # "median" or "median (min..max)"
    local med
    med=$(median "$@")
    if [[ $# -gt 1 ]]; then
        printf '%s (%s..%s)' "$med" "$(printf '%s\n' "$@" | sort -n | head -1)" \
            "$(printf '%s\n' "$@" | sort -n | tail -1)"
    else
        printf '%s' "$med"
    fi
}
# ratio X Y [DECIMALS]: X / Y with DECIMALS (2) decimals, "-" when Y is not positive.
ratio() {
    awk -v x="$1" -v y="$2" -v format="%.${3:-2}f" \
        'BEGIN { if (y > 0) printf format, x / y; else printf "-" }'
}
