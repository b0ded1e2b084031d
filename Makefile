# The two commands of the README. Each does its own set-up (scripts/setup.sh).
# Tests: two pytest workers, a file at a time each; every worker starts its own stack.
.PHONY: setup demo test lint bench clean ui

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

# The control plane for a new user: the stack (PostgreSQL, S3, Prefect server and worker),
# every deployment of prefect.yaml, and the URL to open.
ui: setup
	@.venv/bin/wedefi-dr stack up --with-deployments
	@echo "Prefect UI: $$(.venv/bin/wedefi-dr stack url)"

bench: setup
	@bash scripts/bench.sh $(ARGS)

clean:
	-.venv/bin/wedefi-dr stack down
	rm -rf .stack
