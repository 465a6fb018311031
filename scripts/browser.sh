#!/usr/bin/env bash
# The headless browser the web UI's end-to-end test drives: Debian's chromium (Playwright talks to
# it; no browser download). Installs it with apt when missing; needs root or sudo.
set -euo pipefail
for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then exit 0; fi
done
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
echo "installing Debian's chromium for the UI test (apt)" >&2
$SUDO apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null
