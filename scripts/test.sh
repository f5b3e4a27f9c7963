#!/usr/bin/env bash
# Runs every test of consent-proxy: unit and integration tests (cargo test), the Prometheus
# rule tests, the bounded soak tests (one proxy; three in cluster mode), the schemathesis run
# against `consent-proxy demo` and the container image built and run with podman
# (scripts/container-test.sh). Installs what a fresh machine lacks first (Debian packages:
# prometheus, redis-server for the cluster tests, tinyproxy for the egress tests, postgresql for
# the audit store's, podman; the oidc-provider npm package, Python
# virtualenvs for the OAuth client test, the OTLP receiver and schemathesis). Exits non-zero on the first
# failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step is announced, and the one before it is closed with the time it took.
step_name=""
step_started=$SECONDS
script_started=$SECONDS
step() {
    end_step
    step_name="$*"
    step_started=$SECONDS
    printf '\n==> %s\n' "$*"
}
end_step() {
    if [[ -n $step_name ]]; then
        printf '<== %s: %ds\n' "$step_name" $((SECONDS - step_started))
    fi
}

# --- what the tests need --------------------------------------------------------------------
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v tinyproxy >/dev/null 2>&1 || missing+=(tinyproxy)
# The audit store's tests start their own PostgreSQL (/usr/lib/postgresql/*/bin) and make a
# SQLite file immutable with chattr.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
command -v chattr >/dev/null 2>&1 || missing+=(e2fsprogs)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
python3 -c 'import venv' >/dev/null 2>&1 || missing+=(python3-venv)
python3 -c 'import yaml' >/dev/null 2>&1 || missing+=(python3-yaml)
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
if ((${#missing[@]})); then
    step "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# A packaged Prometheus, Redis or PostgreSQL service that runs here is left alone: the tests
# start their own redis-server, Prometheus and PostgreSQL servers on free ports.

step "npm ci (oidc-provider for the OAuth compatibility test)"
npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error

step "Python virtualenv with Authlib (the independent client of tests/integration/external/oauth.rs)"
bash scripts/python-venv.sh .venv-oauth-client scripts/requirements-oauth-client.txt

step "Python virtualenv with opentelemetry-proto (the independent OTLP receiver of tests/integration/external/otel.rs)"
bash scripts/python-venv.sh .venv-otlp-receiver scripts/requirements-otlp-receiver.txt

# --- the tests ------------------------------------------------------------------------------
step "cargo test"
cargo test

step "Prometheus rules (promtool check/test rules)"
bash scripts/check-deploy.sh

step "soak test (bounded)"
cargo test --test integration -- --ignored --nocapture soak::

step "cluster soak: three instances, Redis restarts (bounded)"
cargo test --test integration -- --ignored --nocapture external::cluster::

step "schemathesis against consent-proxy demo"
bash scripts/schemathesis.sh

step "container image (podman build, run demo and serve inside it)"
bash scripts/container-test.sh

end_step
step_name=""
printf '\n==> all tests passed in %ds\n' $((SECONDS - script_started))
