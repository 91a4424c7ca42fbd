# The two commands that matter: `make run` starts the platform, `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install images images-all gen lint lint-protos breaking-protos protos-baseline bench bench-vm bench-net bench-fsck bench-registry bench-fork bench-hostile bench-scan bench-files bench-db bench-hosts clean

run: $(STAMP) images
	$(PY) -m services.platform

# The tests that boot VMs build the guest images first (into the checkout's .vers/images, whatever
# VERS_DATA_DIR says) when they are missing.
test: $(STAMP) lint
	$(PY) -m pytest

# The tests that boot no VM (unit tests, services without guests): seconds, no images built.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not vm"

# Guest kernel, initramfs and root disks from Debian packages, cached in VERS_DATA_DIR/images.
images: $(STAMP)
	$(PY) -m services.orchestrator.images build

# Every supported image (vers/node, python, rust, go, pi-agent, cc-agent) baked and published as
# vers/<name>:latest and vers/<name>:<date>, through the API of the platform `make run` started (VERS_URL),
# with the administrator's key (it acts for the `vers` organization) unless VERS_API_KEY names another.
images-all: $(STAMP) images
	VERS_API_KEY=$${VERS_API_KEY:-$$(cat $${VERS_DATA_DIR:-.vers}/admin.key)} $(VENV)/bin/vers admin images bake

# Every benchmark, one after another: each prints its figures (the issue's goals next to their goal, with the
# machine's facts) and writes bench/results/<name>.json. About 25 minutes on 2 cores under TCG.
bench: bench-vm bench-registry bench-fork bench-hosts bench-net bench-files bench-hostile bench-fsck bench-scan bench-db

bench-vm: $(STAMP) images
	$(PY) bench/vm.py

bench-net: $(STAMP) images
	$(PY) bench/net.py

bench-fsck: $(STAMP)
	$(PY) bench/fsck.py

bench-registry: $(STAMP) images
	$(PY) bench/registry.py

# A public tag forked into another organization over REST (and once through `vers repo fork`).
bench-fork: $(STAMP) images
	$(PY) bench/fork.py

bench-hostile: $(STAMP) images
	$(PY) bench/hostile.py

bench-scan: $(STAMP)
	$(PY) bench/scan.py

bench-files: $(STAMP) images
	$(PY) bench/files.py

# Tag moves per second on SQLite and on PostgreSQL (a server of its own in a temporary folder); no VM.
bench-db: $(STAMP)
	$(PY) bench/db.py

# Several VM hosts on this machine: branch to first exec of a commit from another host (cold and warm
# cache) against the same host, and the commit with its copy to the shared store.
bench-hosts: $(STAMP) images
	$(PY) bench/hosts.py

install: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh tests/node/package-lock.json
	bash scripts/bootstrap.sh "$(VENV)"
	touch $@

# Regenerate gen/ from protos/ (pinned grpcio-tools and mypy-protobuf); commit the result.
gen: $(STAMP)
	$(PY) scripts/gen_protos.py

# buf lint, STANDARD rules, no ignores.
lint-protos: $(STAMP)
	$(PY) scripts/lint_protos.py

# buf breaking (buf.yaml's FILE rules) against protos-baseline.binpb, the protos as last released.
breaking-protos: $(STAMP)
	$(PY) scripts/breaking_protos.py

# After an intended breaking change to the protos is committed: the baseline from HEAD's protos; commit it.
protos-baseline: $(STAMP)
	$(PY) scripts/breaking_protos.py --update

# Every linter, before the tests: ruff (lint and format), mypy (pyproject.toml), buf lint and buf breaking.
lint: $(STAMP) lint-protos breaking-protos
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .build tests/node/node_modules
