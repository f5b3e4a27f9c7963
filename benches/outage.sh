#!/usr/bin/env bash
# benches/outage.sh: while Talkdesk is down, consent-proxy's STALE answers against nginx's
# proxy_cache_use_stale, over loopback, in one run (a sibling of compare.sh, sharing
# bench-lib.sh and compare.lua).
#
# The simulator, consent-proxy and nginx pinned to SERVER_CPU, wrk to LOADGEN_CPU:
#   p  consent-proxy: cache.ttl_s = TTL_S, cache.stale_if_error_s = 3600, the default upstream
#      settings (timeout 3 s, 2 retries, breaker after 5 failures with a 5 s cooldown)
#   n  nginx: proxy_cache_valid TTL_S, proxy_cache_use_stale error timeout http_500 http_502
#      http_503 http_504 updating, proxy_cache_lock, connect and read timeouts 3 s
# 1. Both caches are warmed with WORKING_SET contacts; then TTL_S passes: every entry is expired.
# 2. The outage begins: the simulator answers every consent GET 500 (OUTAGE=500), or is killed
#    (OUTAGE=down: connections refused).
# 3. Each target in turn under wrk (CONNECTIONS connections) for OUTAGE_S seconds, over the
#    working set: requests/s, the answered ratio (2xx / all answers), the share answered stale
#    (x-cache-status STALE; nginx's UPDATING counts too), p50 and p99 of all answers, and the
#    GETs that reached the simulator (500 outage only).
# 4. The STALE check: each target for STALE_S seconds over the first STALE_SET contacts (1,000
#    cached contacts, upstream failing): p99 against the 10 ms target.
# Then the same-run ratios (p against n). Exits 1 when wrk failed or had socket errors, or a
# warmed contact was not a hit; non-2xx answers are what is measured here, not failures.
#
# Environment (defaults in brackets):
#   WORKING_SET [10000]   contacts cached before the outage
#   OUTAGE_S [60]         seconds of load per target during the outage
#   STALE_SET [1000], STALE_S [10]   the STALE check; STALE_S=0 skips it
#   OUTAGE [500]          500 | down
#   TTL_S [2]             both caches' TTL
#   CONNECTIONS [64], THREADS [1]
#   LOADGEN_CPU [0], SERVER_CPU [1], PRIORITY [nice], QUIET_WAIT [0], BIN, KEEP_WORKDIR: as in
#                         compare.sh (QUIET_WAIT is waited out before the outage begins)
# Needs: wrk, nginx, curl, taskset (Debian: apt-get install -y wrk nginx).
set -Eeuo pipefail

WORKING_SET=${WORKING_SET:-10000}
OUTAGE_S=${OUTAGE_S:-60}
STALE_SET=${STALE_SET:-1000}
STALE_S=${STALE_S:-10}
OUTAGE=${OUTAGE:-500}
TTL_S=${TTL_S:-2}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}

BENCH=outage
# shellcheck source=benches/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

need_tools wrk=wrk curl=curl taskset=util-linux nginx=nginx
[[ $WORKING_SET =~ ^[0-9]+$ && $WORKING_SET -ge 1 && $WORKING_SET -le 1000000 ]] \
    || die "WORKING_SET must be 1..1000000"
[[ $STALE_SET =~ ^[0-9]+$ && $STALE_SET -ge 1 && $STALE_SET -le $WORKING_SET ]] \
    || die "STALE_SET must be 1..WORKING_SET"
[[ $OUTAGE == 500 || $OUTAGE == down ]] || die "OUTAGE must be 500 or down"
build_bin
FAILED=0
SAMPLE_PATH="/voicebiometrics/contacts/+15550000000/consent"

start_simulator

# ---- consent-proxy (p) ----------------------------------------------------------------------
API_KEY="bench-api-key-$RANDOM$RANDOM$RANDOM"
PROXY_PORT=$(free_port); PROXY_ADMIN=$(free_port)
proxy_config "$WORK/proxy.toml" "$PROXY_PORT" "$PROXY_ADMIN" error "ttl_s = $TTL_S
not_found_ttl_s = $TTL_S
stale_if_error_s = 3600
max_entries = $((WORKING_SET * 2))"
start proxy "$BIN" serve --config "$WORK/proxy.toml"
wait_ok "http://127.0.0.1:$PROXY_ADMIN/readyz"
URL_p="http://127.0.0.1:$PROXY_PORT"
HDR_p="X-API-Key: $API_KEY"

# ---- nginx (n) ------------------------------------------------------------------------------
start_nginx nginx "${TTL_S}s" "proxy_cache_use_stale error timeout http_500 http_502 http_503 http_504 updating; proxy_connect_timeout 3s; proxy_read_timeout 3s;"
wait_ok "http://127.0.0.1:$NGINX_PORT$SAMPLE_PATH"
URL_n="http://127.0.0.1:$NGINX_PORT"
HDR_n="X-Bench: 1"

declare -A NAME=([p]="consent-proxy, stale_if_error_s" [n]="nginx, proxy_cache_use_stale")

# ---- warm, then let the TTL pass ------------------------------------------------------------
echo "$(date +%T) load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for t in p n; do
    url_var="URL_$t"; hdr_var="HDR_$t"
    wrk_run "warm-$t" warm "${!url_var}" "${!hdr_var}" $((WORKING_SET / 2000 + 30)) 1 "$CONNECTIONS"
    [[ $R_requests -ge $WORKING_SET ]] \
        || { echo "$BENCH: warm-up of $t answered $R_requests of $WORKING_SET contacts" >&2; FAILED=1; }
done
expect_header "$URL_p$SAMPLE_PATH" x-cache-status HIT -H "$HDR_p"
expect_header "$URL_n$SAMPLE_PATH" x-cache-status HIT
wait_quiet
sleep $((TTL_S + 1))

# ---- the outage -----------------------------------------------------------------------------
case $OUTAGE in
    500) curl -fsS -o /dev/null -X POST -H 'content-type: application/json' \
             -d '{"route":"get","fault":"500","count":4294967295}' "$SIM/_sim/faults" ;;
    down) kill -KILL "${SPID[simulator]}"; wait "${SPID[simulator]}" 2>/dev/null || true ;;
esac
upstream_gets() { if [[ $OUTAGE == 500 ]]; then sim_gets; else echo 0; fi; }
echo "$(date +%T) outage ($OUTAGE) begins; busiest core $(busy_now)% busy just before the load," \
    "load $(cut -d' ' -f1-3 /proc/loadavg)" >&2

declare -A RPS P50 P99 ANSWERED STALE UPSTREAM REQUESTS
# measure KEY TARGET SET DURATION: one pass during the outage.
measure() {
    local key=$1 t=$2 set=$3 duration=$4 url_var="URL_$2" hdr_var="HDR_$2" gets0
    gets0=$(upstream_gets)
    ALLOW_NON2XX=1 wrk_run "$key" outage "${!url_var}" "${!hdr_var}" "$duration" "$THREADS" \
        "$CONNECTIONS" "$set"
    UPSTREAM[$key]=$(( $(upstream_gets) - gets0 ))
    RPS[$key]=${R_rps%.*} P50[$key]=$R_p50_us P99[$key]=$R_p99_us REQUESTS[$key]=$R_requests
    ANSWERED[$key]=$R_answered STALE[$key]=$R_stale
    echo "$key ($t): ${R_rps%.*} req/s, answered $R_answered of $R_requests, stale $R_stale," \
        "p50 $R_p50_us us, p99 $R_p99_us us, upstream GETs ${UPSTREAM[$key]}," \
        "load $(cut -d' ' -f1 /proc/loadavg)" >&2
}
for t in p n; do measure "O$t" "$t" "$WORKING_SET" "$OUTAGE_S"; done
if [[ $STALE_S -gt 0 ]]; then
    for t in p n; do measure "S$t" "$t" "$STALE_SET" "$STALE_S"; done
fi

# ---- report ---------------------------------------------------------------------------------
table() { # table PASS TITLE
    local pass=$1 t k
    echo
    echo "$2"
    printf '%-2s %-34s %-9s %-9s %-9s %-9s %-10s %s\n' "" target "req/s" answered stale "p50 us" "p99 us" \
        "upstream GETs"
    for t in p n; do
        k=$pass$t
        printf '%-2s %-34s %-9s %-9s %-9s %-9s %-10s %s\n' "$t" "${NAME[$t]}" "${RPS[$k]}" \
            "$(ratio "${ANSWERED[$k]}" "${REQUESTS[$k]}" 4)" "$(ratio "${STALE[$k]}" "${REQUESTS[$k]}" 4)" \
            "${P50[$k]}" "${P99[$k]}" "$([[ $OUTAGE == 500 ]] && echo "${UPSTREAM[$k]}" || echo n/a)"
    done
}
echo
echo "upstream outage ($OUTAGE): $WORKING_SET contacts cached (TTL ${TTL_S} s, expired), wrk on cpu" \
    "$LOADGEN_CPU with $CONNECTIONS connections, servers on cpu $SERVER_CPU"
echo "answered: share of answers that were 2xx; stale: share marked stale; latencies over all answers"
table O "the outage: ${OUTAGE_S} s per target over all $WORKING_SET contacts"
echo
echo "answered p/n $(ratio "$(ratio "${ANSWERED[Op]}" "${REQUESTS[Op]}" 4)" "$(ratio "${ANSWERED[On]}" "${REQUESTS[On]}" 4)");" \
    "p99 p/n $(ratio "${P99[Op]}" "${P99[On]}"); p50 p/n $(ratio "${P50[Op]}" "${P50[On]}");" \
    "throughput p/n $(ratio "${RPS[Op]}" "${RPS[On]}")"
if [[ $STALE_S -gt 0 ]]; then
    table S "the STALE check: ${STALE_S} s per target over $STALE_SET contacts"
    echo
    p99_ms=$(awk -v us="${P99[Sp]}" 'BEGIN { printf "%.2f", us / 1000 }')
    met=$(awk -v us="${P99[Sp]}" 'BEGIN { print (us < 10000) ? "met" : "NOT met" }')
    echo "consent-proxy STALE p99 over $STALE_SET contacts: $p99_ms ms (target < 10 ms: $met);" \
        "p99 p/n $(ratio "${P99[Sp]}" "${P99[Sn]}")"
fi
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on these cores skews every figure)"
if [[ $FAILED -ne 0 ]]; then
    echo "FAILED: wrk failed, had socket errors, or a warmed contact was not a hit (see above)" >&2
    exit 1
fi
