#!/usr/bin/env bash
# System tools some tests drive: Debian's Chromium for the web chat page test (Playwright uses
# it as is; it never downloads a browser). Best effort: without root or apt, the browser tests
# skip with that reason.
set -uo pipefail
if command -v chromium >/dev/null; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "==> installing Debian's chromium for the browser tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || echo "warning: could not install chromium; browser tests will skip"
else
  echo "note: chromium is not installed and apt-get needs root; browser tests will skip"
fi
