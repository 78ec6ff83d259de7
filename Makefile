# The two commands of the README. Both do all of their own set-up on a fresh Debian 12 machine.
VENV ?= .venv
export FORGED_CONFIG_DIR ?= $(CURDIR)/etc/forged
export FORGED_RUN_DIR ?= $(CURDIR)/build/run
export FORGED_STATE_DIR ?= $(CURDIR)/build/state

.PHONY: run test lint setup setup-test clean arm64-boot

run: setup
	$(VENV)/bin/forged run

test: setup-test
	$(VENV)/bin/ruff check forged tests
	PATH=$(CURDIR)/build/tools/usr/bin:$$PATH $(VENV)/bin/pytest -q tests

lint: setup-test
	$(VENV)/bin/ruff check forged tests

setup:
	./scripts/bootstrap.sh

# The arm64 package booted under qemu-user up to READY and one completion (minutes; not in `test`,
# which runs the reduced arm64 check): docs/install.md records the last result.
arm64-boot: setup-test
	./scripts/build-deb.sh build/deb-arm64 arm64
	$(VENV)/bin/python tests/system/arm64_boot.py

setup-test:
	./scripts/bootstrap.sh --test

clean:
	rm -rf build .venv
