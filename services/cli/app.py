"""What every `vers` command shares: the root group, the per-invocation Context, the `command` decorator
and small helpers. services/cli/main.py adds each module's commands to the root group."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from services.cli import config, vmadmin
from services.cli.config import ConfigError, LocalState, check_alias
from services.cli.output import vers_command
from services.client import ApiClient
from services.common.ids import is_uuid


class Context:
    """What a command needs, made on first use so `--help` and usage errors never touch the network."""

    def __init__(self) -> None:
        self._client: ApiClient | None = None
        self._state: LocalState | None = None

    @functools.cached_property
    def credentials(self) -> config.Credentials:
        return config.credentials()

    @property
    def client(self) -> ApiClient:
        if self._client is None:
            found = self.credentials
            if not found.api_key:
                raise click.ClickException("no API key: run `vers login`, or set VERS_API_KEY")
            self._client = ApiClient(found.url, found.api_key)
        return self._client

    @property
    def state(self) -> LocalState:
        if self._state is None:
            self._state = LocalState(self.credentials.url)
        return self._state

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.client.request(method, path, **kwargs)

    def list_all(self, path: str, key: str | None = None, params: dict[str, Any] | None = None) -> Any:
        """Every page of a list (`key`: the list's field in the answer; None for an answer that is the list)."""
        return self.client.list_all(path, key, params)

    def vm(self, given: str | None) -> str:
        """The VM a command acts on: an alias, an ID or a unique ID prefix; the VM used last when none is given."""
        if not given:
            if not self.state.last_vm:
                raise click.UsageError("no VM given and none used yet: pass a VM ID or alias")
            return self.state.last_vm
        if given in self.state.aliases:
            return self.state.aliases[given]
        if is_uuid(given):
            return given
        prefix = given.rstrip("…").rstrip(".")  # IDs as the documentation abbreviates them: 2b4a…
        if len(prefix) < 4:
            raise click.ClickException(f"no VM {given!r}: not an alias here; an ID prefix needs at least 4 characters")
        matches = [vm["vm_id"] for vm in self.list_all("/api/v1/vm") if vm["vm_id"].startswith(prefix)]
        if len(matches) > 1:
            raise click.ClickException(f"{given!r} matches {len(matches)} VMs: give more of the ID")
        if not matches:
            raise click.ClickException(f"no VM {given!r}: not an alias here, nor the start of a VM ID in your organization")
        return matches[0]

    def remember(self, vm_id: str, alias: str = "") -> None:
        previous = self.state.remember(vm_id, alias)
        if previous:
            click.echo(f"alias {alias} now names VM {vm_id} (it named {previous})", err=True)


def command(group: click.Group, name: str, formatted: bool = True, **settings: Any) -> Callable[..., Any]:
    """A subcommand of `group` with `--format` (unless interactive), the shared Context and error handling."""

    def decorate(function: Callable[..., Any]) -> click.Command:
        found = vers_command(name, formatted, **settings)(function)
        group.add_command(found)
        return found

    return decorate


def alias_option(function: Callable[..., Any]) -> Callable[..., Any]:
    def checked(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
        if not value:
            return ""
        try:
            return check_alias(value)
        except ConfigError as error:
            raise click.BadParameter(str(error)) from None

    return click.option("--vm-alias", "alias", callback=checked, help="A local name for the new VM.")(function)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=vmadmin.print_version,
    help="Print this CLI's version and the server's, and exit.",
)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run VMs, commit them, branch them, and tag commits in repositories; keep those in check with
    immutable tags, retention rules and garbage collection (`vers gc`), and an audit log (`vers audit`)."""
    ctx.obj = Context()


# Each limit of an organization as `vers whoami` and `vers admin org limits` print it.
LIMIT_LABELS = {
    "max_vms": "Max VMs",
    "max_vcpus": "Max vCPUs",
    "max_memory_mib": "Max memory (MiB)",
    "max_disk_mib": "Max disk (MiB)",
    "max_commits": "Max commits",
    "max_commit_mib": "Max commit MiB",
    "max_repositories": "Max repositories",
    "max_tags": "Max tags",
    "max_api_keys": "Max API keys",
    "max_domains": "Max domains",
}
