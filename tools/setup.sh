#!/usr/bin/env bash
# Set up a fresh machine for dataplane: the pinned Deno (from the npm registry,
# through ./deno) and npm-side tools, and with --test also what the test suite and benchmarks
# use: QEMU, qemu-img, qemu-storage-daemon, busybox-static, fio (Debian
# packages) and a Debian Linux kernel image unpacked into .cache/kernel/.
# Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
for a in "$@"; do
  case "$a" in
    --test) want_test=1 ;;
    -h|--help) echo "usage: tools/setup.sh [--test]"; exit 0 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

# ./deno installs the pinned Deno (npm package `deno`) and node_modules/ on first use.
./deno --version >/dev/null

if [ "$want_test" = 1 ]; then
  pkgs="qemu-system-x86 qemu-utils qemu-system-common busybox-static fio gcc"
  missing=""
  for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    echo "setup: apt-get install$missing"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi

  kdir=.cache/kernel
  if ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
    echo "setup: fetching the Debian kernel image into $kdir"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
    if [ -z "$pkg" ]; then
      $SUDO apt-get update -qq
      pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    fi
    [ -n "$pkg" ] || { echo "setup: cannot resolve linux-image-amd64" >&2; exit 1; }
    mkdir -p "$kdir" .cache/deb
    (cd .cache/deb && apt-get download -qq "$pkg")
    dpkg -x .cache/deb/"$pkg"_*.deb "$kdir"
    rm -rf .cache/deb
  fi
fi
echo "setup: ok ($(./deno --version | head -1))"
