#!/usr/bin/env bash
# Debian packages used by the tests: a real single-node Slurm (slurm-wlm, munge), headless
# Chromium for the report check, and sshd (openssh-server) for the DVC SSH-remote test (the test
# starts its own sshd on a loopback port; the package's service is not needed). Idempotent;
# needs root (CI and these machines run as root).
set -euo pipefail
need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm munge)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "install-system-deps: need root to apt-get install ${need[*]}" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
