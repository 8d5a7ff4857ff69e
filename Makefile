# imapproxy: the one entry point for set-up, tests, demo and benchmarks.
#
#   make demo    install what is needed, start a private Dovecot with demo users, run the proxy
#   make test    install what the tests need and run them all (what .ci/run does)
#   make fuzz    the deep hypothesis profile of the protocol fuzz tests
#
# Debian packages come from apt (as root, or through sudo); Python packages go into .venv.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := dovecot-imapd dovecot-core imapproxy tmux
PREFIX      ?= /usr/local
DESTDIR     ?=

.PHONY: all deps system-deps venv test lint typecheck unit demo fuzz bench clean

all: test

# -- dependencies -------------------------------------------------------------------------------

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV) || { \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
	  $(PYTHON) -m venv $(VENV); }

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

deps: system-deps venv

# -- tests --------------------------------------------------------------------------------------

lint: venv
	$(VENV)/bin/ruff check imapproxy pimpstat tests bench
	$(VENV)/bin/ruff format --check imapproxy pimpstat tests bench

SANS_IO := imapproxy/protocol imapproxy/cache.py imapproxy/session.py imapproxy/backend_login.py \
	imapproxy/credentials.py imapproxy/config.py imapproxy/stats.py imapproxy/select_cache.py \
	imapproxy/redact.py pimpstat/view.py

typecheck: venv
	$(VENV)/bin/mypy imapproxy pimpstat
	$(VENV)/bin/mypy --strict $(SANS_IO)

unit: venv
	$(PY) -m pytest -q -p no:cacheprovider

test: deps lint typecheck unit

fuzz: deps
	HYPOTHESIS_PROFILE=deep $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

# -- demo ---------------------------------------------------------------------------------------

demo: deps
	$(PY) -m tests.support.demo

# -- benchmarks ---------------------------------------------------------------------------------

bench: deps
	$(PY) -m bench.run $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache demo-run
