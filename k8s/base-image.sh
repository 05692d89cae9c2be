#!/bin/sh
# Make a Debian bookworm base image (Python 3.11 from Debian's own packages, with the security
# updates) for a machine that cannot pull from an image registry, and load it into the local
# Docker daemon. Run as root:
#
#   k8s/base-image.sh [TAG]          # default TAG: emo-base:bookworm
#   docker build --network host --build-arg BASE=emo-base:bookworm -f k8s/Dockerfile -t emo:dev .
#
# debootstrap fetches from Debian's package archive (MIRROR), which such machines still reach.
set -eu
tag=${1:-emo-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
security=${SECURITY_MIRROR:-http://security.debian.org/debian-security}
work=$(mktemp -d /tmp/emo-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
# What k8s/Dockerfile needs of any BASE: python3 and venv (ensurepip's wheels), the CA bundle,
# useradd (passwd) and apt; netbase for /etc/services and /etc/protocols.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd,netbase \
    bookworm "$root" "$mirror"
cat > "$root/etc/apt/sources.list" <<LIST
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
LIST
# Images keep no downloaded packages (as Debian's official images do).
cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
CONF
chroot "$root" apt-get update
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get -y upgrade
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*
# A file first, so a failed tar never becomes a truncated image.
tar -C "$root" --numeric-owner -cf "$work/root.tar" .
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' "$work/root.tar" "$tag"
echo "made $tag"
