#!/usr/bin/env python3
"""Start-to-ready time of a consent-proxy command: from spawning it to the first 200 of
GET /readyz on its admin address (polled every millisecond), then SIGTERM and a clean exit.

    start-to-ready.py --admin 127.0.0.1:19464 --runs 5 -- consent-proxy demo ...

--stop COMMAND stops it instead of a SIGTERM to the spawned process (for `podman run`, whose
client may not relay a signal: `--stop "podman kill --signal TERM NAME"`). Prints a summary:
the median, min and max in milliseconds and every run. Exits 1 when a run is not ready within
--timeout seconds or does not exit 0 when stopped."""

import argparse
import http.client
import shlex
import signal
import statistics
import subprocess
import sys
import time


def ready(admin: str) -> bool:
    host, port = admin.rsplit(":", 1)
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=0.5)
        conn.request("GET", "/readyz")
        status = conn.getresponse().status
        conn.close()
        return status == 200
    except OSError:
        return False


def one_run(command: list[str], admin: str, timeout: float, stop: str | None) -> float:
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not ready(admin):
            if child.poll() is not None:
                sys.exit(f"exited with {child.returncode} before ready: {child.stderr.read().decode()}")
            if time.monotonic() - started > timeout:
                sys.exit(f"not ready within {timeout} s: {' '.join(command)}")
            time.sleep(0.001)
        elapsed = time.monotonic() - started
    finally:
        if child.poll() is None:
            if stop:
                subprocess.run(shlex.split(stop), stdout=subprocess.DEVNULL, check=False)
            else:
                child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            sys.exit("no exit within 30 s of the stop")
    if code != 0:
        sys.exit(f"exit status {code} when stopped: {child.stderr.read().decode()}")
    return elapsed * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--admin", required=True, help="host:port of the admin listener")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--label", default="start-to-ready")
    parser.add_argument("--stop", help="a command that stops it (default: SIGTERM to it)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    times = [one_run(command, args.admin, args.timeout, args.stop) for _ in range(args.runs)]
    print(
        f"{args.label}: median {statistics.median(times):.1f} ms "
        f"(min {min(times):.1f}, max {max(times):.1f}, {len(times)} runs: "
        + ", ".join(f"{t:.1f}" for t in times)
        + ")"
    )


if __name__ == "__main__":
    main()
