# wormhole — `make demo` shows it, `make test` checks it. Both set themselves up.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: all deps install test unit functional demo bench clean lab test-kernel

all: install

deps:
	./scripts/install-deps test

# setup.py and the engine's source: pip builds wormholed/_engine.c in place (editable install; "compat":
# a .pth path entry, not an import finder, whose import would cost every wormhole command ~20 ms).
$(STAMP): pyproject.toml setup.py wormholed/_engine.c
	@python=$$(./scripts/find-python) && \
	  { [ -x $(PY) ] || $$python -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test]'
	touch $@

# The CLI's modules compiled ahead: a `wormhole list` that compiles them first (no __pycache__,
# or PYTHONDONTWRITEBYTECODE set) takes a third longer. compileall skips what is up to date.
install: $(STAMP)
	@$(PY) -m compileall -q wormhole wormholed > /dev/null

unit: install
	$(PY) -m pytest -q unit_tests

# The kernel lab (scripts/kernel-lab): a Debian kernel with WireGuard and ESP booted under qemu on this
# machine's files, with a Docker engine of its own (scripts/with-docker inside). make test runs there the
# tests marked `kernel` (ipsec, xfrm: this machine's kernel lacks ESP) and those marked `lab` (kernel
# WireGuard), less the variants marked `full` (the lab emulates its CPU: a test takes about a minute
# there); make test-kernel runs every tunnel test there. Where the lab cannot boot, lab-or-skip
# prints a loud NOT RUN line instead.
LAB_PYTEST := scripts/with-docker .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=20
LAB_FILES  := functional_tests/test_ipsec.py functional_tests/test_xfrm_kernel.py functional_tests/test_tunnels.py
LAB_WHAT   := the kernel-lab tests (-m "(kernel or lab) and not full": ipsec, xfrm, kernel WireGuard)

functional: deps install
	./scripts/with-docker $(PY) -m pytest -q -m "not kernel" functional_tests
	@echo "*** NOT RUN by make functional: the kernel-marked tests (ipsec, xfrm on a kernel with ESP): make test or make test-kernel run them in the kernel lab ***"

# with-docker: a Docker engine (dockerd started when none answers, stopped after only if it
# was started here) and the images of examples/images/ around the command.
# The daemon relays TCP with the native engine unless WORMHOLE_ENGINE=python: every functional test
# runs on the native one, and the daemon-level wormhole tests again on the Python one (the relay
# tests, test_relay.py, cover both engines themselves).
PY_ENGINE_TESTS := functional_tests/test_wormholes.py functional_tests/test_remote.py functional_tests/test_handover.py \
    functional_tests/test_hardening.py::test_tcp_max_conns_and_idle_timeout_through_the_daemon

test: deps install
	@t0=$$(date +%s); $(PY) -m pytest -q unit_tests bench/test_parse.py && echo "[make test] unit (and the bench's parsers): $$(( $$(date +%s) - t0 )) s"
	@t0=$$(date +%s); $(MAKE) -s test-engine-asan && echo "[make test] engine under ASan/UBSan: $$(( $$(date +%s) - t0 )) s"
	@t0=$$(date +%s); ./scripts/with-docker $(PY) -m pytest -q --durations=25 -m "not kernel" functional_tests \
	    && echo "[make test] functional (this kernel): $$(( $$(date +%s) - t0 )) s"
	@t0=$$(date +%s); WORMHOLE_ENGINE=python $(PY) -m pytest -q $(PY_ENGINE_TESTS) \
	    && echo "[make test] wormhole tests on the Python engine: $$(( $$(date +%s) - t0 )) s"
	@t0=$$(date +%s); ./scripts/lab-or-skip '$(LAB_WHAT)' '$(LAB_PYTEST) -m "(kernel or lab) and not full" $(LAB_FILES)' \
	    && echo "[make test] kernel lab: $$(( $$(date +%s) - t0 )) s"

demo: deps install
	./scripts/with-docker ./examples/demo.sh

# bench: the host's tables (bench/run.py), then the kernel-lab rows (bench/lab.py: kernel WireGuard and
# ipsec, each wormhole against hand-built) in the kernel lab through lab-or-skip, bounded by LAB_TIMEOUT
# (900 s). Where the lab cannot be set up or boot (kernel-lab exits 125), the host rows stand and one
# loud NOT RUN line says why; a lab run that fails otherwise fails make bench.
LAB_BENCH := .venv/bin/python bench/lab.py

bench: install
	./scripts/install-deps bench
	$(PY) bench/run.py
	@t0=$$(date +%s); LAB_TIMEOUT=$${LAB_TIMEOUT:-900} ./scripts/lab-or-skip \
	    'the kernel-lab bench rows (kernel WireGuard, ipsec)' '$(LAB_BENCH)'; rc=$$?; \
	echo "[make bench] kernel lab: $$(( $$(date +%s) - t0 )) s wall clock (boot, and any wait for another lab, included)"; exit $$rc

# lab: the tunnel functional tests inside a Debian kernel (kernel WireGuard) booted with virtme-ng
# under qemu; ./scripts/kernel-lab 'COMMAND' runs another command there.
lab:
	./scripts/kernel-lab

# test-kernel: every tunnel test (WireGuard, ipsec, xfrm, README examples 5 and 8 over ipsec) in the lab.
test-kernel:
	./scripts/kernel-lab '$(LAB_PYTEST) $(LAB_FILES)'

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# test-engine-asan: wormholed/_engine.c built with AddressSanitizer and UBSan into a temporary directory,
# and unit_tests/test_engine.py run against that build (libasan preloaded: this Python is not ASan-built;
# detect_leaks=0: the interpreter's own leaks).
.PHONY: test-engine-asan
test-engine-asan: install
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	gcc -shared -fPIC -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -Wall -Wextra -I"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
	    wormholed/_engine.c -o "$$tmp/_engine.so" && \
	WORMHOLE_ENGINE_SO="$$tmp/_engine.so" LD_PRELOAD="$$(gcc -print-file-name=libasan.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
	$(PY) -m pytest -q -p no:cacheprovider unit_tests/test_engine.py

# dist: dist/wormhole, one executable file (PyInstaller --onefile, from pyproject's dist extra) that is
# wormholed when called by that name or as `wormhole daemon`, and wormhole otherwise (scripts/build-dist).
.PHONY: dist
dist: install
	@./scripts/build-dist
