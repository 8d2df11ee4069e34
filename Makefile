# The two commands of the README: `make run` and `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
# The admin CLI; `flask --app app` runs the same commands, slower to start (README).
CLI     := $(BIN)/python -m cli
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?= -n 2

.PHONY: run test setup deps test-deps browser nginx services migration clean bench bench-litellm wrk profile

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the requirement files change.
$(VENV)/.deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.test-deps: requirements.txt requirements-dev.txt $(VENV)/.deps
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

deps: $(VENV)/.deps
test-deps: $(VENV)/.test-deps

# Debian's chromium for the browser tests (Playwright never downloads a browser here).
browser:
	@test -x /usr/bin/chromium || { (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

setup: deps
	HOST=$(HOST) PORT=$(PORT) $(CLI) bootstrap

run: setup
	HOST=$(HOST) PORT=$(PORT) exec $(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

# Debian's nginx, to check the deploy/ example with `nginx -t` (tests/test_deploy.py).
nginx:
	@test -x /usr/sbin/nginx || { (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }

test: test-deps browser nginx
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Speed, measured here and never in `make test` (bench/README.md): the fake upstream direct,
# the LiteLLM proxy and TokenOpen side by side in one run. `make bench BENCH_ARGS="--help"`.
BENCH_ARGS ?=
LITELLM_VENV := bench/.litellm-venv

# The LiteLLM proxy we compare against, in its own venv (its pins are not ours).
$(LITELLM_VENV)/bin/litellm:
	$(PY) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q 'litellm[proxy]==1.106.12'

bench-litellm: $(LITELLM_VENV)/bin/litellm

wrk:
	@command -v wrk >/dev/null || { (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }

bench: deps wrk
	@$(MAKE) --no-print-directory bench-litellm || echo "LiteLLM proxy not installed: direct vs TokenOpen only"
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Where the worker's CPU goes under load (py-spy, installed here on first use; bench/README.md).
profile: deps wrk
	@test -x $(BIN)/py-spy || $(BIN)/pip install -q py-spy
	$(BIN)/python bench/profile.py $(PROFILE_ARGS)

# A new migration revision for a models.py change: `make migration MSG="add x to y"`.
# It diffs models.py against a scratch database upgraded to the current head.
MSG ?= schema change
migration: deps
	rm -rf /tmp/tokenopen-migration && mkdir -p /tmp/tokenopen-migration
	TOKENOPEN_DATABASE_URL=sqlite:////tmp/tokenopen-migration/m.db TOKENOPEN_SECRET_KEY=x \
	  $(CLI) db upgrade
	TOKENOPEN_DATABASE_URL=sqlite:////tmp/tokenopen-migration/m.db TOKENOPEN_SECRET_KEY=x \
	  $(CLI) db migrate -m "$(MSG)"
	@echo "new revision in migrations/versions/: review it, then commit it"

clean:
	rm -rf $(VENV) instance .pytest_cache
