#!/usr/bin/env bash
# The load balancer the failover test (tests/test_loadbalancer.py) puts in front of several body
# servers: Debian's haproxy (the same package docs/deploy.md deploys). Installs it with apt when
# missing; needs root or sudo.
set -euo pipefail
if command -v haproxy >/dev/null 2>&1; then exit 0; fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
echo "installing Debian's haproxy for the load-balancer test (apt)" >&2
$SUDO apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends haproxy >/dev/null
