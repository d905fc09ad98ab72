# The two commands of the README, and their helpers.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test lint check-deploy bench install clean

run: install  ## The gateway on embedded defaults + the fake upstream; prints how to call it.
	@mkdir -p var
	@bash scripts/run.sh

test: install lint  ## The whole test suite (CI=true: services must be there).
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

check-deploy: install  ## Django's deployment checks with a production-like environment.
	DJANGO_SECRET_KEY=$$(head -c 48 /dev/urandom | base64) DJANGO_HTTPS=true \
	DJANGO_ALLOWED_HOSTS=gateway.example.com \
	GATEWAY_KEY_HASH_SECRET=$$(head -c 48 /dev/urandom | base64) \
	GATEWAY_ENCRYPTION_KEY=$$($(PY) -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())') \
	$(PY) manage.py check --deploy --fail-level WARNING

bench: install  ## Side-by-side relay benchmark (see bench/README.md); BENCH_ARGS=--quick etc.
	@command -v wrk > /dev/null && command -v nginx > /dev/null || \
		(apt-get update -qq && apt-get install -y -qq wrk nginx > /dev/null)
	$(PY) -m pip install -q -r bench/requirements.txt
	$(PY) bench/run.py $(BENCH_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

clean:
	rm -rf $(VENV) db.sqlite3* test_db_*.sqlite3* var staticfiles
