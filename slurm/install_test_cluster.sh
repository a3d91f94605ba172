#!/usr/bin/env bash
# Installs the Slurm daemons and clients the tests run a one-node cluster with (Debian/Ubuntu,
# as root; ~10 s). A no-op when they are already there. Used by tests/test_slurm.py and CI:
#   bash slurm/install_test_cluster.sh
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
    exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "install_test_cluster.sh: needs root to install Slurm" >&2; exit 3; }
command -v apt-get >/dev/null || { echo "install_test_cluster.sh: needs apt-get" >&2; exit 3; }
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >/dev/null
