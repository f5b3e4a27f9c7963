#!/usr/bin/env bash
# Checks the Prometheus alerting rules shipped in deploy/prometheus/:
#   promtool check rules  deploy/prometheus/alerts.yml
#   promtool test rules   deploy/prometheus/tests/*.yml   (one unit-test file per alert)
# and that every alert in alerts.yml has a unit test. Exits non-zero on any failure.
# Needs promtool (Debian/Ubuntu: apt-get install -y prometheus).
set -euo pipefail
cd "$(dirname "$0")/.."

PROMTOOL=${PROMTOOL:-promtool}
if ! command -v "$PROMTOOL" >/dev/null 2>&1; then
    echo "check-deploy: promtool not found; install it: apt-get install -y prometheus" >&2
    exit 1
fi

rules=deploy/prometheus/alerts.yml
tests=(deploy/prometheus/tests/*.yml)
if [[ ! -e ${tests[0]} ]]; then
    echo "check-deploy: no rule tests in deploy/prometheus/tests/" >&2
    exit 1
fi

echo "check-deploy: $("$PROMTOOL" --version 2>&1 | head -n 1)"
"$PROMTOOL" check rules "$rules"
"$PROMTOOL" test rules "${tests[@]}"

# Every alert must be exercised by a unit test.
untested=()
while read -r alert; do
    grep -qE "alertname:[[:space:]]*${alert}[[:space:]]*$" "${tests[@]}" || untested+=("$alert")
done < <(sed -nE 's/^[[:space:]]*-?[[:space:]]*alert:[[:space:]]*([A-Za-z0-9_]+).*/\1/p' "$rules")
if ((${#untested[@]})); then
    echo "check-deploy: alerts without a unit test in deploy/prometheus/tests/: ${untested[*]}" >&2
    exit 1
fi
echo "check-deploy: OK"
