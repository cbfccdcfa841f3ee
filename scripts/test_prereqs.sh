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
  before=" $(pgrep -x prometheus | tr '\n' ' ') "
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") >/dev/null 2>&1 \
    || echo "could not install ${need[*]}; tests that need them will fail"
  # The Debian prometheus package starts a server on :9090; the tests start their own. Stop
  # only the one this install started (by pid), never a prometheus that was already running.
  for pid in $(pgrep -x prometheus); do
    case "$before" in *" $pid "*) ;; *) kill "$pid" 2>/dev/null || true ;; esac
  done
fi
exit 0
