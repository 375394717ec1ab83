#!/bin/sh
# Install the Debian packages named that are not installed yet (make install-go, install-cpp).
# Without apt-get (or without the right to use it) it says what is missing and exits 0, so that
# `make test` still runs everything else: those languages' tests then skip, naming the packages,
# unless AGENTRUN_REQUIRE_TOOLCHAINS=1 (CI), which makes it fail instead.
set -eu
missing=""
for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
        missing="$missing $package"
done
[ -z "$missing" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
if command -v apt-get >/dev/null 2>&1 && $sudo true 2>/dev/null; then
    echo "make: installing Debian packages:$missing"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
    exit 0
fi
echo "make: cannot install the Debian packages$missing here (no apt-get or no root)" >&2
[ "${AGENTRUN_REQUIRE_TOOLCHAINS:-}" = "1" ] && exit 1
exit 0
