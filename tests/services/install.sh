#!/usr/bin/env bash
# Installs the servers and tools the test suite starts (each test starts its own instance on
# a free 127.0.0.1 port and stops it). Needs root or password-less sudo for apt-get; without
# them it says exactly what to install and stops.
set -euo pipefail
need=()
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
command -v umockdev-run >/dev/null || need+=(umockdev)
command -v victoria-metrics >/dev/null || need+=(victoria-metrics)
command -v influxd >/dev/null || need+=(influxdb)
command -v openssl >/dev/null || need+=(openssl)
command -v chromium >/dev/null || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""
elif sudo -n true 2>/dev/null; then sudo="sudo -n"
else
  echo "make test: these packages are missing: ${need[*]}" >&2
  echo "make test: install them (sudo apt-get install -y ${need[*]}) or run as root, then run make test again." >&2
  exit 1
fi
echo "make test: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
