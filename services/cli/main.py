"""The `vers` command line: VMs, commits, repositories and tags over the REST gateway. This module is the
entry point: it adds every module's commands to the root group (services/cli/app.py) and runs it."""

from __future__ import annotations

from services.cli import admin, commits, copy, deploy, domains, envvars, governance, identity, mcp, repos, streams, vmadmin, vms
from services.cli.app import cli

for module in (identity, vms, repos, domains, admin, governance, streams, copy, vmadmin, commits, envvars, deploy, mcp):
    for found in module.TOP_COMMANDS:
        cli.add_command(found)


def main() -> None:
    cli(prog_name="vers")


if __name__ == "__main__":
    main()
