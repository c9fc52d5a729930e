# `make tour` and `make test` bootstrap .venv themselves: a clean clone needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
comma  := ,
PY     := $(VENV)/bin/python
EXTRAS ?= dev,deepspeed,fairscale,accelerate,profile
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

PYTEST_ARGS ?=

.PHONY: tour test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

tour: $(STAMP)
	$(VENV)/bin/dtlab tour

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
