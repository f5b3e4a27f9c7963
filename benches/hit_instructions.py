#!/usr/bin/env python3
"""Instructions and allocations per request, counted by callgrind: repeatable whatever else
the machine runs.

Wall-clock figures (benches/compare.sh) need quiet cores; instruction counts do not. This
counts, for one binary:
  sim   the simulator answering a consent GET directly (the no-proxy baseline)
  hit   consent-proxy answering a consent GET from its cache (X-API-Key)
  miss  consent-proxy answering a consent GET it has not cached: every request a new contact,
        so each one leads a fill that goes to the simulator (the proxy's instructions only; the
        simulator runs outside valgrind and answers unknown contacts 200 NO_CONSENT)
  close (only when SCENARIOS names it) a cache hit on a new connection each
        (`Connection: close`): what a connection's accept, task and teardown add to a hit

With NGINX=1 it also counts nginx (one process, `master_process off`) with benches/nginx.conf,
the configuration of benches/compare.sh's targets c and f, in front of the same simulator:
  nginx hit   a `proxy_cache` hit (target c)
  nginx pass  plain `proxy_pass` of a new contact each (target f: nginx's miss, against the
              proxy's)
  bare  with BARE_BIN set, the bare hyper server of benches/bare_hyper.rs answering a static
        consent body: the limit a hit is measured against (hit/bare)

With OTEL_SAMPLE_RATIOS (e.g. "0.01,1.0") it also counts, for each ratio, a cache hit with
tracing on (`otel.sample_ratio` = that ratio, spans exported to a collector stand-in outside
valgrind that answers 200), printed as "hit, traced at R" beside the plain hit of the same run.
SCENARIOS (default "sim,hit,miss") picks which of sim, hit, miss and close to count (with
BARE_BIN, close counts the bare server's new connections too).

Each process runs under `valgrind --tool=callgrind` twice, serving N and 3N keep-alive GETs
after a warm-up; the difference of the two totals over 2N is the cost of one request, with
start-up and shutdown cancelled out. Allocations are the calls to malloc, calloc and realloc
in callgrind's call graph, differenced the same way. Prints instructions and allocations per
request of each, and hit/sim.

With PROFILE=1 it also prints, for hit and miss, where a request's instructions go: the
inclusive cost per request of the functions matching PROFILE_MATCH (a regular expression;
default: the proxy's own functions and the libraries a request goes through), from the 3N run;
with PROFILE_KEEP=DIR the callgrind output files too (for callgrind_annotate).

Usage: benches/hit_instructions.py BIN [BIN ...]   (N from the environment, default 2000;
       BARE_BIN: `cargo bench --no-run --bench bare_hyper`'s executable)
Needs valgrind (Debian: apt-get install -y valgrind).
"""

import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = "bench-key-0123456789abcdef"
SECRET = "bench-secret-0123456789"
CONTACT = "/voicebiometrics/contacts/%2B15550001234/consent"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=120):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"port {port} did not open")


N = int(os.environ.get("N", "2000"))
BARE_BIN = os.environ.get("BARE_BIN")
PROFILE = os.environ.get("PROFILE") == "1"
PROFILE_MATCH = os.environ.get(
    "PROFILE_MATCH",
    r"consent_proxy::|sha2::|moka::|prometheus::|tracing|hyper::proto|hyper_util::client"
    r"|hyper::client|tokio::runtime::task|^malloc|^free|^realloc",
)
ALLOCATORS = {"malloc", "calloc", "realloc", "mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned"}
SCENARIOS = os.environ.get("SCENARIOS", "sim,hit,miss").split(",")
OTEL_SAMPLE_RATIOS = [r for r in os.environ.get("OTEL_SAMPLE_RATIOS", "").split(",") if r]
NGINX = os.environ.get("NGINX") == "1"
NGINX_CONF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nginx.conf")


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector stand-in: every export answered 200, its body dropped."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def start_collector():
    """A collector stand-in on a thread of this script (outside valgrind); returns its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def wait_ready(admin_port, limit=300):
    """Until the proxy's /readyz answers 200 (its upstream token in hand): under valgrind on a
    loaded machine the first token can take a while."""
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=30)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"the proxy was not ready within {limit} s")


def contact_path(index):
    return f"/voicebiometrics/contacts/%2B1555{index:07}/consent"


def gets(port, count, headers, first=None, close=False):
    """`count` GETs on one connection (`close`: each on a new one): of CONTACT, or of contacts
    first, first+1, ..."""
    conn = None
    for i in range(count):
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        path = CONTACT if first is None else contact_path(first + i)
        conn.request("GET", path, headers={**headers, "connection": "close"} if close else headers)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            sys.exit(f"GET answered {response.status}: {body[:300]!r}")
        if close:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def allocations(callgrind_out):
    """Calls to the allocator's entry points in a callgrind output file."""
    names, total, target = {}, 0, None
    with open(callgrind_out) as f:
        for line in f:
            if line.startswith("cfn="):
                match = re.match(r"cfn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
                if match:
                    if match.group(2):
                        names[match.group(1)] = match.group(2)
                    target = names.get(match.group(1))
                else:
                    target = line[4:].strip()
            elif line.startswith("fn="):
                match = re.match(r"fn=\((\d+)\) (.*)", line.rstrip("\n"))
                if match:
                    names[match.group(1)] = match.group(2)
            elif line.startswith("calls=") and target in ALLOCATORS:
                total += int(line[6:].split()[0])
    return total


def profile(callgrind_out, requests):
    """Inclusive instructions per request of the functions matching PROFILE_MATCH."""
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", callgrind_out],
        capture_output=True, text=True, check=True).stdout
    pattern = re.compile(PROFILE_MATCH)
    rows = []
    for line in annotated.splitlines():
        # "  1,234 (12.3%)  /path/to/file.rs:name [/path/to/object]"; the file may be "???".
        match = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+[^ :]+:(.*?)(?: \[[^\]]*\])?$", line)
        if not match:
            continue
        cost, name = int(match.group(1).replace(",", "")), match.group(2).strip()
        if pattern.search(name) and cost / requests >= 50:
            rows.append((cost / requests, name))
    return rows


def under_callgrind(argv, port, requests, prepare, workdir, first, keep=None, close=False):
    """Total instructions and allocations of a process serving `requests` GETs; `keep`: a
    label to profile the run under (and keep its output as, in PROFILE_KEEP)."""
    out = os.path.join(workdir, "callgrind.out")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_port(port)
    headers = prepare(port)
    warm_up = 50  # the token, the first fill, lazy tables
    gets(port, warm_up, headers, first, close)
    gets(port, requests, headers, None if first is None else first + warm_up, close)
    proc.send_signal(signal.SIGTERM)
    # nginx under valgrind notices the signal only when its event loop wakes: a connection
    # wakes it (the others ignore it; it is the same in both runs, so it cancels out).
    for _ in range(600):
        try:
            _, err = proc.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                pass
    else:
        proc.kill()
        sys.exit(f"{argv[0]} did not exit on SIGTERM")
    match = re.search(r"Collected\s*:\s*(\d+)", err)
    if not match:
        sys.exit(f"no callgrind total:\n{err[-2000:]}")
    rows = None
    if keep:
        rows = profile(out, requests + warm_up)
        if os.environ.get("PROFILE_KEEP"):
            kept = os.path.join(os.environ["PROFILE_KEEP"], f"callgrind.{keep}.out")
            shutil.copyfile(out, kept)
            print(f"kept {kept}")
    return int(match.group(1)), allocations(out), rows


def per_request(argv, port, prepare, workdir, distinct=False, label=None, close=False):
    """(instructions, allocations) per request; prints the profile of the 3N run if asked."""
    first = 0 if distinct else None
    small, small_allocs, _ = under_callgrind(argv, port, N, prepare, workdir, first, close=close)
    large, large_allocs, rows = under_callgrind(
        argv, port, 3 * N, prepare, workdir, first,
        keep=label if PROFILE and label is not None else None, close=close)
    if rows:
        print(f"\n{label}: inclusive instructions per request (3N run), by function")
        for cost, name in rows:
            print(f"  {cost:10.0f}  {name[:150]}")
        print()
    return (large - small) / (2 * N), (large_allocs - small_allocs) / (2 * N)


def seeded_simulator(port):
    """Seeds the contact in a simulator and returns the headers of a GET with its token."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("PUT", "/_sim/contacts/%2B15550001234", body='{"status":"CONSENTED"}',
                 headers={"content-type": "application/json"})
    conn.getresponse().read()
    # Unknown contacts (the misses) answer 200 NO_CONSENT, as in benches/compare.sh.
    conn.request("POST", "/_sim/unknown-contact", body='{"answer":"no_consent"}',
                 headers={"content-type": "application/json"})
    conn.getresponse().read()
    basic = base64.b64encode(f"bench:{SECRET}".encode()).decode()
    conn.request("POST", "/oauth/token", body="grant_type=client_credentials",
                 headers={"content-type": "application/x-www-form-urlencoded",
                          "authorization": f"Basic {basic}"})
    token = json.loads(conn.getresponse().read())["access_token"]
    conn.close()
    return {"authorization": f"Bearer {token}"}


def proxy_config(port, admin, sim_port, otel=""):
    return f"""
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
[log]
level = "warn"
[talkdesk]
api_base_url = "http://127.0.0.1:{sim_port}"
token_url = "http://127.0.0.1:{sim_port}/oauth/token"
client_id = "bench"
client_secret = "{SECRET}"
[[clients]]
name = "bench"
api_key = "{KEY}"
permissions = ["read"]
{otel}"""


def measure(binary):
    """{scenario: (instructions, allocations) per request}"""
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        if "sim" in SCENARIOS:
            port = free_port()
            results["sim"] = per_request(
                [binary, "simulator", "--listen", f"127.0.0.1:{port}", "--client-id", "bench",
                 "--client-secret", SECRET],
                port, seeded_simulator, workdir)

        sim_port = free_port()
        sim = subprocess.Popen(
            [binary, "simulator", "--listen", f"127.0.0.1:{sim_port}",
             "--client-id", "bench", "--client-secret", SECRET, "--token-ttl-s", "86400"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(sim_port)
            token = seeded_simulator(sim_port)["authorization"].removeprefix("Bearer ")
            if NGINX and binary == sys.argv[1]:
                results.update(measure_nginx(sim_port, token))
            collector = start_collector() if OTEL_SAMPLE_RATIOS else None
            runs = [(name, "") for name in ("hit", "miss", "close") if name in SCENARIOS]
            runs += [(f"hit, traced at {ratio}",
                      f'[otel]\nendpoint = "{collector}"\nsample_ratio = {ratio}\n')
                     for ratio in OTEL_SAMPLE_RATIOS]
            for name, otel in runs:
                port, admin = free_port(), free_port()
                config = os.path.join(workdir, "proxy.toml")
                with open(config, "w") as f:
                    f.write(proxy_config(port, admin, sim_port, otel))

                def ready(_, admin=admin):
                    wait_ready(admin)
                    return {"x-api-key": KEY}

                label = f"{os.path.basename(binary)}-{name.replace(' ', '').replace(',', '-')}"
                results[name] = per_request([binary, "serve", "--config", config], port, ready,
                                            workdir, distinct=name == "miss", label=label,
                                            close=name == "close")
        finally:
            sim.terminate()
            sim.wait()
    return results


def nginx_config(workdir, port, pass_port, sim_port, token):
    """benches/nginx.conf as compare.sh fills it in, as one process (valgrind follows one)."""
    cache = os.path.join(workdir, "nginx-cache")
    os.makedirs(cache, exist_ok=True)
    with open(NGINX_CONF) as f:
        text = f.read()
    for name, value in {
        "@WORKDIR@": workdir, "@CACHE_DIR@": cache, "@KEYS_ZONE_MB@": "16",
        "@MAX_SIZE_MB@": "256", "@BACKEND@": f"127.0.0.1:{sim_port}", "@PORT@": str(port),
        "@PASS_PORT@": str(pass_port), "@TOKEN@": token, "@VALID@": "1d", "@DIRECTIVES@": "",
    }.items():
        text = text.replace(name, value)
    text = text.replace("master_process on;", "master_process off;")
    if os.geteuid() == 0:
        text = "user root;\n" + text
    config = os.path.join(workdir, "nginx.conf")
    with open(config, "w") as f:
        f.write(text)
    return ["nginx", "-p", workdir, "-e", os.path.join(workdir, "nginx-error.log"), "-c", config]


def measure_nginx(sim_port, token):
    """{"nginx hit": ..., "nginx pass": ...}: (instructions, allocations) per request."""
    results = {}
    for name in ("nginx hit", "nginx pass"):
        with tempfile.TemporaryDirectory() as workdir:
            port, pass_port = free_port(), free_port()
            argv = nginx_config(workdir, port, pass_port, sim_port, token)
            results[name] = per_request(
                argv, port if name == "nginx hit" else pass_port, lambda _: {}, workdir,
                distinct=name == "nginx pass", label=name.replace(" ", "-"))
    return results


def measure_bare(close=False):
    """(instructions, allocations) per request of the bare hyper server (`close`: each on a new
    connection)."""
    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        return per_request([BARE_BIN, "--listen", f"127.0.0.1:{port}"], port, lambda _: {},
                           workdir, label="bare-close" if close else "bare", close=close)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    measured = [(binary, measure(binary)) for binary in sys.argv[1:]]
    print(f"per request (callgrind, N={N}): instructions, and allocations in brackets")
    if BARE_BIN:
        instructions, allocs = measure_bare()
        print(f"bare hyper server: {instructions:.0f} ({allocs:.1f}); hit/bare: "
              + ", ".join(f"{r['hit'][0] / instructions:.2f}" for _, r in measured if "hit" in r))
    if BARE_BIN and "close" in SCENARIOS:
        instructions, allocs = measure_bare(close=True)
        print(f"bare hyper server, new connection each: {instructions:.0f} ({allocs:.1f}); "
              "close/bare: "
              + ", ".join(f"{r['close'][0] / instructions:.2f}" for _, r in measured
                          if "close" in r))
    print(f"{'binary':40} {'sim direct':>16} {'proxy hit':>16} {'proxy miss':>16} {'hit/sim':>8}")

    def cell(r, k):
        return f"{r[k][0]:.0f} ({r[k][1]:.1f})" if k in r else "-"

    for binary, r in measured:
        cells = [cell(r, k) for k in ("sim", "hit", "miss")]
        ratio = f"{r['hit'][0] / r['sim'][0]:.2f}" if "hit" in r and "sim" in r else "-"
        print(f"{binary:40} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} {ratio:>8}")
        if "close" in r:
            print(f"  hit on a new connection each: {cell(r, 'close')}")
        if "nginx hit" in r:
            print(f"  nginx (benches/nginx.conf), proxy_cache hit: {cell(r, 'nginx hit')};"
                  f" proxy_pass of a new contact: {cell(r, 'nginx pass')}")
        for ratio in OTEL_SAMPLE_RATIOS:
            name = f"hit, traced at {ratio}"
            against = f", {r[name][0] / r['hit'][0]:.3f} x the plain hit" if "hit" in r else ""
            print(f"  {name}: {cell(r, name)}{against}")


if __name__ == "__main__":
    main()
