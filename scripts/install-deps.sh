#!/usr/bin/env bash
# Installs every system package the project needs on Debian 12, idempotently.
# Runs as root (apt-get); as another user it uses sudo when available.
# --with-slurm adds Slurm and munge for the single-machine Slurm test (tests/slurm).
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config git clang-format
  openmpi-bin libopenmpi-dev
  libblis-openmp-dev
  libhdf5-dev hdf5-tools
  libyaml-cpp-dev
  libgtest-dev libgmock-dev
  nlohmann-json3-dev libcli11-dev python3-h5py python3-matplotlib
  libsentencepiece-dev sentencepiece
  bible-kjv-text bible-kjv
  fortunes fortunes-min
  libcpp-httplib-dev curl
  libeigen3-dev
)
if [ "${1:-}" = --with-slurm ]; then
  PACKAGES+=(slurmctld slurmd slurm-client munge libpmix-dev)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: error: missing packages (${missing[*]}) and not root; install them or run as root" >&2
    exit 1
  fi
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q -o DPkg::Lock::Timeout=600
$SUDO apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}"
