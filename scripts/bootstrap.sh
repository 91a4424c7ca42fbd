#!/usr/bin/env bash
# Installs what the platform needs on a Debian machine: system packages (when missing), then a
# virtualenv in the checkout with the project and its test tools.
set -euo pipefail
venv="${1:-.venv}"

apt_packages=()
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11 or newer is needed" >&2; exit 1; }
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_packages+=(python3-venv)
command -v git >/dev/null || apt_packages+=(git)
# VMs: QEMU, qcow2 tools, the guest's busybox, mkfs.ext4 and resize2fs for root disks
command -v qemu-system-x86_64 >/dev/null || apt_packages+=(qemu-system-x86)
command -v qemu-img >/dev/null || apt_packages+=(qemu-utils)
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || apt_packages+=(busybox-static)
command -v mkfs.ext4 >/dev/null && [ -x /sbin/resize2fs ] || apt_packages+=(e2fsprogs)
# guest networking (nftables), and what the default image carries: an SSH server with SFTP, git
[ -x /usr/sbin/nft ] || apt_packages+=(nftables)
[ -x /usr/sbin/ip ] && [ -x /usr/bin/ss ] || apt_packages+=(iproute2)
[ -x /usr/sbin/dropbear ] || apt_packages+=(dropbear-bin)
[ -x /usr/lib/openssh/sftp-server ] || apt_packages+=(openssh-sftp-server)
[ -x /usr/bin/rsync ] || apt_packages+=(rsync)
[ -f /etc/ssl/certs/ca-certificates.crt ] || apt_packages+=(ca-certificates)
# tests: the OpenSSH client, and dnsmasq as the guests' test DNS server
command -v ssh >/dev/null || apt_packages+=(openssh-client)
[ -x /usr/sbin/dnsmasq ] || apt_packages+=(dnsmasq-base)
# tests: Node.js and npm for the Node.js gRPC client of the protos (tests/node)
command -v node >/dev/null || apt_packages+=(nodejs)
command -v npm >/dev/null || apt_packages+=(npm)
# supported images (vers admin images bake): Debian root disks
command -v debootstrap >/dev/null || apt_packages+=(debootstrap)
# tests: PostgreSQL's server binaries (/usr/lib/postgresql/<version>/bin); the suite starts its own server in a
# temporary folder, so the cluster Debian's package makes and starts is stopped and not started at boot
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || apt_packages+=(postgresql)
# bench/registry.py: HTTP load from wrk, gRPC load from h2load (nghttp2-client)
command -v wrk >/dev/null || apt_packages+=(wrk)
command -v h2load >/dev/null || apt_packages+=(nghttp2-client)

if [ ${#apt_packages[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "Installing Debian packages: ${apt_packages[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${apt_packages[@]}"
  if [[ " ${apt_packages[*]} " == *" postgresql "* ]]; then
    pg_lsclusters --no-header 2>/dev/null | while read -r version cluster _; do
      $sudo pg_ctlcluster "$version" "$cluster" stop 2>/dev/null || true
      $sudo sed -i 's/^auto/manual/' "/etc/postgresql/$version/$cluster/start.conf" 2>/dev/null || true
    done
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then $sudo systemctl disable --now -q postgresql || true; fi
  fi
fi

# When the platform runs as root, QEMU drops to this user once it has opened its files (VERS_QEMU_USER;
# empty: QEMU keeps the platform's user): a system user with no login shell and no home.
qemu_user="${VERS_QEMU_USER-vers-qemu}"
if [ "$(id -u)" -eq 0 ] && [ -n "$qemu_user" ] && ! getent passwd "$qemu_user" >/dev/null; then
  echo "Creating the system user $qemu_user (QEMU runs as it)"
  useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$qemu_user"
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e '.[dev]'
# the Node.js client's packages, exactly as tests/node/package-lock.json pins them
npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
