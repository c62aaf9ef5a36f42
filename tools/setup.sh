#!/usr/bin/env bash
# Set up a fresh machine for dataplane: npm (Debian's, if none is installed),
# the pinned Deno (from the npm registry, through ./deno) and npm-side tools;
# with --test also what the test suite and benchmarks use: QEMU,
# qemu-storage-daemon, qemu-img, busybox-static, fio, gcc + libc headers (and
# gcc-multilib for the 32-bit KVM guest)
# (Debian packages), e2fsprogs + xfsprogs (the error-path tests' loop-mounted
# ext4 and its shutdown through xfs_io) and a Debian Linux kernel image unpacked
# into .cache/kernel/. The sync oracle of the durability tests needs tracefs
# (mounted by the tests at /sys/kernel/tracing if it is not), not a package.
# Idempotent: a second run installs nothing. Run as root or with sudo.
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

SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
}
# apt_install PKG...: installs the packages that are not installed yet.
apt_install() {
  local missing="" p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  [ -n "$missing" ] || return 0
  echo "setup: apt-get install$missing"
  apt_update
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# ./deno installs the pinned Deno (npm package `deno`) and node_modules/ with npm.
if ! command -v npm >/dev/null 2>&1; then
  apt_install ca-certificates npm
fi
./deno --version >/dev/null

if [ "$want_test" = 1 ]; then
  # qemu-system-x86: the guest VM (TCG); qemu-system-common: qemu-storage-daemon;
  # busybox-static: the guest userland; gcc + libc6-dev: struct layout tests;
  # e2fsprogs (mkfs.ext4) + xfsprogs (xfs_io shutdown): real EIO in error-path tests;
  # gcc-multilib: the 32-bit freestanding KVM guest of tests/vm/guest (gcc -m32).
  apt_install qemu-system-x86 qemu-utils qemu-system-common busybox-static fio gcc libc6-dev \
    e2fsprogs xfsprogs gcc-multilib
  # nbd-client: the kernel NBD client against the NBD export (used when /dev/nbd0 exists;
  # qemu-utils' qemu-img/qemu-io/qemu-nbd are the NBD export's other clients).
  apt_install nbd-client
  # nbdkit (memory plugin, delay and error filters): an NBD server for the nbd driver's tests.
  apt_install nbdkit
  # Ceph RBD: librbd1/librados2 (+ -dev headers for the prototype test), a one-monitor,
  # one-OSD memstore cluster for the rbd tests (ceph-mon, ceph-osd, ceph-common: the ceph
  # and rbd CLIs), and qemu-block-extra (QEMU's rbd driver, the tests' oracle).
  apt_install ceph-mon ceph-osd ceph-common librbd-dev librados-dev qemu-block-extra

  kdir=.cache/kernel
  if ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
    echo "setup: fetching the Debian kernel image into $kdir"
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
    if [ -z "$pkg" ]; then
      apt_update
      pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    fi
    [ -n "$pkg" ] || { echo "setup: cannot resolve linux-image-amd64" >&2; exit 1; }
    rm -rf .cache/deb && mkdir -p .cache/deb
    if ! (cd .cache/deb && apt-get download -qq "$pkg" 2>/dev/null); then
      apt_update # stale package lists: the listed version is gone from the mirror
      (cd .cache/deb && apt-get download -qq "$pkg")
    fi
    rm -rf "$kdir.partial" && mkdir -p "$kdir.partial"
    dpkg -x .cache/deb/"$pkg"_*.deb "$kdir.partial"
    rm -rf "$kdir" .cache/deb
    mv "$kdir.partial" "$kdir" # only a complete unpack counts as installed
  fi
fi
echo "setup: ok ($(./deno --version | head -1))"
