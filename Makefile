# Two commands on a fresh machine:
#   make demo   - the main job: a short Orbit Diffusion run on real molecules
#   make test   - the test suite
# Both create the virtual environment (.venv) when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= test,ase,plot,crystal,molecule,matbench,text

.PHONY: venv demo test test-slow benchmarks wheel-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade -c constraints.txt "pip>=23" "setuptools>=64" wheel
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[$(EXTRAS)]"
	# matbench 0.6 pins dependencies that do not build on Python 3.11: install it alone, beside the
	# current matminer / scikit-learn / monty of the [matbench] extra.
	$(PIP) install -q --no-deps matbench==0.6
	touch $(STAMP)

demo: venv
	$(PY) examples/demo.py

# pytest exits 5 when it collects no test: that is a failure here, never a silent pass.
test: venv
	$(PY) -m pytest -q -m "not slow" ; rc=$$? ; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi ; exit $$rc

test-slow: venv
	$(PY) -m pytest -q -m slow

benchmarks: venv
	$(PY) benchmarks/overhead.py --quick
	$(PY) benchmarks/variance.py --quick

clean:
	rm -rf $(VENV) build dist *.egg-info outputs
