#!/usr/bin/env bash
# CI only: install Debian's prometheus for the dashboard tests, binaries only.
# The package would start prometheus (*:9090) and node-exporter (*:9100) as services; a
# policy-rc.d answering 101 ("action forbidden") keeps apt from starting them. It is created
# only when none exists, and only the one created here is removed. Nothing is stopped or killed.
# POLICY_RC_D overrides the policy file's path (for the test of this script).
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus is missing and cannot be installed here (needs root and apt-get)" >&2
  exit 1
fi
echo "==> installing Debian's prometheus (binaries only, services not started)"
policy=${POLICY_RC_D:-/usr/sbin/policy-rc.d}
made_policy=""
if [ ! -e "$policy" ] && [ ! -L "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 0755 "$policy"
  made_policy=1
fi
status=0
{ apt-get update -qq \
  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
     >/dev/null; } || status=$?
if [ -n "$made_policy" ]; then rm -f "$policy"; fi
if [ "$status" != 0 ]; then
  echo "apt-get install prometheus failed (exit $status)" >&2
  exit "$status"
fi
