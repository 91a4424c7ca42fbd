#!/bin/sh
# Team CI: an always-current dev environment. Run on every merge to main, from the app's checkout:
#
#   REPO=my-app INSTALL='./install.sh' examples/ci-latest.sh
#
# It starts a scratch VM from my-app:latest, brings the new code in, reinstalls (deps, migrations,
# warm caches: whatever $INSTALL does), commits the VM and moves my-app:latest to the commit, so the
# team's next `vers run-commit my-app:latest --ref` lands on a VM matching trunk. latest only moves
# when every step worked. Needs `vers` on PATH with VERS_URL/VERS_API_KEY (or `vers login`).
#
# The VM is given the checkout (git archive of HEAD, or the folder as it is) rather than pulling it,
# so it needs neither network nor credentials; where the VM can reach the remote, replace the copy
# with `vers exec "$vm" -- 'cd /srv/app && git pull'`.
set -eu

repo=${REPO:-my-app}
tag=${TAG:-latest}
app_dir=${APP_DIR:-.}
target=${TARGET:-/srv/app}
install=${INSTALL:-./install.sh}
vm="ci-$$"

vers run-commit "$repo:$tag" --ref --vm-alias "$vm"
trap 'vers kill "$vm" >/dev/null 2>&1 || true' EXIT

if git -C "$app_dir" rev-parse --git-dir >/dev/null 2>&1; then
  git -C "$app_dir" archive --format=tar HEAD
else
  tar -C "$app_dir" -cf - .
fi | base64 | vers exec --stdin "$vm" -- "rm -rf '$target' && mkdir -p '$target' && base64 -d | tar -xf - -C '$target'"

vers exec "$vm" -- "cd '$target' && $install"

commit=$(vers commit "$vm" --name "$repo ci $(date -u +%Y-%m-%dT%H:%MZ)" | sed -n 's/^→ commit //p')
[ -n "$commit" ] || { echo "ci-latest: the commit printed no ID" >&2; exit 1; }
vers repo tag update "$repo" "$tag" --commit "$commit"
