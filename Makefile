# `make tour` and `make test` bootstrap .venv themselves: a clean clone needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
comma  := ,
PY     := $(VENV)/bin/python
EXTRAS ?= dev,deepspeed,fairscale,accelerate,profile
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

PYTEST_ARGS ?=

.PHONY: tour test docs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@case ",$(EXTRAS)," in *,deepspeed,*) \
	  echo "building DeepSpeed's CPU ops cpu_adam and shm_comm (about a minute, once a venv)"; \
	  $(PY) -c "from deepspeed.accelerator import get_accelerator as a; \
	    [a().create_op_builder(n).load(verbose=False) \
	     for n in ('CPUAdamBuilder', 'ShareMemCommBuilder')]";; \
	esac
	@touch $@

tour: $(STAMP)
	$(VENV)/bin/dtlab tour

# The reference run behind every figure in docs/ (about 50 minutes here; root for the cluster parts),
# then docs/ and docs/img/ rendered from it. `dtlab docs refresh --render` redraws only.
docs: $(STAMP)
	$(VENV)/bin/dtlab docs refresh

# Run as root, the tests bring up (and stop) the local Slurm cluster and ssh hosts themselves;
# the browser they open the reports in is installed here, as .ci/run does.
test: $(STAMP)
	@if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then \
	  echo "make test: installing Debian's chromium (the report tests open pages in it)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
	    >/dev/null || echo "make test: chromium not installed; its two checks will be skipped"; \
	fi
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
