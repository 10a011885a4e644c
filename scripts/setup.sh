#!/usr/bin/env bash
# Installs the system packages lookalike builds with: cmake and a C++ compiler (FAISS is
# compiled from source by the `faiss` crate's `static` feature; libjpeg-turbo too, by the
# `turbojpeg` crate), nasm (libjpeg-turbo's SIMD kernels) and BLAS/LAPACK (OpenBLAS); and
# strace, with which a test checks that inserts are fsynced before they are acknowledged.
# Idempotent: installs only what is missing. Needs root or sudo on Debian/Ubuntu.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
command -v nasm >/dev/null 2>&1 || need+=(nasm)
command -v strace >/dev/null 2>&1 || need+=(strace)
dpkg -s libopenblas-dev >/dev/null 2>&1 || need+=(libopenblas-dev)
dpkg -s liblapack-dev >/dev/null 2>&1 || need+=(liblapack-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y --no-install-recommends "${need[@]}"
fi
