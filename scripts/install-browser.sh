#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the playground's browser test (tests/test_playground.py).
# Idempotent: does nothing when both are installed. Fails loudly when it cannot install them,
# so CI never runs the suite with the browser test silently skipped.
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    exit 0
fi

if [[ $(id -u) -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "install-browser: need root (or passwordless sudo) to apt-get install chromium" >&2
    exit 1
fi

echo "install-browser: installing chromium and chromium-driver with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q chromium chromium-driver

for binary in /usr/bin/chromium /usr/bin/chromedriver; do
    if [[ ! -x $binary ]]; then
        echo "install-browser: $binary is still missing after apt-get install" >&2
        exit 1
    fi
done
