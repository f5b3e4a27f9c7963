#!/usr/bin/env bash
# benches/compare.sh: consent-proxy against the alternatives, on loopback, in one run.
#
# One load generator (wrk + benches/compare.lua, pinned to LOADGEN_CPU) and, pinned to
# SERVER_CPU, every server under test and the Talkdesk simulator behind them:
#   a  the simulator answering the consent GET directly (wrk sends its Bearer token): the
#      no-proxy limit
#   b  consent-proxy, cache hit (working set warmed first; X-API-Key)
#   c  nginx proxy_cache + proxy_cache_lock in front of the simulator, cache hit (warmed)
#   d  Varnish in front of the simulator, cache hit (warmed)
#   e  consent-proxy with cache.enabled = false in front of the simulator: every GET a miss
# Same connections, duration and request shape for all; every request picks one contact of the
# working set at random. Two passes per target: throughput (CONNECTIONS connections) and
# latency (one connection). Prints a table of each (requests/s, p50, p99, wrk's CPU use, the
# server core's CPU use, GETs that reached the simulator) and the ratios b/c, b/d, b/a and
# e-a at p50. Exits non-zero when any run had non-2xx answers or socket errors, or a cache
# did not answer a warmed contact as a hit.
#
# Environment (defaults in brackets):
#   DURATION [10]         seconds per measured run
#   CONNECTIONS [64]      wrk connections
#   THREADS [1]           wrk threads (all on LOADGEN_CPU)
#   WORKING_SET [10000]   contacts; 1000000 for the large-working-set variant (warming takes
#                         one miss per contact per cache: 1.5 to 3 minutes each at that size,
#                         about 14 minutes for the whole run, clean-up included)
#   SINGLE_DURATION [5]   seconds per run of the latency pass (one connection, so latency is
#                         service time, not queueing); 0 skips it
#   RUNS [1]              rounds of a..e; with RUNS > 1 the tables show the median and the
#                         spread (min..max) of each figure
#   TARGETS [a b c d e]   which targets to measure (a is needed for b/a and e-a)
#   LOADGEN_CPU [0], SERVER_CPU [1]
#   PRIORITY [nice]       how wrk and the servers run against other work on the machine:
#                         nice (nice -n -10, when root), fifo (chrt -f 10: real-time, other
#                         work on those cores waits for the run), none
#   BIN                   consent-proxy binary [built with `cargo build --release`]
#   QUIET_WAIT [0]        before each round, wait up to this many seconds for both cores to
#                         be at least 90% idle (other people's builds skew every figure)
#   KEEP_WORKDIR=1        keep the work directory (configs, logs, raw wrk output)
# Needs: wrk, nginx, varnishd, curl, taskset (Debian: apt-get install -y wrk nginx varnish).
#
# The simulator answers unknown contacts 200 {"status":"NO_CONSENT"} (its /_sim/unknown-contact
# switch), so no contact needs seeding, whatever the working set: every answer is a cacheable
# 200 of the same size, for all targets alike.
set -Eeuo pipefail

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WORKING_SET=${WORKING_SET:-10000}
RUNS=${RUNS:-1}
SINGLE_DURATION=${SINGLE_DURATION:-5}
TARGETS=${TARGETS:-a b c d e}
LOADGEN_CPU=${LOADGEN_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
PRIORITY=${PRIORITY:-nice}
QUIET_WAIT=${QUIET_WAIT:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
LUA="$HERE/compare.lua"

die() { echo "compare.sh: $*" >&2; exit 2; }

PATH=$PATH:/usr/sbin:/sbin
# Install what is missing (Debian packages), when we can.
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
command -v taskset >/dev/null || missing+=(util-linux)
case " $TARGETS " in *" c "*) command -v nginx >/dev/null || missing+=(nginx);; esac
case " $TARGETS " in *" d "*) command -v varnishd >/dev/null || missing+=(varnish);; esac
if ((${#missing[@]})) && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    echo "compare.sh: installing ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
        || die "could not install ${missing[*]}"
fi
for tool in wrk curl taskset; do
    command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install -y wrk curl util-linux)"
done
case " $TARGETS " in *" c "*) command -v nginx >/dev/null \
    || die "nginx not found (apt-get install -y nginx, or TARGETS without c)";; esac
case " $TARGETS " in *" d "*) command -v varnishd >/dev/null \
    || die "varnishd not found (apt-get install -y varnish, or TARGETS without d)";; esac
[[ $WORKING_SET =~ ^[0-9]+$ && $WORKING_SET -ge 1 && $WORKING_SET -le 10000000 ]] \
    || die "WORKING_SET must be 1..10000000"

if [[ -z ${BIN:-} ]]; then
    echo "building consent-proxy (release)..." >&2
    (cd "$ROOT" && cargo build --release --quiet --bin consent-proxy) || die "build failed"
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/consent-proxy"
fi
[[ -x $BIN ]] || die "no binary at $BIN"

# A prefix for every process under test and for wrk.
case $PRIORITY in
    nice) if [[ $EUID -eq 0 ]]; then PRIO=(nice -n -10); else PRIO=(); fi ;;
    fifo) PRIO=(chrt -f 10) ;;
    none) PRIO=() ;;
    *) die "PRIORITY must be nice, fifo or none" ;;
esac

WORK=$(mktemp -d /tmp/consent-compare.XXXXXX)
chmod 755 "$WORK"
NGINX_CACHE=""
PIDS=()

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
    if [[ ${KEEP_WORKDIR:-0} == 1 ]]; then
        echo "work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'echo "compare.sh: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR
trap 'exit 130' INT TERM

USED_PORTS=" "
free_port() {
    local port
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 40000))
        [[ $USED_PORTS == *" $port "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            USED_PORTS+="$port "
            echo "$port"
            return
        fi
    done
    die "no free port found"
}

# start NAME CMD...: run CMD pinned to the server core, output to $WORK/NAME.log.
start() {
    local name=$1; shift
    "${PRIO[@]}" taskset -c "$SERVER_CPU" "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    SPID[$name]=$!
}
declare -A SPID

# wait_ok URL [CURL ARGS...]: until URL answers 2xx (20 s at most).
wait_ok() {
    local url=$1; shift
    for _ in $(seq 200); do
        curl -fsS -o /dev/null "$@" "$url" 2>/dev/null && return
        sleep 0.1
    done
    die "$url did not come up; logs in $WORK (KEEP_WORKDIR=1 keeps them)"
}

# expect_header URL HEADER VALUE [CURL ARGS...]: one GET shows HEADER: VALUE (a hit check).
expect_header() {
    local url=$1 header=$2 value=$3; shift 3
    local got
    got=$( (curl -sS -D - -o /dev/null "$@" "$url" || true) | tr -d '\r' \
        | awk -v h="$(echo "$header" | tr 'A-Z' 'a-z')" -F': ' 'tolower($1) == h {print $2}')
    [[ $got == "$value" ]] || { echo "compare.sh: $url: $header is '$got', expected '$value'" >&2; FAILED=1; }
}

SECRET="bench-secret-$RANDOM$RANDOM"
API_KEY="bench-api-key-$RANDOM$RANDOM$RANDOM"
SAMPLE_PATH="/voicebiometrics/contacts/+15550000000/consent"

# ---- the simulator: the backend of a, c, d, e (pinned to the server core too) -------------
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

sim_gets() { curl -fsS "$SIM/_sim/stats" | grep -o '"gets":[0-9]*' | head -1 | cut -d: -f2; }

# ---- consent-proxy: with cache (b) and without (e) ----------------------------------------
proxy_config() { # FILE PORT ADMIN_PORT CACHE_ENABLED
    cat >"$1" <<EOF
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
[log]
level = "warn"
[talkdesk]
api_base_url = "$SIM"
token_url = "$SIM/oauth/token"
client_id = "bench"
client_secret = "$SECRET"
[cache]
enabled = $4
ttl_s = 86400
not_found_ttl_s = 86400
max_entries = $((WORKING_SET * 2))
[[clients]]
name = "bench"
api_key = "$API_KEY"
permissions = ["read"]
EOF
}

URL_a="$SIM"
HDR_a="Authorization: Bearer $TOKEN"
if [[ " $TARGETS " == *" b "* ]]; then
    PROXY_PORT=$(free_port); PROXY_ADMIN=$(free_port)
    proxy_config "$WORK/proxy.toml" "$PROXY_PORT" "$PROXY_ADMIN" true
    start proxy "$BIN" serve --config "$WORK/proxy.toml"
    wait_ok "http://127.0.0.1:$PROXY_ADMIN/readyz"
fi
URL_b="http://127.0.0.1:${PROXY_PORT:-0}"
HDR_b="X-API-Key: $API_KEY"
if [[ " $TARGETS " == *" e "* ]]; then
    NOCACHE_PORT=$(free_port); NOCACHE_ADMIN=$(free_port)
    proxy_config "$WORK/proxy-nocache.toml" "$NOCACHE_PORT" "$NOCACHE_ADMIN" false
    start proxy-nocache "$BIN" serve --config "$WORK/proxy-nocache.toml"
    wait_ok "http://127.0.0.1:$NOCACHE_ADMIN/readyz"
fi
URL_e="http://127.0.0.1:${NOCACHE_PORT:-0}"
HDR_e="X-API-Key: $API_KEY"

# ---- nginx (c) --------------------------------------------------------------------------
if [[ " $TARGETS " == *" c "* ]]; then
    NGINX_PORT=$(free_port)
    # Cache files on tmpfs (a hit then reads memory, like the proxy and Varnish) unless the
    # working set is large: tmpfs spends a 4 KiB page per ~300-byte cache file.
    if [[ $WORKING_SET -le 100000 && -w /dev/shm ]]; then
        NGINX_CACHE=$(mktemp -d /dev/shm/consent-compare-nginx.XXXXXX)
    else
        NGINX_CACHE="$WORK/nginx-cache"
        mkdir -p "$NGINX_CACHE"
    fi
    chmod 777 "$NGINX_CACHE"
    keys_mb=$((WORKING_SET / 4000 + 16))
    size_mb=$((WORKING_SET * 8 / 1024 + 256))
    sed -e "s|@WORKDIR@|$WORK|g" -e "s|@CACHE_DIR@|$NGINX_CACHE|g" \
        -e "s|@KEYS_ZONE_MB@|$keys_mb|g" -e "s|@MAX_SIZE_MB@|$size_mb|g" \
        -e "s|@BACKEND@|127.0.0.1:$SIM_PORT|g" -e "s|@PORT@|$NGINX_PORT|g" \
        -e "s|@TOKEN@|$TOKEN|g" "$HERE/nginx.conf" >"$WORK/nginx.conf"
    # As root, workers would otherwise run as nobody, without access to the work directory.
    if [[ $EUID -eq 0 ]]; then sed -i '1i user root;' "$WORK/nginx.conf"; fi
    start nginx nginx -p "$WORK" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf"
    wait_ok "http://127.0.0.1:$NGINX_PORT$SAMPLE_PATH"
fi
URL_c="http://127.0.0.1:${NGINX_PORT:-0}"
HDR_c="X-Bench: 1"

# ---- Varnish (d) --------------------------------------------------------------------------
if [[ " $TARGETS " == *" d "* ]]; then
    VARNISH_PORT=$(free_port)
    sed -e "s|@BACKEND_PORT@|$SIM_PORT|g" -e "s|@TOKEN@|$TOKEN|g" \
        "$HERE/varnish.vcl" >"$WORK/varnish.vcl"
    storage_mb=$((WORKING_SET * 2 / 1024 + 256))
    # -j none: no privilege separation (a throwaway instance in a temporary directory);
    # one thread pool, as everything runs on one core.
    start varnish varnishd -F -j none -n "$WORK/varnish" -a "127.0.0.1:$VARNISH_PORT" \
        -f "$WORK/varnish.vcl" -s "malloc,${storage_mb}m" -T none -p thread_pools=1
    wait_ok "http://127.0.0.1:$VARNISH_PORT$SAMPLE_PATH"
fi
URL_d="http://127.0.0.1:${VARNISH_PORT:-0}"
HDR_d="X-Bench: 1"

# ---- load ---------------------------------------------------------------------------------
FAILED=0

cpu_busy() { # prints "busy total" jiffies for cpuN
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

# The processes that do a target's work: its server, and for e the simulator too.
declare -A SERVER_PROCS=(
    [a]=simulator [b]=proxy [c]=nginx [d]=varnish [e]="proxy-nocache simulator"
)
target_pids() { local n; for n in ${SERVER_PROCS[$1]}; do echo "${SPID[$n]:-}"; done; }

# wrk_run LABEL MODE URL HEADER DURATION THREADS CONNECTIONS: one wrk pass; leaves its RESULT
# fields in R_* and wrk's own CPU use (% of one core) in R_wrk_cpu.
wrk_run() {
    local label=$1 mode=$2 url=$3 header=$4 duration=$5 threads=$6 conns=$7 out="$WORK/wrk-$1.txt"
    local rc=0 TIMEFORMAT=%P
    { time "${PRIO[@]}" taskset -c "$LOADGEN_CPU" wrk -t"$threads" -c"$conns" -d"${duration}s" --timeout 5s \
        -s "$LUA" -H "$header" "$url/" -- "$mode" "$WORKING_SET" "$threads" >"$out" 2>&1 \
        || rc=$?; } 2>"$out.cpu"
    R_wrk_cpu=$(tail -1 "$out.cpu")
    R_wrk_cpu=${R_wrk_cpu%.*}
    [[ $rc -eq 0 ]] || { echo "compare.sh: wrk failed for $label:" >&2; cat "$out" >&2; FAILED=1; }
    local line
    line=$(grep '^RESULT ' "$out" | tail -1 || true)
    [[ -n $line ]] || { echo "compare.sh: no result from wrk for $label" >&2; FAILED=1; line="RESULT"; }
    R_rps=0 R_p50_us=0 R_p99_us=0 R_requests=0 R_non2xx=0 R_connect=0 R_read=0 R_write=0 R_timeout=0
    local kv
    for kv in ${line#RESULT }; do
        printf -v "R_${kv%%=*}" '%s' "${kv#*=}"
    done
    local errors=$((R_connect + R_read + R_write + R_timeout))
    if [[ $R_non2xx -ne 0 || $errors -ne 0 ]]; then
        echo "compare.sh: $label: $R_non2xx non-2xx answers, $errors socket errors" \
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

# warm LABEL: one pass over the whole working set through a cache (every contact once).
warm() {
    local t=$1 url_var="URL_$1" hdr_var="HDR_$1"
    local started=$SECONDS
    # A large working set is warmed with the target and the simulator free to use both cores
    # (every contact is a miss, a round trip to the simulator); they are pinned back after.
    local spread_out=0
    if [[ $WORKING_SET -gt 100000 ]]; then
        spread_out=1
        # shellcheck disable=SC2046
        repin "$LOADGEN_CPU,$SERVER_CPU" $(target_pids "$t") "${SPID[simulator]}"
    fi
    # Long enough for the slowest target at ~2,000 misses/s; the pass ends by itself once
    # every contact has been answered.
    wrk_run "warm-$t" warm "${!url_var}" "${!hdr_var}" $((WORKING_SET / 2000 + 30)) 1 "$CONNECTIONS"
    if [[ $spread_out -eq 1 ]]; then
        # shellcheck disable=SC2046
        repin "$SERVER_CPU" $(target_pids "$t") "${SPID[simulator]}"
    fi
    if [[ $R_requests -lt $WORKING_SET ]]; then
        echo "compare.sh: warm-up of $t answered $R_requests of $WORKING_SET contacts" >&2
        FAILED=1
    fi
    echo "warmed $t: $WORKING_SET contacts in $((SECONDS - started)) s" >&2
}

has() { [[ " $TARGETS " == *" $1 "* ]]; }

# A direct pass first, so the simulator's own per-contact bookkeeping is warm for (a) as well.
echo "$(date +%T) load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
warm a
for t in b c d; do
    if has "$t"; then warm "$t"; fi
done
if has b; then expect_header "$URL_b$SAMPLE_PATH" x-cache-status HIT -H "$HDR_b"; fi
if has c; then expect_header "$URL_c$SAMPLE_PATH" x-cache-status HIT; fi
if has d; then expect_header "$URL_d$SAMPLE_PATH" x-cache-status HIT; fi

# Results per key "<pass><target>": pass L = load (CONNECTIONS), pass S = single connection.
declare -A RPS P50 P99 WRKCPU CPU1 UPSTREAM COST

# measure PASS TARGET RUN CONNECTIONS DURATION THREADS
measure() {
    local pass=$1 t=$2 run=$3 conns=$4 duration=$5 threads=$6 url_var="URL_$2" hdr_var="HDR_$2"
    local b1 t1 b1e t1e gets0 gets1 ticks0 ticks1
    # The simulator's stats are read outside the CPU-time window: at a large working set its
    # answer (per-contact counts) costs it more than the run itself.
    gets0=$(sim_gets)
    # shellcheck disable=SC2046
    ticks0=$(tree_ticks $(target_pids "$t"))
    read -r b1 t1 < <(cpu_busy "$SERVER_CPU")
    wrk_run "$pass$t-$run" run "${!url_var}" "${!hdr_var}" "$duration" "$threads" "$conns"
    read -r b1e t1e < <(cpu_busy "$SERVER_CPU")
    # shellcheck disable=SC2046
    ticks1=$(tree_ticks $(target_pids "$t"))
    gets1=$(sim_gets)
    local k=$pass$t
    RPS[$k]+="${R_rps%.*} "
    P50[$k]+="$R_p50_us "
    P99[$k]+="$R_p99_us "
    WRKCPU[$k]+="$R_wrk_cpu "
    CPU1[$k]+="$(( (b1e - b1) * 100 / (t1e - t1 > 0 ? t1e - t1 : 1) )) "
    UPSTREAM[$k]+="$((gets1 - gets0)) "
    # CPU time the target's processes spent per request, in microseconds.
    local cost=$(( (ticks1 - ticks0) * 1000000 / CLK_TCK / (R_requests > 0 ? R_requests : 1) ))
    COST[$k]+="$cost "
    echo "run $run $t, $conns connection(s): ${R_rps%.*} req/s, p50 ${R_p50_us} us," \
        "p99 ${R_p99_us} us, wrk cpu ${R_wrk_cpu}%, server cpu $cost us/request," \
        "upstream GETs $((gets1 - gets0))," \
        "load $(cut -d' ' -f1 /proc/loadavg)" >&2
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
                echo "compare.sh: cores still ${busy}% busy; measuring anyway" >&2
            fi
            return 0
        fi
        sleep 4
    done
}

for run in $(seq "$RUNS"); do
    wait_quiet
    echo "round $run: busiest core $(busy_now)% busy just before it, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    for t in $TARGETS; do
        measure L "$t" "$run" "$CONNECTIONS" "$DURATION" "$THREADS"
    done
    if [[ $SINGLE_DURATION -gt 0 ]]; then
        for t in $TARGETS; do
            measure S "$t" "$run" 1 "$SINGLE_DURATION" 1
        done
    fi
done

# ---- report -------------------------------------------------------------------------------
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
ratio() { awk -v x="$1" -v y="$2" 'BEGIN { if (y > 0) printf "%.2f", x / y; else printf "-" }'; }
m() { local -n values=$1; median ${values[$2]}; } # m ARRAY KEY: the median of one figure

declare -A NAME=(
    [a]="simulator direct (no proxy)"
    [b]="consent-proxy, cache hit"
    [c]="nginx proxy_cache, hit"
    [d]="varnish, hit"
    [e]="consent-proxy, no cache"
)

table() { # table PASS TITLE
    local pass=$1 t k
    echo
    echo "$2"
    printf '%-2s %-29s %-24s %-20s %-22s %-16s %-8s %-7s %s\n' \
        "" target "req/s" "p50 us" "p99 us" "cpu us/req" "wrk cpu" "cpu$SERVER_CPU" "upstream GETs"
    for t in $TARGETS; do
        k=$pass$t
        # shellcheck disable=SC2086
        printf '%-2s %-29s %-24s %-20s %-22s %-16s %-8s %-7s %s\n' "$t" "${NAME[$t]}" \
            "$(spread ${RPS[$k]})" "$(spread ${P50[$k]})" "$(spread ${P99[$k]})" \
            "$(spread ${COST[$k]})" "$(median ${WRKCPU[$k]})%" "$(median ${CPU1[$k]})%" \
            "$(median ${UPSTREAM[$k]})"
    done
}

echo
echo "consent GET, working set $WORKING_SET contacts, wrk on cpu $LOADGEN_CPU, servers on cpu $SERVER_CPU"
echo "cpu us/req: CPU time of the target's processes per request (e: proxy + simulator);" \
    "wrk cpu: wrk's use of its core; cpu$SERVER_CPU: that core's busy share, any process"
if [[ $RUNS -gt 1 ]]; then echo "figures: median (min..max) of $RUNS runs"; fi
table L "throughput: $CONNECTIONS connections, wrk -t$THREADS, ${DURATION} s per run"
if [[ $SINGLE_DURATION -gt 0 ]]; then
    table S "latency: 1 connection, ${SINGLE_DURATION} s per run"
fi
echo
if has b && has c; then
    echo "b/c throughput $(ratio "$(m RPS Lb)" "$(m RPS Lc)") (target >= 1.5);" \
        "p99 at $CONNECTIONS connections: b $(m P99 Lb) us, c $(m P99 Lc) us (target b <= c)"
fi
if has b && has d; then
    echo "b/d throughput $(ratio "$(m RPS Lb)" "$(m RPS Ld)");" \
        "p99 at $CONNECTIONS connections: b $(m P99 Lb) us, d $(m P99 Ld) us"
fi
if has b && has a; then
    echo "b/a throughput $(ratio "$(m RPS Lb)" "$(m RPS La)") (target >= 0.9)"
fi
if has b && has c; then
    echo "CPU per hit: b $(m COST Lb) us, c $(m COST Lc) us, d $(m COST Ld) us;" \
        "per direct answer (a) $(m COST La) us; per proxied miss (e, proxy + simulator) $(m COST Le) us"
fi
if has e && has a; then
    if [[ $SINGLE_DURATION -gt 0 ]]; then
        echo "e-a at p50, 1 connection: $(( $(m P50 Se) - $(m P50 Sa) )) us (target <= 100);" \
            "p99: $(( $(m P99 Se) - $(m P99 Sa) )) us"
    fi
    echo "e-a at p50, $CONNECTIONS connections: $(( $(m P50 Le) - $(m P50 La) )) us" \
        "(queueing: the proxy and the simulator share one core); e/a throughput" \
        "$(ratio "$(m RPS Le)" "$(m RPS La)")"
fi
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on these cores skews every figure)"
if [[ $FAILED -ne 0 ]]; then
    echo "FAILED: some runs had non-2xx answers, socket errors or missed checks (see above)" >&2
    exit 1
fi
