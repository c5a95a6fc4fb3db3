#!/bin/sh
# Build the real vfio-user peer (libvfio-user's C samples) from the pinned source tarball.
#
#   tools/build_peers.sh            (or `make peers`)
#
# PEERS_TARBALL: the tarball (default ../shared/peers/libvfio-user-efd091b.tar.gz beside the checkout,
#                or beside the main checkout of a git worktree)
# PEERS_CACHE:   where it is unpacked and built (default .cache/peers in the checkout)
#
# Installs the Debian packages the build needs when run as root. A second run
# with the sample already built does nothing. Exits non-zero, saying why, when
# the peer cannot be built.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NAME=libvfio-user-efd091b
TARBALL=${PEERS_TARBALL:-$ROOT/../shared/peers/$NAME.tar.gz}
if [ -z "${PEERS_TARBALL:-}" ] && [ ! -f "$TARBALL" ]; then
    # A git worktree lies elsewhere: look beside the main checkout too.
    common=$(git -C "$ROOT" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
    if [ -n "$common" ] && [ -f "$(dirname "$common")/../shared/peers/$NAME.tar.gz" ]; then
        TARBALL=$(dirname "$common")/../shared/peers/$NAME.tar.gz
    fi
fi
CACHE=${PEERS_CACHE:-$ROOT/.cache/peers}
SRC=$CACHE/$NAME
SAMPLE=$SRC/build/samples/gpio-pci-idio-16
PACKAGES="meson ninja-build libjson-c-dev libcmocka-dev"

if [ -x "$SAMPLE" ]; then
    exit 0
fi

if [ ! -f "$TARBALL" ]; then
    echo "build_peers: the libvfio-user source $TARBALL is missing; set PEERS_TARBALL to its path" >&2
    exit 1
fi

missing=""
for p in $PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "build_peers: installing$missing"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >/dev/null ||
            { echo "build_peers: apt-get install of$missing failed" >&2; exit 1; }
    else
        echo "build_peers: missing Debian packages:$missing (install them as root)" >&2
        exit 1
    fi
fi

mkdir -p "$CACHE"
# A half-finished earlier run leaves a tree without the sample: start it again.
rm -rf "$SRC"
tar xzf "$TARBALL" -C "$CACHE"
cd "$SRC"
meson setup build --buildtype=release -Dtran-pipe=false >build-setup.log 2>&1 ||
    { tail -20 build-setup.log >&2; echo "build_peers: meson setup failed (log: $SRC/build-setup.log)" >&2; exit 1; }
ninja -C build >build.log 2>&1 ||
    { tail -20 build.log >&2; echo "build_peers: ninja failed (log: $SRC/build.log)" >&2; exit 1; }
test -x "$SAMPLE" || { echo "build_peers: $SAMPLE was not built" >&2; exit 1; }
echo "build_peers: built $SAMPLE"
