#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are missing (apt-get, with sudo when not root).
# Usage: scripts/install-packages.sh PACKAGE ...   (setup.sh and fuzz.sh call it)
set -euo pipefail
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
echo "$(basename "$0"): installing ${missing[*]}"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
