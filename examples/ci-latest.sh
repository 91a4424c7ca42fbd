#!/bin/sh
# Team CI: an always-current dev environment. Run on every merge to main, from the app's checkout:
#
#   REPO=my-app INSTALL='./install.sh' examples/ci-latest.sh
#
# It starts a scratch VM from my-app:latest, has the VM pull the commit this job builds from the app's
# git remote (a clone the first time), reinstalls (deps, migrations, warm caches: whatever $INSTALL
# does), commits the VM and moves my-app:latest to the commit, so the team's next
# `vers run-commit my-app:latest --ref` lands on a VM matching trunk. latest only moves when every step
# worked. Needs `vers` on PATH with VERS_URL/VERS_API_KEY (or `vers login`), and a VM that can reach the
# remote (network "nat", the default). GIT_REMOTE and GIT_REF default to the checkout's origin and HEAD.
set -eu

repo=${REPO:-my-app}
tag=${TAG:-latest}
app_dir=${APP_DIR:-.}
target=${TARGET:-/srv/app}
install=${INSTALL:-./install.sh}
remote=${GIT_REMOTE:-$(git -C "$app_dir" remote get-url origin)}
ref=${GIT_REF:-$(git -C "$app_dir" rev-parse HEAD)}
vm="ci-$$"

vers run-commit "$repo:$tag" --ref --vm-alias "$vm"
trap 'vers kill "$vm" >/dev/null 2>&1 || true' EXIT

# The remote and ref travel as environment variables, never spliced into the script; the clone keeps the
# remote without credentials (a CI token in the URL would otherwise be committed with the VM).
public_remote=$(printf '%s' "$remote" | sed 's#^\([a-z+]*://\)[^/@]*@#\1#')
vers exec -e "REMOTE=$remote" -e "PUBLIC_REMOTE=$public_remote" -e "REF=$ref" -e "TARGET=$target" "$vm" -- 'set -e
if [ -d "$TARGET/.git" ]; then
  cd "$TARGET" && git fetch -q "$REMOTE"
else
  git clone -q "$REMOTE" "$TARGET" && cd "$TARGET"
fi
git remote set-url origin "$PUBLIC_REMOTE"
git checkout -q -f "$REF"'

vers exec -e "TARGET=$target" "$vm" -- "cd \"\$TARGET\" && $install"

commit=$(vers commit "$vm" --name "$repo ci $(date -u +%Y-%m-%dT%H:%MZ)" | sed -n 's/^→ commit //p')
[ -n "$commit" ] || { echo "ci-latest: the commit printed no ID" >&2; exit 1; }
vers repo tag update "$repo" "$tag" --commit "$commit"
