#!/usr/bin/env bash
# Builds the consent-proxy container image with podman, pulling nothing:
#   1. the release binary, statically linked against glibc (`-C target-feature=+crt-static`,
#      built for the explicit host target so build scripts and proc macros stay dynamic);
#   2. a build context holding only that binary;
#   3. `podman build -f deploy/container/Containerfile` (FROM scratch).
# Tags: localhost/consent-proxy:<version> and localhost/consent-proxy:latest (IMAGE overrides
# the name). Prints the image's name on stdout, its size on stderr.
# Needs podman (apt-get install -y podman runc); scripts/container-test.sh installs it.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/consent-proxy}
TARGET=${TARGET:-$(rustc -vV | sed -n 's/^host: //p')}
PODMAN=(podman --cgroup-manager=cgroupfs)

echo "container-build: static release binary for $TARGET" >&2
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$TARGET" --bin consent-proxy >&2
binary="${CARGO_TARGET_DIR:-target}/$TARGET/release/consent-proxy"
if ! file "$binary" 2>/dev/null | grep -q 'static'; then
    # `file` may be missing; ldd says "not a dynamic executable" for a static one.
    if ldd "$binary" >/dev/null 2>&1; then
        echo "container-build: $binary is not statically linked" >&2
        exit 1
    fi
fi

version=$("$binary" --version | awk '{print $2}')
commit=$("$binary" --version | sed -n 's/.*(commit \(.*\))/\1/p')
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$binary" "$context/consent-proxy"

echo "container-build: podman build $IMAGE:$version (commit $commit)" >&2
"${PODMAN[@]}" build --quiet --pull=never \
    -f deploy/container/Containerfile \
    --build-arg VERSION="$version" --build-arg COMMIT="$commit" \
    -t "$IMAGE:$version" -t "$IMAGE:latest" "$context" >/dev/null
size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE:latest")
echo "container-build: $IMAGE:latest is $size bytes ($(( (size + 524288) / 1048576 )) MiB); binary $(stat -c %s "$binary") bytes" >&2
echo "$IMAGE:latest"
