# The two commands of the README. Both install what they need (scripts/bootstrap.sh).
.PHONY: up test bootstrap

bootstrap:
	bash scripts/bootstrap.sh

up: bootstrap
	.venv/bin/scanner-gateway up $(ARGS)

test: bootstrap
	.venv/bin/python -m pytest -q
