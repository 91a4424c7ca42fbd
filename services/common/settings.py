"""Settings of every process, read once from the environment (deploy/vers.env lists them all)."""

from __future__ import annotations

import hashlib
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("registry", "tagging", "orchestrator")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=True)

    data_dir: Path = Field(Path(".vers"), validation_alias="VERS_DATA_DIR")
    log_level: str = Field("INFO", validation_alias="VERS_LOG_LEVEL")

    # Where each service is reached by its peers and by the gateway.
    registry_addr: str = Field("127.0.0.1:50051", validation_alias="REGISTRY_ADDR")
    tagging_addr: str = Field("127.0.0.1:50052", validation_alias="TAGGING_ADDR")
    orchestrator_addr: str = Field("127.0.0.1:50053", validation_alias="ORCHESTRATOR_ADDR")
    # Where each service listens; its *_ADDR when empty (set e.g. 0.0.0.0:50051 in a container).
    registry_listen_addr: str = Field("", validation_alias="REGISTRY_LISTEN_ADDR")
    tagging_listen_addr: str = Field("", validation_alias="TAGGING_LISTEN_ADDR")
    orchestrator_listen_addr: str = Field("", validation_alias="ORCHESTRATOR_LISTEN_ADDR")

    # SQLAlchemy URLs; SQLite files in the data folder when empty.
    registry_database_url: str = Field("", validation_alias="REGISTRY_DATABASE_URL")
    tagging_database_url: str = Field("", validation_alias="TAGGING_DATABASE_URL")
    orchestrator_database_url: str = Field("", validation_alias="ORCHESTRATOR_DATABASE_URL")

    http_host: str = Field("127.0.0.1", validation_alias="VERS_HTTP_HOST")
    http_port: int = Field(8080, validation_alias="VERS_HTTP_PORT")
    http_max_body_bytes: int = Field(4 * 1024 * 1024, validation_alias="VERS_HTTP_MAX_BODY_BYTES")

    # How long a resolved bearer token is trusted before asking the registry again: how long a key revoked in
    # the registry may still work in the other services (the registry itself stops trusting it at once).
    auth_cache_seconds: float = Field(1.0, validation_alias="VERS_AUTH_CACHE_SECONDS")
    # How long the tagging service's reads (tag get, list, history) reuse the registry's answer about a
    # repository; 0: they ask it every time.
    repository_cache_seconds: float = Field(1.0, ge=0, validation_alias="VERS_REPOSITORY_CACHE_SECONDS")
    # How long in-flight calls may finish after SIGTERM.
    shutdown_grace_seconds: float = Field(5.0, validation_alias="VERS_SHUTDOWN_GRACE_SECONDS")

    # VMs: accelerator (auto probes KVM and falls back to TCG), where live sockets and RAM files go
    # (tmpfs; a folder under /dev/shm named after the data folder when empty), per-org limits.
    accel: str = Field("auto", validation_alias="VERS_ACCEL")
    # Built guest images (kernel, initramfs, root disks); "images" in the data folder when empty.
    images_dir: str = Field("", validation_alias="VERS_IMAGES_DIR")
    run_dir: str = Field("", validation_alias="VERS_RUN_DIR")
    # Where commits (frozen disk layers, memory, device state) and organizations' images are kept: "local" (the
    # data folder, one host) or the absolute path of a shared POSIX folder (NFS, CephFS) every host mounts there.
    commit_store: str = Field("local", validation_alias="VERS_COMMIT_STORE")
    # Images an organization uploads or builds (POST /api/v1/images/upload and /create): how many it may
    # keep and their disks' MiB in all, the largest upload, how long one build may take, and how many builds
    # run at once on the host (each in a process of its own; an organization's run one at a time).
    org_max_images: int = Field(50, validation_alias="VERS_ORG_MAX_IMAGES")
    org_max_image_mib: int = Field(131072, validation_alias="VERS_ORG_MAX_IMAGE_MIB")
    image_max_upload_bytes: int = Field(8 * 1024**3, validation_alias="VERS_IMAGE_MAX_UPLOAD_BYTES")
    image_build_timeout_seconds: int = Field(1800, validation_alias="VERS_IMAGE_BUILD_TIMEOUT_SECONDS")
    image_max_concurrent_builds: int = Field(2, ge=1, validation_alias="VERS_IMAGE_MAX_CONCURRENT_BUILDS")
    org_max_vcpus: int = Field(32, validation_alias="VERS_ORG_MAX_VCPUS")
    org_max_memory_mib: int = Field(32768, validation_alias="VERS_ORG_MAX_MEMORY_MIB")
    boot_timeout_seconds: float = Field(120.0, validation_alias="VERS_BOOT_TIMEOUT_SECONDS")
    # Guest networking: addresses or ranges guests may reach although private, loopback or link-local
    # (comma-separated, e.g. 10.20.0.5,192.168.7.0/24); the resolvers guests' DNS queries go to (the
    # host's /etc/resolv.conf when empty).
    guest_allow: str = Field("", validation_alias="VERS_GUEST_ALLOW")
    guest_dns: str = Field("", validation_alias="VERS_GUEST_DNS")
    # Connections into VMs (tunnels, SSH, domains) this orchestrator carries at once, over all VMs (each
    # costs it two file descriptors; it raises its own open-file limit to the hard limit at start).
    max_tunnels: int = Field(2048, validation_alias="VERS_MAX_TUNNELS")
    # ...and of those, how many one organization's VMs may have open at once.
    org_max_tunnels: int = Field(256, validation_alias="VERS_ORG_MAX_TUNNELS")
    # Domains: NAME.<suffix> reaches a port of a VM through the gateway (point a wildcard DNS record, or
    # *.localhost, at the gateway); how many one organization may have.
    domain_suffix: str = Field("vers.localhost", validation_alias="VERS_DOMAIN_SUFFIX")
    org_max_domains: int = Field(20, validation_alias="VERS_ORG_MAX_DOMAINS")
    # Environment variables: how many one organization may set (values kept encrypted, env-vars.key in the
    # data folder).
    org_max_env_vars: int = Field(100, validation_alias="VERS_ORG_MAX_ENV_VARS")
    # The key their values are encrypted with (a Fernet key: `python -c "from cryptography.fernet import Fernet;
    # print(Fernet.generate_key().decode())"`); env-vars.key in the data folder, made on first use, when empty.
    # Set it to the same key on every host agent of several hosts.
    env_vars_key: str = Field("", validation_alias="VERS_ENV_VARS_KEY")

    # Exec: output kept per stream (stdout, stderr) of one exec (a command writing more has its pipe
    # closed, as with `| head -c`), the timeout when a request gives none, the longest a request may ask
    # for, and how many execs one VM runs at once.
    exec_max_output_bytes: int = Field(1024 * 1024, validation_alias="VERS_EXEC_MAX_OUTPUT_BYTES")
    exec_default_timeout_seconds: int = Field(600, validation_alias="VERS_EXEC_DEFAULT_TIMEOUT_SECONDS")
    exec_max_timeout_seconds: int = Field(3600, validation_alias="VERS_EXEC_MAX_TIMEOUT_SECONDS")
    vm_max_execs: int = Field(16, validation_alias="VERS_VM_MAX_EXECS")
    # Streamed execs are kept after they end (their output, for reattaching) this long, and at most this
    # many per VM (the oldest finished go first); each VM's exec log keeps its newest this many bytes.
    exec_retain_seconds: int = Field(3600, validation_alias="VERS_EXEC_RETAIN_SECONDS")
    exec_retain_per_vm: int = Field(16, validation_alias="VERS_EXEC_RETAIN_PER_VM")
    # ...and all the streamed output the orchestrator keeps, every VM's together (the oldest finished go first).
    exec_retain_max_bytes: int = Field(256 * 1024 * 1024, validation_alias="VERS_EXEC_RETAIN_MAX_BYTES")
    vm_log_max_bytes: int = Field(8 * 1024 * 1024, validation_alias="VERS_VM_LOG_MAX_BYTES")
    # Deploy (POST /deploy): where an `owner/repo` is cloned from (BASE + owner/repo + ".git"), and how long
    # the clone, install and build may take (at most VERS_EXEC_MAX_TIMEOUT_SECONDS).
    deploy_git_base: str = Field("https://github.com/", validation_alias="VERS_DEPLOY_GIT_BASE")
    deploy_timeout_seconds: int = Field(1800, validation_alias="VERS_DEPLOY_TIMEOUT_SECONDS")
    # The largest file ReadFile and WriteFile move whole (base64 in JSON, through the guest agent); larger
    # files and folders go through DownloadFiles and UploadFiles (tar streams, `vers copy`).
    file_max_bytes: int = Field(2 * 1024 * 1024, validation_alias="VERS_FILE_MAX_BYTES")
    # The longest one file transfer (a tar stream into or out of a VM) may take before it is cut.
    file_transfer_timeout_seconds: int = Field(3600, validation_alias="VERS_FILE_TRANSFER_TIMEOUT_SECONDS")
    # A guest's serial console log (ttyS0) in the run folder is cut to its last half past this size.
    serial_log_max_bytes: int = Field(1024 * 1024, validation_alias="VERS_SERIAL_LOG_MAX_BYTES")
    # Under TCG (no KVM), the cache of guest code QEMU has translated, per VM, in MiB: a guest that runs ever new
    # code makes its QEMU take up to this much beside the guest's memory (QEMU's own default is 1 GiB). A command
    # translates about 12 MiB of code; below 16 guests fail to boot.
    tcg_code_cache_mib: int = Field(64, ge=16, le=1024, validation_alias="VERS_TCG_CODE_CACHE_MIB")
    # Room a new VM, branch, commit or wake leaves free on this host: memory (MemAvailable), the data
    # folder's disk, the run folder's tmpfs. Asked for more, the request is refused.
    host_reserve_memory_mib: int = Field(1024, validation_alias="VERS_HOST_RESERVE_MEMORY_MIB")
    host_reserve_disk_mib: int = Field(2048, validation_alias="VERS_HOST_RESERVE_DISK_MIB")
    host_reserve_run_mib: int = Field(256, validation_alias="VERS_HOST_RESERVE_RUN_MIB")
    # Memory this host offers VMs in all (MiB); 0: all the machine has.
    host_memory_mib: int = Field(0, ge=0, validation_alias="VERS_HOST_MEMORY_MIB")
    # Booted root VMs kept ready on this host, per image of VERS_ROOT_POOL_IMAGES (comma separated), in the
    # shape a request that names no vCPUs, memory, disk size or network gets: a new root VM of that image and
    # shape is one of them, taken by one organization for good, and the pool boots another behind it. 0: none.
    root_pool_size: int = Field(1, ge=0, le=16, validation_alias="VERS_ROOT_POOL_SIZE")
    root_pool_images: str = Field("default", validation_alias="VERS_ROOT_POOL_IMAGES")
    # QEMU processes kept started, waiting for a branch's state, for each of the VERS_BRANCH_POOL_COMMITS commits
    # branched last on this host: a branch of one of them skips starting QEMU. 0: none.
    branch_pool_size: int = Field(1, ge=0, le=16, validation_alias="VERS_BRANCH_POOL_SIZE")
    branch_pool_commits: int = Field(4, ge=0, le=256, validation_alias="VERS_BRANCH_POOL_COMMITS")

    # Several VM hosts. The orchestrator's role: "all" (the API and the VMs in one process, on one machine),
    # "api" (the API alone, any number of replicas sharing ORCHESTRATOR_DATABASE_URL; it runs no VM and sends
    # each VM's calls to the host agent it runs on) or "host" (a host agent: runs QEMU on this machine).
    orchestrator_role: Literal["all", "api", "host"] = Field("all", validation_alias="VERS_ORCHESTRATOR_ROLE")
    # A host agent's name (the machine's hostname when empty), the address the API reaches it at, and where
    # it listens (VERS_HOST_ADDR when empty). It tells the API it is alive every VERS_HOST_HEARTBEAT_SECONDS;
    # the API marks a host silent for VERS_HOST_DEAD_SECONDS dead, with the VMs that ran on it.
    host_id: str = Field("", validation_alias="VERS_HOST_ID")
    host_addr: str = Field("127.0.0.1:50054", validation_alias="VERS_HOST_ADDR")
    host_listen_addr: str = Field("", validation_alias="VERS_HOST_LISTEN_ADDR")
    host_heartbeat_seconds: float = Field(2.0, gt=0, validation_alias="VERS_HOST_HEARTBEAT_SECONDS")
    host_dead_seconds: float = Field(15.0, gt=0, validation_alias="VERS_HOST_DEAD_SECONDS")
    # When the platform runs as root, QEMU runs as this user (made by scripts/bootstrap.sh); empty: as
    # the platform's own user.
    qemu_user: str = Field("vers-qemu", validation_alias="VERS_QEMU_USER")

    # What one organization may hold, unless the administrator set its own limits (`vers admin org
    # limits`): VMs that exist (running, paused or sleeping), their disks' sizes, commits (count and
    # bytes), repositories, tags and API keys. (vCPUs and memory above count the VMs that run.)
    org_max_vms: int = Field(64, validation_alias="VERS_ORG_MAX_VMS")
    org_max_disk_mib: int = Field(262144, validation_alias="VERS_ORG_MAX_DISK_MIB")
    org_max_commits: int = Field(1000, validation_alias="VERS_ORG_MAX_COMMITS")
    org_max_commit_mib: int = Field(262144, validation_alias="VERS_ORG_MAX_COMMIT_MIB")
    org_max_repositories: int = Field(100, validation_alias="VERS_ORG_MAX_REPOSITORIES")
    org_max_tags: int = Field(2000, validation_alias="VERS_ORG_MAX_TAGS")
    org_max_api_keys: int = Field(50, validation_alias="VERS_ORG_MAX_API_KEYS")
    # Tag history kept per repository: its newest events.
    tag_history_max_events: int = Field(10000, validation_alias="VERS_TAG_HISTORY_MAX_EVENTS")

    # Governance: how often the registry applies every org's retention rules by itself (seconds; 0 never,
    # `vers gc` still does on demand), and guest paths whose secrets the scan before publishing does not
    # report (comma-separated shell patterns; the SSH host keys a guest makes at its first boot by default).
    gc_interval_seconds: int = Field(3600, validation_alias="VERS_GC_INTERVAL_SECONDS")
    secret_scan_allow_paths: str = Field("/etc/ssh/ssh_host_*_key,/etc/dropbear/*", validation_alias="VERS_SECRET_SCAN_ALLOW_PATHS")

    # The gateway's rate limits: requests per second per API key (a token bucket of this burst), and
    # failed authentications per minute per client address before they are slowed down and refused;
    # an unknown token is remembered as unknown this long.
    rate_limit_per_second: float = Field(50.0, validation_alias="VERS_RATE_LIMIT_PER_SECOND")
    rate_limit_burst: int = Field(200, validation_alias="VERS_RATE_LIMIT_BURST")
    auth_failures_per_minute: int = Field(30, validation_alias="VERS_AUTH_FAILURES_PER_MINUTE")
    auth_negative_cache_seconds: float = Field(30.0, validation_alias="VERS_AUTH_NEGATIVE_CACHE_SECONDS")
    # Deadline of a call from the gateway to a service and between services (a call that carries its
    # own timeout, such as an exec, gets that plus this).
    rpc_timeout_seconds: float = Field(60.0, validation_alias="VERS_RPC_TIMEOUT_SECONDS")

    # TLS, for deployments that listen beyond loopback: the gateway's certificate and key (HTTPS), and
    # the gRPC services' certificate and key, with the CA their clients (gateway, peers, CLI) check it with.
    http_tls_cert_file: str = Field("", validation_alias="VERS_HTTP_TLS_CERT_FILE")
    http_tls_key_file: str = Field("", validation_alias="VERS_HTTP_TLS_KEY_FILE")
    grpc_tls_cert_file: str = Field("", validation_alias="VERS_GRPC_TLS_CERT_FILE")
    grpc_tls_key_file: str = Field("", validation_alias="VERS_GRPC_TLS_KEY_FILE")
    grpc_tls_ca_file: str = Field("", validation_alias="VERS_GRPC_TLS_CA_FILE")

    # Supported images (`vers admin images bake`): the Debian suite and archives their root disks come
    # from, and the npm registry for Node.js and tools that ship there.
    image_suite: str = Field("trixie", validation_alias="VERS_IMAGE_SUITE")
    debian_mirror: str = Field("http://deb.debian.org/debian", validation_alias="VERS_DEBIAN_MIRROR")
    debian_security_mirror: str = Field("http://deb.debian.org/debian-security", validation_alias="VERS_DEBIAN_SECURITY_MIRROR")
    npm_registry: str = Field("https://registry.npmjs.org", validation_alias="VERS_NPM_REGISTRY")

    # The secret the services sign their calls to each other with (see ServiceCredential); when empty,
    # `service.secret` in the data folder, made on first start. Set it where services share no folder.
    service_secret: str = Field("", validation_alias="VERS_SERVICE_SECRET")
    # The administrator's API key, given by the operator where the registry keeps no data folder of its own
    # (a Kubernetes Secret): "vers_" and at least 32 random characters. The registry makes it the administrator
    # key on start and revokes any other; when empty, admin.key in the data folder, made on the first start.
    admin_key: str = Field("", validation_alias="VERS_ADMIN_KEY")
    # On a stop, running VMs are put to sleep and woken on the next start; true leaves them running for
    # the next orchestrator to adopt (deployments under systemd, where restarts are short).
    keep_vms_running: bool = Field(False, validation_alias="VERS_KEEP_VMS_RUNNING")

    # Name of the organization `make run` creates on its first start.
    first_org: str = Field("default", validation_alias="VERS_FIRST_ORG")
    # The commit GET /system/version names when the orchestrator does not run from a git checkout (an
    # installed package); "unknown" when empty too.
    git_hash: str = Field("", validation_alias="VERS_GIT_HASH")

    def addr(self, service: str) -> str:
        return getattr(self, f"{service}_addr")

    def listen_addr(self, service: str) -> str:
        if service == "orchestrator" and self.orchestrator_role == "host":
            return self.host_listen_addr or self.host_addr
        return getattr(self, f"{service}_listen_addr") or self.addr(service)

    @property
    def host_name(self) -> str:
        """This host agent's name: VERS_HOST_ID, else the machine's hostname."""
        return self.host_id or socket.gethostname()

    def database_url(self, service: str) -> str:
        url = getattr(self, f"{service}_database_url")
        if url:
            return url
        return f"sqlite+aiosqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    @property
    def admin_key_file(self) -> Path:
        """The platform administrator's API key, written by the registry on its first start."""
        return self.data_dir / "admin.key"

    @property
    def service_secret_file(self) -> Path:
        return self.data_dir / "service.secret"

    @model_validator(mode="after")
    def _a_database_per_service(self) -> Settings:
        """Each service's tables and schema revisions are its own (they share names: audit_events, alembic_version)."""
        urls = [(service, getattr(self, f"{service}_database_url")) for service in SERVICES]
        for index, (service, url) in enumerate(urls):
            for other, other_url in urls[index + 1 :]:
                if url and url == other_url:
                    raise ValueError(
                        f"{service.upper()}_DATABASE_URL and {other.upper()}_DATABASE_URL name the same database: each "
                        f"service needs a database of its own (createdb vers_{service}; createdb vers_{other})"
                    )
        return self

    @field_validator("commit_store")
    @classmethod
    def _commit_store_is_local_or_absolute(cls, value: str) -> str:
        if value != "local" and not value.startswith("/"):
            raise ValueError(f'VERS_COMMIT_STORE must be "local" or the absolute path of a shared folder, not {value!r}')
        return value

    @property
    def commit_store_path(self) -> Path | None:
        """The shared commit store's folder; None for "local" (commits stay in the data folder)."""
        return None if self.commit_store == "local" else Path(self.commit_store)

    @property
    def image_root(self) -> Path:
        return Path(self.images_dir).resolve() if self.images_dir else self.data_dir.resolve() / "images"

    @property
    def vm_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:12]
        return Path("/dev/shm") / f"vers-{digest}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.http_tls_cert_file else "http"
        return f"{scheme}://{self.http_host}:{self.http_port}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
