#!/usr/bin/env bash
# The LibTorch 2.x lane: builds this checkout against Debian 13's libtorch-dev 2.6 (CPU, with Gloo) and runs
# the same CTest suite as scripts/test.sh. Debian 13's LibTorch needs a newer C library than Debian 12, so it
# runs in a Debian 13 root made with debootstrap (about 2.5 minutes and 1.7 GB the first time, reused after).
#
# Usage: scripts/test-libtorch2.sh [ctest arguments...]      (as root, or with sudo available)
# Environment:
#   DIFFUSE_TRIXIE_ROOT  where the Debian 13 root lives (default: ~/.cache/diffuse/trixie-root, outside the tree)
#   DIFFUSE_MIRROR       the Debian mirror to bootstrap from (default: the one this machine's apt sources name)
# The build folder is build-libtorch2/ in the checkout (git-ignored), kept between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(pwd)
root=${DIFFUSE_TRIXIE_ROOT:-${HOME:-/root}/.cache/diffuse/trixie-root}
build=build-libtorch2
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"

packages=(libtorch-dev libopenblas0-pthread cmake make g++ dataset-fashion-mnist libcli11-dev
          nlohmann-json3-dev libstb-dev libgtest-dev libbenchmark-dev gnuplot-nox zlib1g-dev libgloo-dev libicu-dev)

# The first Debian archive this machine's apt sources name (deb822 .sources or one-line .list files).
host_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' "$f"
  done
}
mirror=${DIFFUSE_MIRROR:-$(host_mirror | grep -E '/debian/?$' | head -1)}
[ -n "$mirror" ] || { echo "error: no Debian mirror in /etc/apt/sources*; set DIFFUSE_MIRROR=<url>" >&2; exit 1; }

in_root() { $sudo chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do $sudo umount -l "${mounted[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() {  # bind SOURCE TARGET-inside-root
  $sudo mkdir -p "$root$2"
  mountpoint -q "$root$2" || { $sudo mount --bind "$1" "$root$2"; mounted+=("$root$2"); }
}

if [ ! -f "$root/.diffuse-bootstrapped" ]; then
  command -v debootstrap > /dev/null || {
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends debootstrap
  }
  echo "libtorch2 lane: bootstrapping Debian 13 into $root from $mirror"
  $sudo rm -rf "$root" && $sudo mkdir -p "$root"
  $sudo debootstrap --variant=minbase trixie "$root" "$mirror" > "$root.debootstrap.log" 2>&1 ||
    { tail -20 "$root.debootstrap.log"; echo "error: debootstrap failed (log: $root.debootstrap.log)" >&2; exit 1; }
  $sudo touch "$root/.diffuse-bootstrapped"
fi

bind /proc /proc
bind /dev /dev
bind /sys /sys
bind "$src" /src

missing=()
for p in "${packages[@]}"; do
  in_root dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "libtorch2 lane: installing ${missing[*]} in the Debian 13 root"
  in_root env DEBIAN_FRONTEND=noninteractive dpkg --configure -a  # finishes an install that was cut short
  in_root apt-get update -qq
  in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    > "$root.apt.log" 2>&1 || { tail -20 "$root.apt.log"; echo "error: apt-get install failed in $root" >&2; exit 1; }
fi
echo "libtorch2 lane: $(in_root dpkg-query -W -f='libtorch-dev ${Version}' libtorch-dev), $(in_root g++ --version | head -1)"

[ -f "$build/CMakeCache.txt" ] || in_root cmake -S /src -B "/src/$build" -DCMAKE_BUILD_TYPE=Release
in_root cmake --build "/src/$build" -j2
in_root sh -c "cd /src/$build && ctest --output-on-failure -j2 --timeout 600 -LE slow $*"
