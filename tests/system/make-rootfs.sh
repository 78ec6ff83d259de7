#!/usr/bin/env bash
# Build (once) a Debian 12 rootfs that boots under systemd-nspawn, with the given packages
# pre-installed, and keep it as a tarball keyed by a hash of the architecture and the package list:
#   make-rootfs.sh [--arch ARCH] CACHE_DIR PKG...   -> prints the tarball path
# Re-runs with the same list reuse the tarball. Needs root and debootstrap. A foreign ARCH (arm64 on
# an amd64 host) needs qemu-user-static with its binfmt_misc entries registered (F flag): debootstrap
# runs the second stage through it, and so do the container's programs later.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin   # debootstrap is in /usr/sbin
arch=$(dpkg --print-architecture)
if [ "${1:-}" = "--arch" ]; then arch=$2; shift 2; fi
cache=$1; shift
suite=bookworm
mirror=${FORGED_TEST_MIRROR:-}
if [ -z "$mirror" ]; then
  # The host's Debian mirror (deb822 or one-line sources), else the public one.
  mirror=$(sed -n 's/^URIs:[[:space:]]*\(http[^ ]*debian\)\/*$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  [ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
fi
pkgs=$(printf '%s\n' systemd systemd-sysv dbus curl "$@" | sort -u | paste -sd, -)
if [ "$arch" = "$(dpkg --print-architecture)" ]; then
  key=$(printf '%s %s' "$suite" "$pkgs" | sha256sum | cut -c1-16)   # as before arm64 came: caches stay valid
  tarball=$cache/bookworm-$key.tar
else
  key=$(printf '%s %s %s' "$suite" "$arch" "$pkgs" | sha256sum | cut -c1-16)
  tarball=$cache/bookworm-$arch-$key.tar
fi
if [ -f "$tarball" ]; then echo "$tarball"; exit 0; fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "debootstrap $suite $arch ($pkgs) from $mirror" >&2
debootstrap --arch="$arch" --variant=minbase --include="$pkgs" "$suite" "$work/root" "$mirror" >"$work/log" 2>&1 \
  || { tail -30 "$work/log" >&2; exit 1; }
root=$work/root
# Offline afterwards: no package lists needed beyond what is installed; keep images small.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*_Packages
echo forged-test > "$root/etc/hostname"
: > "$root/etc/machine-id"
# Nothing in the container needs a login prompt or the network.
ln -sf /dev/null "$root/etc/systemd/system/console-getty.service"
ln -sf /dev/null "$root/etc/systemd/system/systemd-networkd-wait-online.service"
tar -C "$root" -cf "$tarball.partial" .
mv "$tarball.partial" "$tarball"
echo "$tarball"
