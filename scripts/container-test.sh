#!/usr/bin/env bash
# Builds the container image (scripts/container-build.sh) and checks that it runs, with podman
# and runc on this machine (installed when missing); nothing is pulled from a registry.
#
#   1. the image: FROM scratch, a non-root user, no shell, its size;
#   2. `--version` inside it names the same build as the host binary;
#   3. `demo` inside it (read-only root, no capabilities): /healthz, /readyz, the demo's GET,
#      PUT and GET answered from inside the container, x-request-id on the admin port, the
#      build_info metric, and SIGTERM → "stopped" logged, exit 0;
#   4. `serve` inside it as Kubernetes runs it: the configuration and a secret mounted
#      read-only as files, the Talkdesk simulator (in a second container) reached by a DNS
#      name, resolved through a resolver this script runs (the static binary resolves names
#      without the glibc NSS libraries a scratch image lacks);
#   5. cold start-to-ready (process start → /readyz 200, simulator included), in the container
#      and on the host, RUNS times each (default 5), printed with their ratio.
#
# Containers run as `podman --cgroup-manager=cgroupfs run --runtime runc --network host` with
# explicit --ulimit values (what works on this VM). Every container is removed on exit.
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
# The target scripts/container-build.sh builds for (its default: the host's).
export TARGET=${TARGET:-$(rustc -vV | sed -n 's/^host: //p')}
PODMAN=(podman --cgroup-manager=cgroupfs)
nofile=$(ulimit -Hn)
[[ $nofile == unlimited || $nofile -gt 65536 ]] && nofile=65536
RUN=("${PODMAN[@]}" run --runtime runc --network host
    --ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096
    --read-only --cap-drop=all --security-opt=no-new-privileges)

step() { printf '\n==> container-test: %s\n' "$*"; }
fail() { echo "container-test: FAILED: $*" >&2; exit 1; }

# --- tools ------------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ((${#missing[@]})); then
    step "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work=$(mktemp -d)
names=()
pids=()
cleanup() {
    for name in "${names[@]}"; do "${PODMAN[@]}" rm -f -t 0 "$name" >/dev/null 2>&1 || true; done
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Polls (every 20 ms, at most 30 s) until `curl -fs URL` succeeds.
wait_for() {
    local url=$1 deadline=$((SECONDS + 30))
    until curl -fs -o /dev/null "$url"; do
        ((SECONDS < deadline)) || fail "$url did not answer 2xx within 30 s"
        sleep 0.02
    done
}

# Starts a detached container named $1 with the rest as `podman run` arguments.
start_container() {
    local name=$1
    shift
    names+=("$name")
    "${RUN[@]}" -d --name "$name" "$@" >/dev/null
}

# SIGTERM to container $1; prints its exit status (the container is kept for its logs).
stop_container() {
    "${PODMAN[@]}" kill --signal TERM "$1" >/dev/null
    "${PODMAN[@]}" wait "$1"
}

# --- 1. the image -------------------------------------------------------------------------------
step "build"
image=$(bash scripts/container-build.sh)
binary="${CARGO_TARGET_DIR:-target}/$TARGET/release/consent-proxy"

step "the image"
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$image")
user=$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$image")
layers=$("${PODMAN[@]}" image inspect --format '{{len .RootFS.Layers}}' "$image")
echo "image $image: $size bytes, user $user, $layers layer(s)"
[[ -n $user && ${user%%:*} != 0 && ${user%%:*} != root ]] || fail "the image runs as root ($user)"
[[ $layers == 1 ]] || fail "expected one layer (FROM scratch + the binary), got $layers"
if "${RUN[@]}" --rm --entrypoint /bin/sh "$image" -c true >/dev/null 2>&1; then
    fail "the image has a shell"
fi
echo "no /bin/sh in the image: ok"

# --- 2. --version ---------------------------------------------------------------------------------
step "--version"
inside=$("${RUN[@]}" --rm "$image" --version)
outside=$("$binary" --version)
echo "container: $inside"
[[ $inside == "$outside" ]] || fail "container says '$inside', host binary '$outside'"
[[ $inside =~ \(commit\ [0-9a-f]{7,}\)$ ]] || fail "no commit in '$inside'"

# --- 3. demo --------------------------------------------------------------------------------------
step "demo inside the container"
key=container-test-key-$RANDOM$RANDOM-0123456789
listen=127.0.0.1:$(free_port)
admin=127.0.0.1:$(free_port)
demo=consent-proxy-test-demo-$$
start_container "$demo" "$image" demo --listen "$listen" --admin-listen "$admin" --api-key "$key"
wait_for "http://$admin/readyz"
health=$(curl -si -H 'x-request-id: container-check-1' "http://$admin/healthz")
echo "$health" | head -n 1
grep -q '^HTTP/1.1 200' <<<"$health" || fail "/healthz: $health"
grep -qi '^x-request-id: container-check-1' <<<"$health" || fail "/healthz without x-request-id"
url="http://$listen/voicebiometrics/contacts/%2B15551234567/consent"
got=$(curl -fs -H "X-API-Key: $key" "$url")
[[ $got == '{"status":"CONSENTED"}' ]] || fail "demo GET answered $got"
put=$(curl -fs -X PUT -H "X-API-Key: $key" -H 'Content-Type: application/json' \
    -d '{"status":"REFUSED"}' "$url")
[[ $put == '{"status":"REFUSED"}' ]] || fail "demo PUT answered $put"
got=$(curl -fs -H "X-API-Key: $key" "$url")
[[ $got == '{"status":"REFUSED"}' ]] || fail "GET after the PUT answered $got"
echo "demo GET → CONSENTED, PUT REFUSED, GET → REFUSED: ok"
build_info=$(curl -fs "http://$admin/metrics" | grep '^consent_proxy_build_info')
echo "$build_info"
grep -q "commit=\"$(sed 's/.*(commit \(.*\))/\1/' <<<"$inside")\"" <<<"$build_info" ||
    fail "build_info does not name the image's commit"
rss=$(curl -fs "http://$admin/metrics" | awk '/^process_resident_memory_bytes/ {print $2}')
echo "demo RSS after 3 requests: $rss bytes"
status=$(stop_container "$demo")
logs=$("${PODMAN[@]}" logs "$demo" 2>&1)
[[ $status == 0 ]] || fail "demo exited $status on SIGTERM: $logs"
grep -q 'consent_proxy: shutting down' <<<"$logs" || fail "no draining line in the logs"
grep -q 'consent_proxy: stopped' <<<"$logs" || fail "no stopped line in the logs"
echo "SIGTERM: drained, exit 0"

# --- 4. serve as Kubernetes runs it -------------------------------------------------------------
step "serve with mounted configuration and secret, the upstream found by DNS"
# A resolver on a loopback address of its own that answers A queries for *.consent-proxy.test
# with 127.0.0.1 and NXDOMAIN for anything else; the container's /etc/resolv.conf points at it.
resolver=127.0.0.153
cat >"$work/dns.py" <<'PY'
import socket, struct, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    query, peer = sock.recvfrom(512)
    ident, flags, qdcount = struct.unpack("!HHH", query[:6])
    at, labels = 12, []
    while query[at]:
        labels.append(query[at + 1:at + 1 + query[at]].decode().lower())
        at += 1 + query[at]
    qtype = struct.unpack("!H", query[at + 1:at + 3])[0]
    question = query[12:at + 5]
    name = ".".join(labels)
    known = name.endswith(".consent-proxy.test")
    answers = b""
    if known and qtype == 1:
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + socket.inet_aton("127.0.0.1")
    print(f"query {qtype} {name}", flush=True)
    rcode = 0 if known else 3
    header = struct.pack("!HHHHHH", ident, 0x8180 | rcode, 1, 1 if answers else 0, 0, 0)
    sock.sendto(header + question + answers, peer)
PY
python3 "$work/dns.py" "$resolver" >"$work/dns.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q ready "$work/dns.log" && break; sleep 0.02; done
grep -q ready "$work/dns.log" || fail "the test resolver did not start: $(cat "$work/dns.log")"
echo "nameserver $resolver" >"$work/resolv.conf"

sim_port=$(free_port)
client_secret=container-test-secret-$RANDOM$RANDOM
simulator=consent-proxy-test-sim-$$
start_container "$simulator" "$image" simulator --listen "127.0.0.1:$sim_port" \
    --client-id container-test --client-secret "$client_secret"
wait_for "http://127.0.0.1:$sim_port/_sim/stats"

mkdir -p "$work/etc/secrets"
listen=127.0.0.1:$(free_port)
admin=127.0.0.1:$(free_port)
cat >"$work/etc/config.toml" <<EOF
[server]
listen = "$listen"
admin_listen = "$admin"
[talkdesk]
api_base_url = "http://sim.consent-proxy.test:$sim_port"
token_url = "http://sim.consent-proxy.test:$sim_port/oauth/token"
client_id = "container-test"
client_secret_file = "/etc/consent-proxy/secrets/client_secret"
[[clients]]
name = "studio-ivr"
api_key_file = "/etc/consent-proxy/secrets/studio-ivr"
permissions = ["read", "write"]
EOF
printf '%s\n' "$client_secret" >"$work/etc/secrets/client_secret"
printf '%s\n' "$key" >"$work/etc/secrets/studio-ivr"
chmod -R a+rX "$work/etc"
serve=consent-proxy-test-serve-$$
# The image's default command: serve --config /etc/consent-proxy/config.toml.
start_container "$serve" -v "$work/etc:/etc/consent-proxy:ro" \
    -v "$work/resolv.conf:/etc/resolv.conf:ro" "$image"
wait_for "http://$admin/readyz"
got=$(curl -fs -H "X-API-Key: $key" "http://$listen/voicebiometrics/contacts/%2B15550001111/consent" \
    -X PUT -H 'Content-Type: application/json' -d '{"status":"CONSENTED"}')
[[ $got == '{"status":"CONSENTED"}' ]] || fail "PUT through serve answered $got"
grep -q 'query 1 sim.consent-proxy.test' "$work/dns.log" ||
    fail "the name was not resolved through the test resolver: $(cat "$work/dns.log")"
echo "serve: ready, token and PUT through sim.consent-proxy.test:$sim_port (resolved by DNS): ok"
status=$(stop_container "$serve")
[[ $status == 0 ]] || fail "serve exited $status on SIGTERM: $("${PODMAN[@]}" logs "$serve" 2>&1)"
status=$(stop_container "$simulator")
[[ $status == 0 ]] || fail "the simulator exited $status on SIGTERM"

# --- 5. cold start-to-ready ------------------------------------------------------------------------
step "cold start-to-ready (process start → /readyz 200, with the simulator), $RUNS runs each"
admin=127.0.0.1:$(free_port)
listen=127.0.0.1:$(free_port)
demo_args=(demo --listen "$listen" --admin-listen "$admin" --api-key "$key")
host_line=$(python3 scripts/start-to-ready.py --admin "$admin" --runs "$RUNS" --label host -- \
    "$binary" "${demo_args[@]}")
start_name=consent-proxy-test-start-$$
names+=("$start_name")
container_line=$(python3 scripts/start-to-ready.py --admin "$admin" --runs "$RUNS" \
    --label container --stop "${PODMAN[*]} kill --signal TERM $start_name" -- \
    "${RUN[@]}" --rm --name "$start_name" "$image" "${demo_args[@]}")
echo "$host_line"
echo "$container_line"
host_ms=$(sed -n 's/.*median \([0-9.]*\) ms.*/\1/p' <<<"$host_line")
container_ms=$(sed -n 's/.*median \([0-9.]*\) ms.*/\1/p' <<<"$container_line")
python3 -c "print(f'container / host start-to-ready: {$container_ms / $host_ms:.1f}x')"

step "summary"
echo "image $image: $size bytes ($(python3 -c "print(f'{$size/1048576:.1f}')") MiB)"
echo "binary (static, stripped): $(stat -c %s "$binary") bytes"
echo "start-to-ready median: host $host_ms ms, container $container_ms ms"
echo "container-test: OK"
