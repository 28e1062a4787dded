# wormhole — `make demo` shows it, `make test` checks it. Both set themselves up.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: all deps install test unit functional demo bench clean

all: install

deps:
	./scripts/install-deps test

$(STAMP): pyproject.toml
	@python=$$(./scripts/find-python) && \
	  { [ -x $(PY) ] || $$python -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(STAMP)

unit: install
	$(PY) -m pytest -q unit_tests

functional: deps install
	./scripts/with-docker $(PY) -m pytest -q functional_tests

# with-docker: a Docker engine (dockerd started when none answers, stopped after only if it
# was started here) and the images of examples/images/ around the command.
test: deps install
	$(PY) -m pytest -q unit_tests
	./scripts/with-docker $(PY) -m pytest -q functional_tests

demo: deps install
	./scripts/with-docker ./examples/demo.sh

bench: install
	./scripts/install-deps bench
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
