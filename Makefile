# The two commands (see README.md): `make demo` runs the simulated closed-loop demo,
# `make test` runs the whole test suite. Both set up .venv first when needed.
.PHONY: setup demo test bench clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup_venv.sh

demo: setup
	@bash scripts/run_demo.sh $(ARGS)

test: setup
	@bash scripts/run_tests.sh $(ARGS)

clean:
	rm -rf build $(VENV)
