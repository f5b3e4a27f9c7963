#!/usr/bin/env bash
# Measures the resident memory (RSS) of the shipped binary, the figures behind the resource
# requests and limits of deploy/kubernetes/deployment.yaml:
#   1. idle: `serve` started and ready (token held), nothing cached;
#   2. after one pass over WORKING_SETS contacts (each a miss, then cached), per step;
#   3. the same after LOAD_S seconds of 64-connection GET load over the last working set
#      (connection buffers, allocator high-water mark).
# It prints RSS per step and the marginal bytes per cached contact. Upstream is the built-in
# simulator (a separate process, not counted). Needs wrk (apt-get install -y wrk) and curl.
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
TARGET=$(rustc -vV | sed -n 's/^host: //p')
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/$TARGET/release/consent-proxy}
if [[ ! -x $BIN ]]; then
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release --locked --target "$TARGET" --bin consent-proxy >&2
fi
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

sim_port=$(free_port)
listen=127.0.0.1:$(free_port)
admin=127.0.0.1:$(free_port)
key=measure-memory-key-0123456789
"$BIN" simulator --listen "127.0.0.1:$sim_port" --client-id measure --client-secret measure-secret-0123 \
    --token-ttl-s 86400 >"$work/sim.log" 2>&1 &
pids+=($!)
largest=${WORKING_SETS[-1]}
cat >"$work/config.toml" <<EOF
[server]
listen = "$listen"
admin_listen = "$admin"
[log]
level = "warn"
[talkdesk]
api_base_url = "http://127.0.0.1:$sim_port"
token_url = "http://127.0.0.1:$sim_port/oauth/token"
client_id = "measure"
client_secret = "measure-secret-0123"
[cache]
ttl_s = 86400
not_found_ttl_s = 86400
max_entries = $((largest * 2))
[[clients]]
name = "measure"
api_key = "$key"
permissions = ["read"]
EOF
"$BIN" serve --config "$work/config.toml" >"$work/proxy.log" 2>&1 &
pids+=($!)
deadline=$((SECONDS + 30))
until curl -fs -o /dev/null "http://$admin/readyz"; do
    ((SECONDS < deadline)) || { cat "$work/proxy.log" >&2; exit 1; }
    sleep 0.05
done

curl -fs -o /dev/null -X POST -H 'Content-Type: application/json' -d "{\"answer\":\"$UNKNOWN\"}" \
    "http://127.0.0.1:$sim_port/_sim/unknown-contact"
echo "upstream answers unknown contacts: $UNKNOWN"

metric() { curl -fs "http://$admin/metrics" | awk -v name="$1" '$1 == name {print $2}'; }
mib() { python3 -c "print(f'{$1 / 1048576:.1f}')"; }
idle=$(metric process_resident_memory_bytes)
echo "idle (ready, nothing cached): $idle bytes ($(mib "$idle") MiB)"

previous_rss=$idle
previous_entries=0
for set in "${WORKING_SETS[@]}"; do
    wrk -t1 -c16 -d600s -H "X-API-Key: $key" -s benches/compare.lua \
        "http://$listen" -- warm "$set" 1 >"$work/wrk-warm.txt" 2>&1
    entries=$(metric consent_proxy_cache_entries)
    rss=$(metric process_resident_memory_bytes)
    per=$(( (rss - previous_rss) / ( entries > previous_entries ? entries - previous_entries : 1) ))
    echo "cached $entries contacts: $rss bytes ($(mib "$rss") MiB), +$per bytes per contact since the last step"
    previous_rss=$rss
    previous_entries=$entries
done

wrk -t1 -c64 -d"${LOAD_S}s" -H "X-API-Key: $key" -s benches/compare.lua \
    "http://$listen" -- run "$largest" 1 >"$work/wrk-run.txt" 2>&1
rss=$(metric process_resident_memory_bytes)
echo "after ${LOAD_S}s of 64-connection load over $largest contacts: $rss bytes ($(mib "$rss") MiB); $(grep -o 'rps=[0-9.]*' "$work/wrk-run.txt")"
