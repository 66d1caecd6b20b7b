# Every command sets up what is missing first (scripts/setup.sh), so each works on a fresh clone.
# CI (.ci/run) runs exactly `make check` and `make test`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CONFIG ?= configs/multi30k_en_de.yaml
ENV = venv=$$(scripts/setup.sh)
# The tests also exercise `mtkit export`, which needs the peers of the bench extra.
TEST_ENV = venv=$$(MTKIT_EXTRAS=dev,bench scripts/setup.sh)

.PHONY: setup run test check clean

setup:
	@scripts/setup.sh >/dev/null

## The main job: the whole pipeline on the default data (Multi30k En-De from ../shared).
run:
	@$(ENV); "$$venv/bin/mtkit" pipeline -c $(CONFIG)

## The tests.
test:
	@$(TEST_ENV); "$$venv/bin/python" -m pytest

## Lint and type-check.
check:
	@$(TEST_ENV); "$$venv/bin/ruff" check mtkit tests scripts && "$$venv/bin/mypy"

clean:
	rm -rf runs .pytest_cache .ruff_cache
