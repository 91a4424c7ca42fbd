"""`vers deploy`. main.py adds the commands; this module needs nothing from it."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from services.cli.output import Output, progress, vers_command
from services.cli.streams import stream_exec

if TYPE_CHECKING:
    from services.cli.app import Context


def to_terminal(stream: str, data: bytes) -> None:
    """A chunk of the guest's output on our stdout or stderr, as it comes."""
    target = sys.stderr.buffer if stream == "stderr" else sys.stdout.buffer
    target.write(data)
    target.flush()


def to_stderr(_stream: str, data: bytes) -> None:
    """With --format json stdout carries one JSON document only: the guest's output goes to stderr."""
    sys.stderr.buffer.write(data)
    sys.stderr.buffer.flush()


@vers_command("deploy")
@click.argument("repo_url", metavar="REPO_URL")
@click.option("--branch", default="", help="Branch to clone (default: the repository's default branch).")
@click.option("--install", "install", default="", metavar="CMD", help="Install command, run first (e.g. 'npm ci').")
@click.option("--build", "build", default="", metavar="CMD", help="Build command, run after install (e.g. 'npm run build').")
@click.option(
    "--run",
    "run",
    default="",
    metavar="CMD",
    help="Command started in the background once built (e.g. 'npm start'); its output goes to /var/log/vers-deploy.log in the VM.",
)
@click.option("--working-dir", default="", metavar="DIR", help="Folder of the repository the commands run in.")
@click.option("--name", default="", help="The deploy's name (default: the repository's); labels the VM vers.deploy=NAME.")
@click.option("--wait", is_flag=True, help="Follow the clone, install and build as they run; exit with their exit code.")
def deploy(
    ctx: Context, out: Output, repo_url: str, branch: str, install: str, build: str, run: str, working_dir: str, name: str, wait: bool
) -> None:
    """Deploy a git repository to a new VM: it clones REPO_URL (owner/repo, on the platform's
    VERS_DEPLOY_GIT_BASE, or an http, https or git URL), runs the install and build commands in it, and
    starts the run command in the background. Without --wait it answers at once with the VM."""
    settings = {"install_command": install, "build_command": build, "run_command": run, "working_directory": working_dir}
    body: dict[str, Any] = {"repo": repo_url, "settings": {key: value for key, value in settings.items() if value}}
    if branch:
        body["branch"] = branch
    if name:
        body["name"] = name
    with progress("Starting the deploy…"):
        answer = ctx.call("POST", "/api/v1/deploy", json=body)
    vm_id, project_id = answer["vm_id"], answer["project_id"]
    ctx.remember(vm_id)
    if not wait:
        out.fields(
            answer, [("VM", vm_id), ("Project", project_id), ("Status", answer.get("status"))], f"✓ Deploying {repo_url} to VM {vm_id}"
        )
        return
    if not out.json:
        out.fields(answer, [("VM", vm_id), ("Project", project_id)], f"✓ Deploying {repo_url} to VM {vm_id}")
    credentials = ctx.credentials
    follow = to_stderr if out.json else to_terminal
    code = stream_exec(credentials.url, credentials.api_key, vm_id, {"exec_id": project_id}, follow, attach_only=True)
    status = "deployed" if code == 0 else "failed"
    if out.json:
        out.result({**answer, "status": status, "exit_code": code})
    elif code == 0:
        click.echo(f"✓ Deployed to VM {vm_id}" + (" (the run command goes on in the background)" if run else ""))
    else:
        click.echo(f"✗ The deploy failed with exit code {code} (VM {vm_id} is left for a look: `vers connect {vm_id}`)", err=True)
    sys.exit(code)


# Top-level commands.
TOP_COMMANDS: list[click.Command] = [deploy]
