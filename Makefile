# wormhole — `make demo` shows it, `make test` checks it. Both set themselves up.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: all deps install test unit functional demo bench clean lab test-kernel

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

# Tests marked `kernel` (ipsec: ESP) need a kernel this machine lacks; they run in the kernel lab.
KERNEL_SKIP := echo "*** NOT RUN HERE: the kernel-marked tests (ipsec, functional_tests/test_ipsec.py) need a kernel with ESP: run them in the kernel lab ***"

functional: deps install
	./scripts/with-docker $(PY) -m pytest -q -m "not kernel" functional_tests
	@$(KERNEL_SKIP)

# with-docker: a Docker engine (dockerd started when none answers, stopped after only if it
# was started here) and the images of examples/images/ around the command.
test: deps install
	$(PY) -m pytest -q unit_tests
	./scripts/with-docker $(PY) -m pytest -q -m "not kernel" functional_tests
	@$(KERNEL_SKIP)

demo: deps install
	./scripts/with-docker ./examples/demo.sh

bench: install
	./scripts/install-deps bench
	$(PY) bench/run.py

# lab: the tunnel functional tests inside a Debian kernel (kernel WireGuard) booted with virtme-ng
# under qemu; ./scripts/kernel-lab 'COMMAND' runs another command there.
lab:
	./scripts/kernel-lab

# test-kernel: the tests that need a real kernel's WireGuard and ESP, in the lab (example 5 over
# ipsec needs a Docker engine in the lab, which it has not yet: left out, and said so).
test-kernel:
	./scripts/kernel-lab '.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 \
	    functional_tests/test_tunnels.py functional_tests/test_ipsec.py -k "not ex5"'
	@echo "*** NOT RUN: test_ipsec.py::test_readme_examples_over_ipsec[ex5] (no Docker engine in the lab yet) ***"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
