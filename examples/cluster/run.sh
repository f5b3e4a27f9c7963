#!/usr/bin/env bash
# Three consent-proxy instances and one Redis on this machine, in front of the built-in Talkdesk
# simulator: cluster mode to try by hand (docs/cluster.md).
#
#   bash examples/cluster/run.sh            # start everything, print curl lines, wait for Ctrl-C
#   bash examples/cluster/run.sh --check    # run the walkthrough below by itself, then stop
#
# Everything listens on 127.0.0.1 on free ports and is stopped on exit (also on Ctrl-C).
# Needs redis-server (apt-get install -y redis-server), curl and python3 (for free ports).
# BIN=path/to/consent-proxy uses that binary; by default the release build is built.
# KEEP_WORKDIR=1 keeps the configurations and logs.
set -euo pipefail
cd "$(dirname "$0")/../.."

mode=${1:-serve}
case "$mode" in serve | --check) ;; *)
    echo "usage: $0 [--check]" >&2
    exit 2
    ;;
esac
for tool in redis-server curl python3; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "run.sh: $tool not found (apt-get install -y redis-server curl python3)" >&2
        exit 1
    }
done
if [[ -z ${BIN:-} ]]; then
    cargo build --release --quiet
    BIN=target/release/consent-proxy
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ ${KEEP_WORKDIR:-0} == 1 ]]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free loopback ports: Redis, the simulator, and a consent + admin port per instance.
read -r redis_port sim_port p1 p2 p3 a1 a2 a3 < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
listen=("$p1" "$p2" "$p3")
admin=("$a1" "$a2" "$a3")

start_redis() {
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$work" >"$work/redis.log" 2>&1 &
    redis_pid=$!
    pids+=("$redis_pid")
}
start_redis

api_key=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
python3 -c 'import secrets; print(secrets.token_hex(32))' >"$work/signing-key"
"$BIN" simulator --listen "127.0.0.1:$sim_port" --client-id example --client-secret example-secret \
    >"$work/simulator.log" 2>&1 &
pids+=($!)
serving=($!) # the simulator and the instances: what the example waits on (not Redis)

for i in 0 1 2; do
    cat >"$work/instance-$((i + 1)).toml" <<EOF
[server]
listen = "127.0.0.1:${listen[$i]}"
admin_listen = "127.0.0.1:${admin[$i]}"
[log]
level = "info"
[talkdesk]
api_base_url = "http://127.0.0.1:$sim_port"
token_url = "http://127.0.0.1:$sim_port/oauth/token"
client_id = "example"
client_secret = "example-secret"
[cluster]
redis_url = "redis://127.0.0.1:$redis_port"
max_staleness_ms = 1000
write_policy = "require"
[oauth]
signing_key_file = "$work/signing-key"
[[clients]]
name = "studio-ivr"
api_key = "$api_key"
permissions = ["read", "write", "admin"]
EOF
    "$BIN" serve --config "$work/instance-$((i + 1)).toml" >"$work/instance-$((i + 1)).log" 2>&1 &
    pids+=($!)
    serving+=($!)
done

# Waits until every instance is ready with its cluster feed live.
wait_live() {
    for i in 0 1 2; do
        for _ in $(seq 200); do
            curl -fsS "http://127.0.0.1:${admin[$i]}/readyz" 2>/dev/null | grep -q '"feed":"live"' && continue 2
            sleep 0.1
        done
        echo "instance $((i + 1)) did not become ready with its feed live; see $work/instance-$((i + 1)).log" >&2
        KEEP_WORKDIR=1
        exit 1
    done
}
wait_live

url() { echo "http://127.0.0.1:${listen[$1]}/voicebiometrics/contacts/%2B15551234567/consent"; }
get() { curl -sS -D - -o "$work/body" -H "X-API-Key: $api_key" "$(url "$1")" | tr -d '\r' | grep -i '^x-cache-status' | cut -d' ' -f2; }
status_of() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["status"])' "$work/body"; }
put() { curl -sS -o "$work/body" -w '%{http_code}' -X PUT -H "X-API-Key: $api_key" \
    -H 'Content-Type: application/json' -d "{\"status\":\"$2\"}" "$(url "$1")"; }

if [[ $mode == serve ]]; then
    cat <<EOF
Three instances in cluster mode, Redis on 127.0.0.1:$redis_port, the simulator on :$sim_port.
  instance 1: http://127.0.0.1:${listen[0]}  (admin http://127.0.0.1:${admin[0]})
  instance 2: http://127.0.0.1:${listen[1]}  (admin http://127.0.0.1:${admin[1]})
  instance 3: http://127.0.0.1:${listen[2]}  (admin http://127.0.0.1:${admin[2]})
API key: $api_key

  curl -i -X PUT -H 'X-API-Key: $api_key' -H 'Content-Type: application/json' -d '{"status":"CONSENTED"}' $(url 0)
  curl -i -H 'X-API-Key: $api_key' $(url 1)      # twice: MISS, then HIT
  curl -i -X PUT -H 'X-API-Key: $api_key' -H 'Content-Type: application/json' -d '{"status":"REFUSED"}' $(url 0)
  curl -i -H 'X-API-Key: $api_key' $(url 1)      # REFUSED at once: instance 1 announced the write
  curl -s http://127.0.0.1:${admin[1]}/readyz  # "cluster":{"feed":"live"}
  kill $redis_pid                                # Redis gone: GETs say BYPASS, PUTs 503 cluster_unavailable
  redis-server --port $redis_port --bind 127.0.0.1 --save '' --appendonly no --dir $work &   # back: the instances reconnect
Logs and configurations: $work. Ctrl-C stops everything.
EOF
    # Runs until Ctrl-C, or until the simulator or an instance exits; Redis may come and go.
    wait -n "${serving[@]}" || true
    echo "a process of the example exited; see the logs in $work" >&2
    KEEP_WORKDIR=1
    exit 1
fi

# --check: the walkthrough, asserted.
fail() { echo "check failed: $*" >&2; KEEP_WORKDIR=1; exit 1; }
[[ $(put 0 CONSENTED) == 20? ]] || fail "PUT CONSENTED through instance 1"
for i in 0 1 2; do get "$i" >/dev/null; done
for i in 1 2; do [[ $(get "$i") == HIT ]] || fail "instance $((i + 1)) does not hold the answer"; done
[[ $(put 0 REFUSED) == 200 ]] || fail "PUT REFUSED through instance 1"
for i in 1 2; do
    get "$i" >/dev/null
    [[ $(status_of) == REFUSED ]] || fail "instance $((i + 1)) answered $(status_of) after the write"
done
echo "check: a REFUSED written through instance 1 is read through instances 2 and 3 at once"
kill "$redis_pid"
wait "$redis_pid" 2>/dev/null || true
[[ $(put 1 CONSENTED) == 503 ]] || fail "a PUT without Redis was not refused"
grep -q cluster_unavailable "$work/body" || fail "no cluster_unavailable"
sleep 1.1 # max_staleness_ms: from then on no instance answers from its cache
[[ $(get 2) == BYPASS && $(status_of) == REFUSED ]] || fail "instance 3 without Redis"
echo "check: without Redis, PUTs are refused (503 cluster_unavailable) and GETs go upstream"
start_redis
wait_live
get 2 >/dev/null
[[ $(get 2) == HIT ]] || fail "instance 3 does not cache again"
echo "check: Redis back, the instances reconnected by themselves and cache again"
echo "check: OK"
