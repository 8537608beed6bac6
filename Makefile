# One command each: `make demo` and `make test` create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data/stdlib_text_document

.PHONY: setup demo test test-quick clean

$(BIN)/.installed: setup.py requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

$(DATA).bin: | setup
	$(BIN)/python examples/prepare_corpus.py --output-prefix $(DATA)

demo: setup $(DATA).bin
	PATH=$(abspath $(BIN)):$$PATH bash examples/demo.sh

test: setup
	$(BIN)/python -m pytest -q

test-quick: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) data runs
