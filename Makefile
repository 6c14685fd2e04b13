# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Label Studio in an environment of its own (it pins Django and its own HTTP stack): the slow
# round-trip test starts a real server from it and drives it with label-studio-sdk
LS_VENV ?= .venv-ls
LS_STAMP := $(LS_VENV)/.installed

.PHONY: install demo lint docs test test-slow label-studio bench clean

install: $(STAMP)

# torch/torchvision are pinned to the pair that installs from this machine's disk; install them
# first so the dependency resolver never reaches for another build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/visiontune demo

# ruff (style and likely bugs) and the import-linter layer contract, both configured in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# the docs site: docs/cli.md must match the parsers, then a strict build (a broken link or anchor fails)
docs: $(STAMP)
	$(PY) tools/cli_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

# on every core (pytest-xdist; tests/conftest.py shares the cores out between the workers): a file's tests stay
# on one worker, so its module-scoped fixtures are built once
test: lint docs
	$(PY) -m pytest -m "not slow" -q -n auto --dist loadfile

# the slow end-to-end checks, and the parser fuzzing with many more (random) examples
test-slow: $(STAMP) $(LS_STAMP)
	VISIONTUNE_FUZZ=long $(PY) -m pytest -m "slow or fuzz" -q

label-studio: $(LS_STAMP)

$(LS_STAMP):
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet label-studio==1.23.2
	touch $(LS_STAMP)

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(LS_VENV) runs .pytest_cache site
