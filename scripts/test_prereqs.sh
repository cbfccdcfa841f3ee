#!/usr/bin/env bash
# System tools some tests drive for real (promtool for the alert rules, chromium for the HTML
# report). Installed from Debian's packages when missing and we are root; the tests that need
# them fail (not skip) if they are still absent.
set -u
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${need[*]} for the tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") >/dev/null 2>&1 \
    || echo "could not install ${need[*]}; tests that need them will fail"
  # The Debian prometheus package starts a server on :9090; the tests start their own.
  command -v systemctl >/dev/null 2>&1 || pkill -x prometheus 2>/dev/null || true
fi
exit 0
