# imapproxy: the one entry point for set-up, tests, demo and benchmarks.
#
#   make demo    install what is needed, start a private Dovecot with demo users, run the proxy
#   make test    install what the tests need and run them all (what .ci/run does)
#   make fuzz    the deep hypothesis profile of every property test on hostile input
#
# Debian packages come from apt (as root, or through sudo); Python packages go into .venv.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# dovecot: the test backend; imapproxy: up-imapproxy, for comparisons; tmux: pimpstat's screen
# tests; systemd: systemd-analyze for the unit; devscripts: checkbashisms for the init script;
# haproxy: the load balancer in front of the proxy in the PROXY protocol tests; prometheus:
# promtool, which checks the /metrics output; strace: the system calls per page
# (python -m bench.syscalls); slapd, ldap-utils (ldapadd), postgresql: the directory and the
# database the routing tests route from (their own config and data in temp dirs).
APT_PACKAGES := dovecot-imapd dovecot-core imapproxy tmux systemd devscripts haproxy prometheus \
	strace slapd ldap-utils postgresql
PREFIX      ?= /usr/local
DESTDIR     ?=
SBINDIR     ?= $(PREFIX)/sbin
BINDIR      ?= $(PREFIX)/bin
LIBDIR      ?= $(PREFIX)/lib/imapproxy
DOCDIR      ?= $(PREFIX)/share/doc/imapproxy
SYSCONFDIR  ?= /etc
UNITDIR     ?= /lib/systemd/system
INITDIR     ?= /etc/init.d
DEFAULTDIR  ?= /etc/default
# The commands find their private Python environment relative to themselves, so that a tree
# staged under DESTDIR runs where it is and where it is copied to.
relpath = $(shell $(PYTHON) -c 'import os,sys; print(os.path.relpath(*sys.argv[1:]))' $(1) $(2))

.PHONY: all deps system-deps venv test lint typecheck unit demo fuzz bench clean \
	install install-conf install-init uninstall

all: test

# -- dependencies -------------------------------------------------------------------------------

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $$missing >/dev/null; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV) || { \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
	  $(PYTHON) -m venv $(VENV); }

$(VENV)/.installed: $(PY) pyproject.toml setup.py imapproxy/protocol/_scan.c
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
	imapproxy/redact.py imapproxy/throttle.py imapproxy/relay_state.py \
	imapproxy/reuse_check.py imapproxy/tls_status.py imapproxy/forwarding.py imapproxy/route.py \
	imapproxy/health.py imapproxy/affinity.py imapproxy/worker_message.py \
	imapproxy/session_transfer.py pimpstat/view.py

typecheck: venv
	$(VENV)/bin/mypy imapproxy pimpstat
	$(VENV)/bin/mypy --strict $(SANS_IO)

unit: venv
	$(PY) -m pytest -q -p no:cacheprovider

test: deps lint typecheck unit

# every file with hypothesis tests on hostile input
PROPERTY_TESTS := tests/test_fuzz.py tests/test_framing.py tests/test_scanner.py \
                  tests/test_grammar.py tests/test_session.py tests/test_proxy_header.py \
                  tests/test_forwarding.py tests/test_route.py tests/test_relay_state.py \
                  tests/test_session_transfer.py

fuzz: deps
	HYPOTHESIS_PROFILE=deep $(PY) -m pytest -q -p no:cacheprovider $(PROPERTY_TESTS)

# -- demo ---------------------------------------------------------------------------------------

demo: deps
	$(PY) -m tests.support.demo

# -- benchmarks ---------------------------------------------------------------------------------

bench: deps
	$(SUDO) $(PY) -m bench.run $(if $(QUICK),--quick,)

# -- installation -------------------------------------------------------------------------------
# make install       the program, in a private virtual environment under LIBDIR, with the
#                    commands in.imapproxyd and imapproxyd (SBINDIR) and pimpstat (BINDIR)
# make install-conf  /etc/imapproxy.conf, never overwriting an existing one
# make install-init  the systemd unit, the SysV init script and its defaults file

install:
	rm -rf $(DESTDIR)$(LIBDIR)
	$(PYTHON) -m venv $(DESTDIR)$(LIBDIR)
	$(DESTDIR)$(LIBDIR)/bin/python -m pip install -q --disable-pip-version-check .
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(DOCDIR)
	printf '#!/bin/sh\n# imapproxy, installed by make install\nexec "$$(dirname "$$(readlink -f "$$0")")/%s" -m imapproxy "$$@"\n' \
	  "$(call relpath,$(LIBDIR)/bin/python,$(SBINDIR))" > $(DESTDIR)$(SBINDIR)/in.imapproxyd
	printf '#!/bin/sh\n# pimpstat, installed by make install\nexec "$$(dirname "$$(readlink -f "$$0")")/%s" -m pimpstat "$$@"\n' \
	  "$(call relpath,$(LIBDIR)/bin/python,$(BINDIR))" > $(DESTDIR)$(BINDIR)/pimpstat
	chmod 755 $(DESTDIR)$(SBINDIR)/in.imapproxyd $(DESTDIR)$(BINDIR)/pimpstat
	ln -sf in.imapproxyd $(DESTDIR)$(SBINDIR)/imapproxyd
	install -m 644 README.md etc/imapproxy.conf $(DESTDIR)$(DOCDIR)/

install-conf:
	install -d $(DESTDIR)$(SYSCONFDIR)
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/imapproxy.conf ]; then \
	  echo "$(DESTDIR)$(SYSCONFDIR)/imapproxy.conf exists: left as it is"; \
	else \
	  install -m 644 etc/imapproxy.conf $(DESTDIR)$(SYSCONFDIR)/imapproxy.conf; \
	fi

install-init:
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(INITDIR) $(DESTDIR)$(DEFAULTDIR)
	sed -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' init/imapproxy.service \
	  > $(DESTDIR)$(UNITDIR)/imapproxy.service
	sed -e 's|@SBINDIR@|$(SBINDIR)|g' init/imapproxy > $(DESTDIR)$(INITDIR)/imapproxy
	chmod 755 $(DESTDIR)$(INITDIR)/imapproxy
	@[ -e $(DESTDIR)$(DEFAULTDIR)/imapproxy ] || \
	  install -m 644 init/imapproxy.default $(DESTDIR)$(DEFAULTDIR)/imapproxy

uninstall:
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(DOCDIR)
	rm -f $(DESTDIR)$(SBINDIR)/in.imapproxyd $(DESTDIR)$(SBINDIR)/imapproxyd \
	  $(DESTDIR)$(BINDIR)/pimpstat $(DESTDIR)$(UNITDIR)/imapproxy.service \
	  $(DESTDIR)$(INITDIR)/imapproxy
	@echo "$(SYSCONFDIR)/imapproxy.conf and $(DEFAULTDIR)/imapproxy are kept (your settings)"

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache demo-run
