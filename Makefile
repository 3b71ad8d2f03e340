# make test  - create .venv (Python 3.12) if missing, install, run the CPU test-suite
# make demo  - same install, then the end-to-end CPU demo
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: test demo install clean-venv gpu-test

$(PY):
	@PYTHON312=$$(bash tools/find_python312.sh) && echo "creating $(VENV) with $$PYTHON312" && \
		"$$PYTHON312" -m venv $(VENV)

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	bash examples/cpu_demo.sh

gpu-test: $(STAMP)
	$(PY) -m pytest -q -m gpu

clean-venv:
	rm -rf $(VENV)
