#!/usr/bin/env bash
# Install Debian's headless chromium for the dashboard browser test (tests/test_dashboard_browser.py).
# Idempotent: does nothing when chromium is already there. Needs root (CI containers run as root) or sudo.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  echo "chromium present: $(chromium --version 2>/dev/null || chromium-browser --version 2>/dev/null)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# chromium-driver is not used by the test (it speaks the DevTools protocol directly) but is handy for selenium
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
echo "installed: $(chromium --version)"
