# The two commands a newcomer needs: `make demo` and `make test`. Each sets up what it needs itself.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: demo test setup redis-server chromium clean lint cloudfunction

setup: $(STAMP) redis-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $@

# Debian's redis-server, installed where it is missing (tests and the demo start their own on free ports)
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server from Debian"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

# Debian's Chromium and its driver, for the search page's browser test (only `make test` needs them)
chromium:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  echo "installing chromium and chromium-driver from Debian"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: setup
	$(VENV)/bin/imgsearch demo $(ARGS)

test: setup chromium
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data build deploy/cloudfunctions/wheels

# the Cloud Function's source folder gets the product's wheel (see deploy/cloudfunctions/requirements.txt)
cloudfunction: setup
	rm -rf deploy/cloudfunctions/wheels
	$(VENV)/bin/python -m pip wheel -q --no-deps -w deploy/cloudfunctions/wheels .

lint: setup
	$(VENV)/bin/python -m pip install -q ruff mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
