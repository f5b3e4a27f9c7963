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
#   f  nginx plain proxy_pass (no cache) in front of the simulator: nginx's miss, against e
#   h  a bare hyper 1.x server with the proxy's runtime settings answering a static consent
#      body (benches/bare_hyper.rs): the limit a hit is measured against
#   g, i  with BASE_BIN set: b and e with that other consent-proxy build (the code before a
#      change), measured in the same rounds: the same-run baseline of a change (b/g, e-a
#      against i-a)
# Same connections, duration and request shape for all; every request picks one contact of the
# working set at random. Three passes per target: throughput (CONNECTIONS connections),
# latency (one connection) and new connections (every request on its own connection,
# `Connection: close`, for CLOSE_TARGETS). Prints a table of each (requests/s, p50, p99, wrk's
# CPU use, the server core's CPU use, GETs that reached the simulator) and the ratios b/h, b/c,
# b/d, b/a, e-a against f-a at p50, and b/c of new connections per second. Exits non-zero when any run had non-2xx answers or socket errors, or a cache
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
#   TARGETS [a b c d e f h; with BASE_BIN: a b g c d e i f h]  which targets to measure (a is
#                         needed for b/a, e-a and f-a)
#   CLOSE_DURATION [5]    seconds per run of the new-connections pass; 0 skips it
#   CLOSE_TARGETS [b c h] the targets of that pass (those also in TARGETS)
#   BARE_BIN              the bare hyper server [built with `cargo bench --no-run --bench bare_hyper`]
#   LOADGEN_CPU [0], SERVER_CPU [1]
#   PRIORITY [nice]       how wrk and the servers run against other work on the machine:
#                         nice (nice -n -10, when root), fifo (chrt -f 10: real-time, other
#                         work on those cores waits for the run), none
#   BIN                   consent-proxy binary [built with `cargo build --release`]
#   BASE_BIN              another consent-proxy binary, for targets g and i [none]
#   QUIET_WAIT [0]        before each round, wait up to this many seconds for both cores to
#                         be at least 90% idle (other people's builds skew every figure)
#   KEEP_WORKDIR=1        keep the work directory (configs, logs, raw wrk output); a failed run keeps it anyway
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
if [[ -n ${BASE_BIN:-} ]]; then
    TARGETS=${TARGETS:-a b g c d e i f h}
else
    TARGETS=${TARGETS:-a b c d e f h}
fi
CLOSE_DURATION=${CLOSE_DURATION:-5}
CLOSE_TARGETS=${CLOSE_TARGETS:-b c h}

BENCH=compare
# shellcheck source=benches/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

tools=(wrk=wrk curl=curl taskset=util-linux)
case " $TARGETS " in *" c "* | *" f "*) tools+=(nginx=nginx);; esac
case " $TARGETS " in *" d "*) tools+=(varnishd=varnish);; esac
need_tools "${tools[@]}"
[[ $WORKING_SET =~ ^[0-9]+$ && $WORKING_SET -ge 1 && $WORKING_SET -le 10000000 ]] \
    || die "WORKING_SET must be 1..10000000"
build_bin
if [[ " $TARGETS " == *" h "* && -z ${BARE_BIN:-} ]]; then
    echo "building the bare hyper server (cargo bench --no-run --bench bare_hyper)..." >&2
    BARE_BIN=$(cd "$ROOT" && cargo bench --quiet --no-run --bench bare_hyper --message-format=json \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
fi
[[ " $TARGETS " != *" h "* || -x ${BARE_BIN:-} ]] || die "no bare hyper server at '${BARE_BIN:-}'"

API_KEY="bench-api-key-$RANDOM$RANDOM$RANDOM"
SAMPLE_PATH="/voicebiometrics/contacts/+15550000000/consent"

# ---- the simulator: the backend of a, c, d, e (pinned to the server core too) -------------
start_simulator

# ---- consent-proxy: with cache (b) and without (e) ----------------------------------------
# proxy_cache_config ENABLED: the [cache] lines of b (true) and e (false).
proxy_cache_config() {
    printf 'enabled = %s\nttl_s = 86400\nnot_found_ttl_s = 86400\nmax_entries = %s' \
        "$1" $((WORKING_SET * 2))
}

# start_proxy TARGET NAME BIN CACHE: when TARGET is measured, consent-proxy BIN as process
# NAME, with the cache on (true) or off (false); URL_<TARGET> and HDR_<TARGET> say how to ask it.
start_proxy() {
    local target=$1 name=$2 bin=$3 cache=$4 port=0 admin
    if [[ " $TARGETS " == *" $target "* ]]; then
        port=$(free_port); admin=$(free_port)
        proxy_config "$WORK/$name.toml" "$port" "$admin" warn "$(proxy_cache_config "$cache")"
        start "$name" "$bin" serve --config "$WORK/$name.toml"
        wait_ok "http://127.0.0.1:$admin/readyz"
    fi
    printf -v "URL_$target" '%s' "http://127.0.0.1:$port"
    printf -v "HDR_$target" '%s' "X-API-Key: $API_KEY"
}

URL_a="$SIM"
HDR_a="Authorization: Bearer $TOKEN"
start_proxy b proxy "$BIN" true
start_proxy e proxy-nocache "$BIN" false

# ---- the other build: with cache (g) and without (i) ---------------------------------------
start_proxy g proxy-base "${BASE_BIN:-}" true
start_proxy i proxy-base-nocache "${BASE_BIN:-}" false

# ---- nginx (c) --------------------------------------------------------------------------
if [[ " $TARGETS " == *" c "* || " $TARGETS " == *" f "* ]]; then
    start_nginx nginx 1d ""
    wait_ok "http://127.0.0.1:$NGINX_PORT$SAMPLE_PATH"
    wait_ok "http://127.0.0.1:$NGINX_PASS_PORT$SAMPLE_PATH"
fi
URL_c="http://127.0.0.1:${NGINX_PORT:-0}"
HDR_c="X-Bench: 1"
URL_f="http://127.0.0.1:${NGINX_PASS_PORT:-0}"
HDR_f="X-Bench: 1"

# ---- the bare hyper server (h) ----------------------------------------------------------
if [[ " $TARGETS " == *" h "* ]]; then
    BARE_PORT=$(free_port)
    start bare "$BARE_BIN" --listen "127.0.0.1:$BARE_PORT"
    wait_ok "http://127.0.0.1:$BARE_PORT$SAMPLE_PATH"
fi
URL_h="http://127.0.0.1:${BARE_PORT:-0}"
HDR_h="X-Bench: 1"

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

# The processes that do a target's work: its server, and for e the simulator too.
declare -A SERVER_PROCS=(
    [a]=simulator [b]=proxy [c]=nginx [d]=varnish [e]="proxy-nocache simulator"
    [f]="nginx simulator" [h]=bare [g]=proxy-base [i]="proxy-base-nocache simulator"
)
target_pids() { local n; for n in ${SERVER_PROCS[$1]}; do echo "${SPID[$n]:-}"; done; }

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
for t in b g c d; do
    if has "$t"; then warm "$t"; fi
done
if has b; then expect_header "$URL_b$SAMPLE_PATH" x-cache-status HIT -H "$HDR_b"; fi
if has g; then expect_header "$URL_g$SAMPLE_PATH" x-cache-status HIT -H "$HDR_g"; fi
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
    if [[ $CLOSE_DURATION -gt 0 ]]; then
        WRK_EXTRA=(-H "Connection: close")
        for t in $CLOSE_TARGETS; do
            if has "$t"; then measure C "$t" "$run" "$CONNECTIONS" "$CLOSE_DURATION" "$THREADS"; fi
        done
        WRK_EXTRA=()
    fi
done

# ---- report -------------------------------------------------------------------------------
m() { local -n values=$1; median ${values[$2]}; } # m ARRAY KEY: the median of one figure

declare -A NAME=(
    [a]="simulator direct (no proxy)"
    [b]="consent-proxy, cache hit"
    [c]="nginx proxy_cache, hit"
    [d]="varnish, hit"
    [e]="consent-proxy, no cache"
    [f]="nginx proxy_pass, no cache"
    [h]="bare hyper server"
    [g]="BASE_BIN, cache hit"
    [i]="BASE_BIN, no cache"
)

table() { # table PASS TITLE [TARGETS]
    local pass=$1 t k
    echo
    echo "$2"
    printf '%-2s %-29s %-24s %-20s %-22s %-16s %-8s %-7s %s\n' \
        "" target "req/s" "p50 us" "p99 us" "cpu us/req" "wrk cpu" "cpu$SERVER_CPU" "upstream GETs"
    for t in ${3:-$TARGETS}; do
        has "$t" || continue
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
if [[ $CLOSE_DURATION -gt 0 ]]; then
    table C "new connections: Connection: close, $CONNECTIONS connections, ${CLOSE_DURATION} s per run" \
        "$CLOSE_TARGETS"
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
if has b && has h; then
    echo "b/h throughput $(ratio "$(m RPS Lb)" "$(m RPS Lh)") (target >= 0.95);" \
        "p99: b $(m P99 Lb) us, h $(m P99 Lh) us"
fi
if [[ $CLOSE_DURATION -gt 0 ]] && has b && has c \
    && [[ " $CLOSE_TARGETS " == *" b "* && " $CLOSE_TARGETS " == *" c "* ]]; then
    echo "b/c new connections per second $(ratio "$(m RPS Cb)" "$(m RPS Cc)") (target >= 1)"
fi
if has b && has a; then
    echo "b/a throughput $(ratio "$(m RPS Lb)" "$(m RPS La)") (target >= 0.9)"
fi
if has b && has c; then
    # m COST KEY for each target that ran ("-" for one that did not).
    cost() { if has "$1"; then m COST "L$1"; else echo -; fi; }
    echo "CPU per hit: b $(cost b) us, c $(cost c) us, d $(cost d) us, h $(cost h) us;" \
        "per direct answer (a) $(cost a) us; per proxied miss (e, proxy + simulator)" \
        "$(cost e) us, (f, nginx + simulator) $(cost f) us"
fi
if has e && has a; then
    if [[ $SINGLE_DURATION -gt 0 ]]; then
        echo "e-a at p50, 1 connection: $(( $(m P50 Se) - $(m P50 Sa) )) us (target <= 100);" \
            "p99: $(( $(m P99 Se) - $(m P99 Sa) )) us"
    fi
    if [[ $SINGLE_DURATION -gt 0 ]] && has f; then
        echo "miss overhead at p50, 1 connection: proxy (e-a) $(( $(m P50 Se) - $(m P50 Sa) )) us," \
            "nginx proxy_pass (f-a) $(( $(m P50 Sf) - $(m P50 Sa) )) us (target e-a <= f-a)"
    fi
    echo "e-a at p50, $CONNECTIONS connections: $(( $(m P50 Le) - $(m P50 La) )) us" \
        "(queueing: the proxy and the simulator share one core); e/a throughput" \
        "$(ratio "$(m RPS Le)" "$(m RPS La)")"
fi
if has b && has g; then
    echo "b/g throughput (this build's hits against BASE_BIN's) $(ratio "$(m RPS Lb)" "$(m RPS Lg)");" \
        "p99: b $(m P99 Lb) us, g $(m P99 Lg) us; CPU per hit: b $(m COST Lb) us, g $(m COST Lg) us"
fi
if has e && has i && has a && [[ $SINGLE_DURATION -gt 0 ]]; then
    echo "miss overhead at p50, 1 connection: this build (e-a) $(( $(m P50 Se) - $(m P50 Sa) )) us," \
        "BASE_BIN (i-a) $(( $(m P50 Si) - $(m P50 Sa) )) us; e/i throughput" \
        "$(ratio "$(m RPS Le)" "$(m RPS Li)"); CPU per miss (with the simulator's): e $(m COST Le) us, i $(m COST Li) us"
fi
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on these cores skews every figure)"
if [[ $FAILED -ne 0 ]]; then
    echo "FAILED: some runs had non-2xx answers, socket errors or missed checks (see above)" >&2
    exit 1
fi
