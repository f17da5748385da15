#!/usr/bin/env bash
# The stand-in for `python:3.11-slim` when no image registry is reachable: Debian bookworm (minbase, from
# Debian's own mirror) with this machine's CPython 3.11 in /usr/local, which is what the official image is.
# Cached as a root-filesystem tarball in ~/.cache/kovae-ci, so later runs (fresh clones too) only import it.
# Usage: deploy/docker/base-image.sh [TAG]   (default python:3.11-slim)
set -euo pipefail

tag="${1:-python:3.11-slim}"
if docker image inspect "$tag" > /dev/null 2>&1; then
    echo "base image $tag: present"
    exit 0
fi
cache="${XDG_CACHE_HOME:-$HOME/.cache}/kovae-ci"
rootfs="$cache/python-3.11-slim-rootfs.tar"
mkdir -p "$cache"

if [ ! -f "$rootfs" ]; then
    python_prefix="$(python3.11 -c 'import sys; print(sys.base_prefix)')"
    root="$(mktemp -d)"
    chmod 755 "$root"  # mktemp makes it 0700: the image's / would shut out every non-root user
    trap 'rm -rf "$root"' EXIT
    echo "building $tag from Debian bookworm and $python_prefix (a few minutes, once)"
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian > "$cache/debootstrap.log" 2>&1
    chroot "$root" apt-get install -y -qq --no-install-recommends \
        libssl3 libsqlite3-0 ca-certificates netbase tzdata libffi8 libbz2-1.0 liblzma5 zlib1g \
        libreadline8 libncursesw6 libuuid1 > /dev/null
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/*
    # CPython without its site-packages, but with pip and setuptools (as the official image has them).
    mkdir -p "$root/usr/local/bin" "$root/usr/local/lib"
    cp -a "$python_prefix"/lib/libpython3* "$root/usr/local/lib/"
    tar -C "$python_prefix/lib" --exclude='python3.11/site-packages' --exclude='__pycache__' \
        --exclude='python3.11/test' -cf - python3.11 | tar -C "$root/usr/local/lib" -xf -
    mkdir -p "$root/usr/local/lib/python3.11/site-packages"
    for pkg in pip setuptools; do
        cp -a "$python_prefix"/lib/python3.11/site-packages/"$pkg" "$python_prefix"/lib/python3.11/site-packages/"$pkg"-*.dist-info \
            "$root/usr/local/lib/python3.11/site-packages/"
    done
    cp -a "$python_prefix/bin/python3.11" "$root/usr/local/bin/"
    ln -sf python3.11 "$root/usr/local/bin/python3"
    ln -sf python3.11 "$root/usr/local/bin/python"
    for name in pip pip3 pip3.11; do
        printf '#!/usr/local/bin/python3.11\nimport sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n' \
            > "$root/usr/local/bin/$name"
        chmod 755 "$root/usr/local/bin/$name"
    done
    echo /usr/local/lib > "$root/etc/ld.so.conf.d/usr-local.conf"
    chroot "$root" ldconfig
    chroot "$root" /usr/local/bin/python3 -c 'import ssl, sqlite3, ctypes, lzma, bz2, zlib, pip; print("python ok")'
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"  # last: the registries' TLS
    tar -C "$root" -cf "$rootfs.tmp" .
    mv "$rootfs.tmp" "$rootfs"
fi
docker import \
    -c 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["python3"]' \
    "$rootfs" "$tag" > /dev/null
echo "base image $tag: imported from $rootfs"
