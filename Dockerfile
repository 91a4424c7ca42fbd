# The one image every Vers process runs from (deploy/k8s/ starts it as the gateway, registry, tagging,
# orchestrator API and host agent): Debian bookworm and its Python 3.11, the Debian packages the services
# use (the list of scripts/bootstrap.sh, less the test tools), the project in /opt/vers, and the guest
# images (kernel, initramfs, default root disk) built once, here, into the fixed VERS_IMAGES_DIR.
#
#   docker build -t registry.example.com/vers:$(git rev-parse --short HEAD) \
#       --build-arg VERS_GIT_HASH=$(git rev-parse HEAD) .
FROM debian:bookworm-slim

# What GET /api/v1/system/version names: the image holds no git checkout to ask.
ARG VERS_GIT_HASH=""
ARG DEBIAN_FRONTEND=noninteractive

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/vers/.venv/bin:$PATH \
    VERS_IMAGES_DIR=/opt/vers/images \
    VERS_DATA_DIR=/var/lib/vers \
    VERS_GIT_HASH=${VERS_GIT_HASH}

# python3 and its venv; QEMU and qemu-img; what the default guest image and image builds copy from this
# machine (static busybox, e2fsprogs' mkfs.ext4 -d, resize2fs and debugfs, dropbear with OpenSSH's SFTP
# server, git, rsync, CA certificates); nftables and iproute2 for guest networking. setpriv, which QEMU
# starts under, is util-linux's, in every Debian.
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends \
        python3 python3-venv \
        qemu-system-x86 qemu-utils \
        busybox-static e2fsprogs dropbear-bin openssh-sftp-server git rsync ca-certificates \
        nftables iproute2 \
    && rm -rf /var/lib/apt/lists/*

# The services run as `vers`; a host agent runs as root and starts QEMU as `vers-qemu` (VERS_QEMU_USER).
# Fixed ids, so the manifests' runAsUser and fsGroup can name them.
RUN groupadd --system --gid 10001 vers \
    && useradd --system --uid 10001 --gid vers --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vers \
    && groupadd --system --gid 10002 vers-qemu \
    && useradd --system --uid 10002 --gid vers-qemu --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vers-qemu

WORKDIR /opt/vers
COPY . /opt/vers
# Editable, as scripts/bootstrap.sh installs it: the processes run `python -m services.<name>` from
# /opt/vers, and the guest's files (services/orchestrator/guest) are read from the tree.
RUN python3 -m venv /opt/vers/.venv \
    && /opt/vers/.venv/bin/pip install -q -e . \
    && python -c "import services.gateway.app, services.orchestrator.app, services.registry.app, services.tagging.app"

# The guest images, from Debian's kernel package (apt-get download needs the package lists for a moment),
# world-readable for QEMU's own user; the downloaded .deb is not kept.
RUN apt-get update -q \
    && umask 022 \
    && python -m services.orchestrator.images build \
    && rm -rf /opt/vers/images/cache /var/lib/apt/lists/* \
    && install -d -m 0700 -o vers -g vers /var/lib/vers

USER 10001:10001
EXPOSE 8080 50051 50052 50053 50054
# deploy/k8s/ names the service as the command: python -m services.{gateway,registry,tagging,orchestrator}
CMD ["python", "-m", "services.gateway"]
