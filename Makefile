# The two commands of the README. Each does its own set-up (scripts/setup.sh).
.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench: setup
	@bash scripts/bench.sh

clean:
	-.venv/bin/wedefi-dr stack down
	rm -rf .stack
