#!/usr/bin/env bash
# Measures the resident memory (RSS) of the shipped binary, the figures behind the resource
# requests and limits of deploy/kubernetes/deployment.yaml:
#   1. idle: `serve` started and ready (token held), nothing cached;
#   2. after one pass over WORKING_SETS contacts (each a miss, then cached), per step;
#   3. the same after LOAD_S seconds of 64-connection GET load over the last working set
#      (connection buffers, allocator high-water mark).
# It prints RSS per step and the marginal bytes per cached contact. Upstream is the built-in
# simulator (a separate process, not counted). Needs wrk and curl (installed when missing, as
# root on Debian). Work directory, ports, the simulator and clean-up come from
# benches/bench-lib.sh (KEEP_WORKDIR=1 keeps the logs; SERVER_CPU [1] is the simulator's core).
#
#   WORKING_SETS [50000 100000 200000]  contacts cached at each step
#   UNKNOWN [no_consent]                what the simulator answers for a contact it does not
#                                       know: no_consent (200, the canonical body: the
#                                       smallest entry) or not_found (404, kept as upstream sent it)
#   LOAD_S [10]                         seconds of load at the end
#   BIN                                 the binary (default: the static one scripts/container-build.sh builds)
set -euo pipefail
cd "$(dirname "$0")/.."

WORKING_SETS=(${WORKING_SETS:-50000 100000 200000})
LOAD_S=${LOAD_S:-10}
UNKNOWN=${UNKNOWN:-no_consent}
TARGET=${TARGET:-$(rustc -vV | sed -n 's/^host: //p')}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/$TARGET/release/consent-proxy}
if [[ ! -x $BIN ]]; then
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release --locked --target "$TARGET" --bin consent-proxy >&2
fi
BENCH=measure-memory
# shellcheck source=benches/bench-lib.sh
source benches/bench-lib.sh
need_tools wrk=wrk curl=curl taskset=util-linux

# The simulator is pinned to SERVER_CPU like every bench-lib server; the proxy is not pinned
# nor reprioritised, so that its RSS is what it is in production.
start_simulator
PROXY_PORT=$(free_port)
PROXY_ADMIN=$(free_port)
listen=127.0.0.1:$PROXY_PORT
admin=127.0.0.1:$PROXY_ADMIN
API_KEY=measure-memory-key-0123456789
largest=${WORKING_SETS[-1]}
proxy_config "$WORK/config.toml" "$PROXY_PORT" "$PROXY_ADMIN" warn "ttl_s = 86400
not_found_ttl_s = 86400
max_entries = $((largest * 2))"
spawn proxy "$BIN" serve --config "$WORK/config.toml"
wait_ok "http://$admin/readyz"

curl -fs -o /dev/null -X POST -H 'Content-Type: application/json' -d "{\"answer\":\"$UNKNOWN\"}" \
    "$SIM/_sim/unknown-contact"
echo "upstream answers unknown contacts: $UNKNOWN"

metric() { curl -fs "http://$admin/metrics" | awk -v name="$1" '$1 == name {print $2}'; }
mib() { python3 -c "print(f'{$1 / 1048576:.1f}')"; }
idle=$(metric process_resident_memory_bytes)
echo "idle (ready, nothing cached): $idle bytes ($(mib "$idle") MiB)"

previous_rss=$idle
previous_entries=0
for set in "${WORKING_SETS[@]}"; do
    wrk -t1 -c16 -d600s -H "X-API-Key: $API_KEY" -s benches/compare.lua \
        "http://$listen" -- warm "$set" 1 >"$WORK/wrk-warm.txt" 2>&1
    entries=$(metric consent_proxy_cache_entries)
    rss=$(metric process_resident_memory_bytes)
    per=$(( (rss - previous_rss) / ( entries > previous_entries ? entries - previous_entries : 1) ))
    echo "cached $entries contacts: $rss bytes ($(mib "$rss") MiB), +$per bytes per contact since the last step"
    previous_rss=$rss
    previous_entries=$entries
done

wrk -t1 -c64 -d"${LOAD_S}s" -H "X-API-Key: $API_KEY" -s benches/compare.lua \
    "http://$listen" -- run "$largest" 1 >"$WORK/wrk-run.txt" 2>&1
rss=$(metric process_resident_memory_bytes)
echo "after ${LOAD_S}s of 64-connection load over $largest contacts: $rss bytes ($(mib "$rss") MiB); $(grep -o 'rps=[0-9.]*' "$WORK/wrk-run.txt")"
