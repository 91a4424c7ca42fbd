"""What each supported image holds: Debian packages, npm packages, boot hooks, and the commands that
print the versions recorded in its commit's description."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Every supported image has these, as the documentation promises (git, curl, nginx, iproute2), plus
# what the Vers guest needs (resize2fs, a login shell, an SSH server for `vers ssh-config`) and what makes
# it pleasant (certificates, procps).
COMMON_PACKAGES = (
    "git", "curl", "nginx", "iproute2", "ca-certificates", "e2fsprogs", "bash", "procps", "less", "openssh-server", "rsync",
)  # fmt: skip

PI_REMOTE = """#!/bin/sh
# The pi coding agent in the tmux session "pi", driven remotely through a FIFO pair:
#   echo 'a prompt' > /run/pi/in    types the line into pi and presses Enter
#   cat /run/pi/out                 streams what pi's pane shows
# `tmux attach -t pi` (in `vers connect`) shows the same session.
export HOME=/root TERM=xterm-256color
mkdir -p /run/pi
[ -p /run/pi/in ] || mkfifo /run/pi/in
[ -p /run/pi/out ] || mkfifo /run/pi/out
cd /root
tmux new-session -d -s pi -x 160 -y 48 'pi; exec bash -l'
tmux pipe-pane -t pi -o 'cat > /run/pi/out'
(
  while :; do
    while IFS= read -r line; do
      tmux send-keys -t pi -l "$line"
      tmux send-keys -t pi Enter
    done < /run/pi/in
  done
) >/dev/null 2>&1 &
"""


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    packages: tuple[str, ...]
    # command in the guest -> what it prints is recorded under this label
    versions: dict[str, str]
    npm: tuple[str, ...] = ()
    # from <suite>-backports, where Debian carries current toolchains (Rust stable, Go) for its stable release
    backports: tuple[str, ...] = ()
    # Node.js of the active LTS line and the latest npm, from the npm registry (Debian's lags behind)
    node: bool = False
    # files written into the root disk: path -> (mode, content); boot hooks go in /etc/vers/boot.d
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    mem_size_mib: int = 512


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "node",
            "Node.js LTS with npm, git, curl, nginx, iproute2",
            (),
            {"node": "node --version", "npm": "npm --version"},
            node=True,
        ),
        Recipe(
            "debian",
            "Debian with apt, openssh-server, git, curl, nginx, iproute2",
            (),
            {"debian": "cat /etc/debian_version", "apt": "apt-get --version | head -n 1"},
        ),
        Recipe(
            "python",
            "Python 3 with pip, venv, git, curl, nginx, iproute2",
            ("python3", "python3-pip", "python3-venv"),
            {"python": "python3 --version", "pip": "pip3 --version"},
        ),
        Recipe(
            "rust",
            "Rust stable with cargo, git, curl, nginx, iproute2",
            ("gcc", "libc6-dev"),
            {"rustc": "rustc --version", "cargo": "cargo --version"},
            backports=("rustc", "cargo"),
        ),
        Recipe("go", "Go with git, curl, nginx, iproute2", (), {"go": "go version"}, backports=("golang-go",)),
        Recipe(
            "pi-agent",
            "pi coding agent pre-installed with tmux/FIFO scaffold, ready for remote driving",
            ("tmux", "ripgrep", "fd-find"),
            {"pi": "pi --version", "node": "node --version", "tmux": "tmux -V"},
            npm=("@mariozechner/pi-coding-agent",),
            node=True,
            files={
                "/etc/vers/boot.d/50-pi-remote": (0o755, PI_REMOTE),
                # pi looks for `fd`; Debian names it fdfind. Without these pi tries to download them at start.
                "/usr/local/bin/fd": (0o755, '#!/bin/sh\nexec fdfind "$@"\n'),
                "/root/.tmux.conf": (0o644, "set -g extended-keys on\nset -g extended-keys-format csi-u\n"),
            },
            mem_size_mib=1024,
        ),
        Recipe(
            "cc-agent",
            "Claude Code pre-installed with the runtime environment it needs",
            ("ripgrep", "tmux", "python3"),
            {"claude": "claude --version", "node": "node --version"},
            npm=("@anthropic-ai/claude-code",),
            node=True,
            mem_size_mib=1024,
        ),
    )
}


def recipe(name: str, extra_packages: tuple[str, ...] = ()) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"no supported image {name!r}; there are: {', '.join(RECIPES)}")
    found = RECIPES[name]
    if not extra_packages:
        return found
    return dataclasses.replace(found, packages=(*found.packages, *extra_packages))
