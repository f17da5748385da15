#!/usr/bin/env bash
# A Docker engine on this machine: install Debian's docker.io if missing, start dockerd if none answers.
# vfs storage and no iptables/bridge: works inside an unprivileged-looking sandbox; containers use --network host.
set -euo pipefail

# Debian's packages: the engine, debootstrap (for the stand-in base image) and docker-compose 1.29.
if ! command -v dockerd > /dev/null || ! command -v debootstrap > /dev/null || ! command -v docker-compose > /dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap docker-compose > /dev/null
fi
if docker info > /dev/null 2>&1; then
    exit 0
fi
log="${TMPDIR:-/tmp}/kovae-dockerd.log"
nohup dockerd --storage-driver=vfs --iptables=false --bridge=none > "$log" 2>&1 &
for _ in $(seq 1 60); do
    if docker info > /dev/null 2>&1; then
        exit 0
    fi
    sleep 1
done
echo "dockerd did not start; its log:" >&2
tail -20 "$log" >&2
exit 1
