# Two entry points: `make run` and `make test`. Both create .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench soak clean

$(STAMP): requirements.txt requirements-dev.txt requirements-ray.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python server.py $(ARGS)

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy visionstream

test: lint
	$(BIN)/python -m pytest -m "not soak" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

soak: $(STAMP)
	$(BIN)/python -m pytest -m soak -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
