#!/usr/bin/env bash
# Install the system packages the project needs, only those missing.
# Usage: scripts/deps.sh build|test
#   build: what compiling needs (protobuf-compiler and the well-known .proto
#          files of libprotobuf-dev for etcd-client's build, a C toolchain).
# Each entry is package:command, or package:/path for a file the package ships
# (libprotobuf-dev is only a recommendation of protobuf-compiler, and recommends
# are not installed here).
#   test:  build + the real clients and servers the test suite drives.
set -euo pipefail

want=(protobuf-compiler:protoc libprotobuf-dev:/usr/include/google/protobuf/descriptor.proto
      pkg-config:pkg-config)
if [ "${1:-build}" = test ]; then
  want+=(openssl:openssl libnbd-bin:nbdinfo libnbd-bin:nbdcopy libnbd-bin:nbdfuse qemu-utils:qemu-img
         fio:fio nbdkit:nbdkit e2fsprogs:mkfs.ext4 fuse3:fusermount3 etcd-server:etcd
         util-linux:losetup util-linux:blkid mount:mount)
fi

missing=()
for pair in "${want[@]}"; do
  pkg=${pair%%:*} cmd=${pair#*:}
  case $cmd in
    /*) [ -e "$cmd" ] || missing+=("$pkg") ;;
    *) command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg") ;;
  esac
done
[ ${#missing[@]} -eq 0 ] && exit 0

# shellcheck disable=SC2207
missing=($(printf '%s\n' "${missing[@]}" | sort -u))
echo "installing: ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
