# The two commands that matter: `make run` starts the platform, `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install images images-all gen lint-protos bench-vm bench-net bench-fsck bench-registry bench-hostile bench-scan bench-files clean

run: $(STAMP) images
	$(PY) -m services.platform

test: $(STAMP) images
	$(PY) -m pytest

# Guest kernel, initramfs and root disks from Debian packages, cached in VERS_DATA_DIR/images.
images: $(STAMP)
	$(PY) -m services.orchestrator.images build

# Every supported image (vers/node, python, rust, go, pi-agent, cc-agent) baked and published as
# vers/<name>:latest and vers/<name>:<date>, against the platform `make run` started (VERS_URL).
images-all: $(STAMP) images
	$(VENV)/bin/vers admin images bake

bench-vm: $(STAMP) images
	$(PY) bench/vm.py

bench-net: $(STAMP) images
	$(PY) bench/net.py

bench-fsck: $(STAMP)
	$(PY) bench/fsck.py

bench-registry: $(STAMP) images
	$(PY) bench/registry.py

bench-hostile: $(STAMP) images
	$(PY) bench/hostile.py

bench-scan: $(STAMP)
	$(PY) bench/scan.py

bench-files: $(STAMP) images
	$(PY) bench/files.py

install: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh "$(VENV)"
	touch $@

# Regenerate gen/ from protos/ (pinned grpcio-tools and mypy-protobuf); commit the result.
gen: $(STAMP)
	$(PY) scripts/gen_protos.py

# buf lint, STANDARD rules, no ignores.
lint-protos: $(STAMP)
	$(PY) scripts/lint_protos.py

clean:
	rm -rf $(VENV) .build
