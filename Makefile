# The two commands that matter: `make run` starts the platform, `make test` runs every test.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install gen lint-protos clean

run: $(STAMP)
	$(PY) -m services.platform

test: $(STAMP)
	$(PY) -m pytest

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
