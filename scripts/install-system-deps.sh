#!/usr/bin/env bash
# Installs the Debian packages every part of appliance needs (one list per area under
# deps/apt/), then makes foreign-architecture chroots work (binfmt_misc for qemu-user).
# Safe to run again.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-deps: run as root (apt-get and binfmt_misc need it)" >&2
  exit 1
fi
mapfile -t pkgs < <(cat "$here"/deps/apt/*.txt | sed -e 's/#.*//' -e 's/[[:space:]]//g' | grep -v '^$' | sort -u)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
# qemu-user binfmt: a container often has binfmt_misc unmounted
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
update-binfmts --enable >/dev/null 2>&1 || true
echo "install-system-deps: ${#pkgs[@]} packages present; binfmt: $(ls /proc/sys/fs/binfmt_misc | grep -c qemu) qemu handlers"
