"""What one organization may hold: its own limits where the platform administrator set them (the registry
keeps them), else the settings' defaults. Every service learns an org's limits with its caller's identity
(the registry's Authenticate answer) and checks them in the transaction that adds the thing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from services.common.errors import ResourceExhausted

# Each limit, the setting that gives its default, and what it counts (for messages).
LIMITS: dict[str, tuple[str, str]] = {
    "max_vms": ("VERS_ORG_MAX_VMS", "VMs (booting, running, paused or sleeping)"),
    "max_vcpus": ("VERS_ORG_MAX_VCPUS", "vCPUs of running VMs"),
    "max_memory_mib": ("VERS_ORG_MAX_MEMORY_MIB", "MiB of memory of running VMs"),
    "max_disk_mib": ("VERS_ORG_MAX_DISK_MIB", "MiB of VM disks"),
    "max_commits": ("VERS_ORG_MAX_COMMITS", "commits"),
    "max_commit_mib": ("VERS_ORG_MAX_COMMIT_MIB", "MiB of commits"),
    "max_repositories": ("VERS_ORG_MAX_REPOSITORIES", "repositories"),
    "max_tags": ("VERS_ORG_MAX_TAGS", "tags (repository tags and legacy tags)"),
    "max_api_keys": ("VERS_ORG_MAX_API_KEYS", "API keys"),
    "max_domains": ("VERS_ORG_MAX_DOMAINS", "domains"),
}


@dataclass(frozen=True)
class OrgLimits:
    max_vms: int
    max_vcpus: int
    max_memory_mib: int
    max_disk_mib: int
    max_commits: int
    max_commit_mib: int
    max_repositories: int
    max_tags: int
    max_api_keys: int
    max_domains: int

    @classmethod
    def defaults(cls, settings: Any) -> OrgLimits:
        """The settings' org_max_* values."""
        return cls(**{name: int(getattr(settings, f"org_{name}")) for name in LIMITS})

    @classmethod
    def from_message(cls, message: Any) -> OrgLimits:
        return cls(**{name: int(getattr(message, name)) for name in LIMITS})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def replace(self, **changes: int | None) -> OrgLimits:
        return OrgLimits(**{**self.as_dict(), **{k: v for k, v in changes.items() if v is not None}})


assert [f.name for f in fields(OrgLimits)] == list(LIMITS)


def check(limits: OrgLimits, name: str, used: int, adding: int, org: str, hint: str = "") -> None:
    """ResourceExhausted unless `used + adding` stays within the limit `name` (both in the limit's unit: MiB
    for the *_mib limits). `hint` says how to free some, when there is more to say than "delete"."""
    limit = getattr(limits, name)
    if used + adding > limit:
        raise exceeded(name, limit, used, adding, org, hint)


def exceeded(name: str, limit: int, used: int, adding: int, org: str, hint: str = "") -> ResourceExhausted:
    setting, what = LIMITS[name]
    flag = "--" + name.replace("_", "-")
    return ResourceExhausted(
        f"organization {org!r} would go over its limit {name}: it may have {limit} {what}, has {used} and this "
        f"request needs {adding} more. Free some ({hint or 'delete what it no longer needs'}), or have the platform "
        f"administrator raise the limit: vers admin org limits {org} {flag} N (or {setting} for every organization)"
    )
