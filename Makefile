# forwarder: the newcomer's commands. Everything runs as root on a fresh Debian machine with
# Python 3.11; missing system packages (DCMTK, Orthanc, libsystemd-dev) are installed here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR := run
RECEIVE_PORT ?= 11112
TEST_WORKERS ?= 2

.PHONY: all setup system-deps run test test-systemd test-faults soak lint typecheck bench deb \
	clean conformance-statement

all: test

# System packages: only installs what is missing, so a second run costs nothing.
system-deps:
	@missing=""; \
	command -v storescp >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	pkg-config --exists libsystemd 2>/dev/null || missing="$$missing libsystemd-dev pkg-config"; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v strace >/dev/null || missing="$$missing strace"; \
	command -v groff >/dev/null || missing="$$missing groff-base"; \
	command -v setpriv >/dev/null || missing="$$missing util-linux"; \
	command -v chattr >/dev/null || missing="$$missing e2fsprogs"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	[ -x /usr/bin/python3 ] || missing="$$missing python3"; \
	command -v dpkg-deb >/dev/null || missing="$$missing dpkg-dev"; \
	command -v fakeroot >/dev/null || missing="$$missing fakeroot"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	command -v systemd-nspawn >/dev/null || missing="$$missing systemd-container"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,systemd]'
	touch $(STAMP)

setup: system-deps $(STAMP)

# Start a bundled receiver on loopback and the daemon on the example config, in the foreground.
# Drop a DICOM file into run/incoming/ and watch it arrive in run/received/.
run: setup
	@mkdir -p $(RUN_DIR)/incoming $(RUN_DIR)/done $(RUN_DIR)/failed $(RUN_DIR)/received
	@$(BIN)/forwarder receive --port $(RECEIVE_PORT) --bind 127.0.0.1 --ae-title RECEIVER \
	    -v --output $(RUN_DIR)/received > $(RUN_DIR)/receiver.log 2>&1 & \
	  rpid=$$!; trap "kill $$rpid 2>/dev/null" EXIT INT TERM; \
	  echo "receiver (pid $$rpid) on 127.0.0.1:$(RECEIVE_PORT) writing to $(RUN_DIR)/received/ (log: $(RUN_DIR)/receiver.log)"; \
	  echo "drop DICOM files into $(RUN_DIR)/incoming/; Ctrl-C stops both"; \
	  $(BIN)/forwarder run -c config/forwarder.yaml

lint: setup
	$(BIN)/ruff check forwarder tests bench
	$(BIN)/ruff format --check forwarder tests bench

typecheck: setup
	$(BIN)/mypy --strict forwarder

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file to a worker: most tests
# wait on real peers, processes and timeouts, so two on two cores take about half the time of
# one. TEST_WORKERS=0 runs it in one process. The 30 slowest tests are listed at the end: the
# whole target must stay under 20 minutes on a 2-core machine (CI's log says where time goes).
test: setup lint typecheck
	$(BIN)/python -m pytest -q -m "not soak" -n $(TEST_WORKERS) --dist loadfile --durations=30 tests
	$(MAKE) --no-print-directory test-systemd

# The .deb (and a pip install) under a real systemd: a debootstrapped bookworm root, cached in
# /var/cache/forwarder-test-systemd, booted with systemd-nspawn; the operations scenario inside.
test-systemd: setup
	$(BIN)/python tests/systemd/scenario.py

test-faults: setup
	$(BIN)/python -m pytest -q -m faults tests

soak: setup
	$(BIN)/python -m pytest -q -m soak tests

bench: setup
	$(BIN)/python -m bench

# The DICOM Conformance Statement is rendered from the engine's own tables; run this after any
# change to them (tests/test_conformance_statement.py fails until the committed copy matches).
conformance-statement: setup
	$(BIN)/python -m forwarder.conformance docs/conformance-statement.md

deb: setup
	bash packaging/build-deb.sh

clean:
	rm -rf $(VENV) dist build *.egg-info $(RUN_DIR) bench/out bench/corpus
