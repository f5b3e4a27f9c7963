#!/usr/bin/env python3
"""Instructions per request, counted by callgrind: repeatable whatever else the machine runs.

Wall-clock figures (benches/compare.sh) need quiet cores; instruction counts do not. This
counts, for one binary:
  sim  the simulator answering a consent GET directly (the no-proxy baseline)
  hit  consent-proxy answering a consent GET from its cache (X-API-Key)
Each process runs under `valgrind --tool=callgrind` twice, serving N and 3N keep-alive GETs
after a warm-up; the difference of the two totals over 2N is the cost of one request, with
start-up and shutdown cancelled out. Prints both and their ratio (hit/sim).

Usage: benches/hit_instructions.py BIN [BIN ...]   (N from the environment, default 2000)
Needs valgrind (Debian: apt-get install -y valgrind).
"""

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

N = int(os.environ.get("N", "2000"))
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


def gets(port, count, headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for _ in range(count):
        conn.request("GET", CONTACT, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            sys.exit(f"GET answered {response.status}")
    conn.close()


def under_callgrind(argv, port, requests, prepare, workdir):
    out = os.path.join(workdir, "callgrind.out")
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_port(port)
    headers = prepare(port)
    gets(port, 50, headers)  # warm-up: the token, the first fill, lazy tables
    gets(port, requests, headers)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    match = re.search(r"Collected\s*:\s*(\d+)", err)
    if not match:
        sys.exit(f"no callgrind total:\n{err[-2000:]}")
    return int(match.group(1))


def per_request(argv, port, prepare, workdir):
    small = under_callgrind(argv, port, N, prepare, workdir)
    large = under_callgrind(argv, port, 3 * N, prepare, workdir)
    return (large - small) / (2 * N)


def seeded_simulator(port):
    """Seeds the contact in a simulator and returns the headers of a GET with its token."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("PUT", "/_sim/contacts/%2B15550001234", body='{"status":"CONSENTED"}',
                 headers={"content-type": "application/json"})
    conn.getresponse().read()
    basic = base64.b64encode(f"bench:{SECRET}".encode()).decode()
    conn.request("POST", "/oauth/token", body="grant_type=client_credentials",
                 headers={"content-type": "application/x-www-form-urlencoded",
                          "authorization": f"Basic {basic}"})
    token = json.loads(conn.getresponse().read())["access_token"]
    conn.close()
    return {"authorization": f"Bearer {token}"}


def measure(binary):
    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        sim_cost = per_request(
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
            seeded_simulator(sim_port)
            port, admin = free_port(), free_port()
            config = os.path.join(workdir, "proxy.toml")
            with open(config, "w") as f:
                f.write(f"""
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
""")
            hit_cost = per_request([binary, "serve", "--config", config], port,
                                   lambda _: {"x-api-key": KEY}, workdir)
        finally:
            sim.terminate()
            sim.wait()
    return sim_cost, hit_cost


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(f"instructions per request (callgrind, N={N}):")
    print(f"{'binary':40} {'sim direct':>12} {'proxy hit':>12} {'hit/sim':>8}")
    for binary in sys.argv[1:]:
        sim_cost, hit_cost = measure(binary)
        print(f"{binary:40} {sim_cost:12.0f} {hit_cost:12.0f} {hit_cost / sim_cost:8.2f}")


if __name__ == "__main__":
    main()
