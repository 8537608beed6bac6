# One command each: `make demo` and `make test` create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA := data/stdlib_text_document

.PHONY: setup demo test test-quick test-compat test-megatron-lm clean

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

# The quick suite against other megatron-core releases, each in its own venv (.venv-mcore-X):
# 0.15.3, and 0.19.2 (it declares Python >= 3.12 but installs and runs on 3.11).
# `make test-compat COMPAT_VERSIONS=0.19.2` runs one of them.
COMPAT_VERSIONS ?= 0.15.3 0.19.2
test-compat: $(addprefix compat-,$(COMPAT_VERSIONS))

compat-%:
	test -x .venv-mcore-$*/bin/python || $(PYTHON) -m venv .venv-mcore-$*
	.venv-mcore-$*/bin/pip install -q --disable-pip-version-check torch==2.13.0 'numpy<2' \
		packaging einops psutil tqdm triton pytest matplotlib wandb
	.venv-mcore-$*/bin/pip install -q --disable-pip-version-check --no-deps \
		--ignore-requires-python megatron-core==$*
	.venv-mcore-$*/bin/pip install -q --disable-pip-version-check --no-deps -e .
	.venv-mcore-$*/bin/python -c "import megatron.core; print('megatron-core', megatron.core.__version__)"
	.venv-mcore-$*/bin/python -m pytest -q -m "not slow"

# Megatron-LM's own pretrain_gpt.py through the CPU launcher (tests/test_megatron_lm.py):
# make test-megatron-lm MEGATRON_LM_DIR=/path/to/Megatron-LM   (a work tree at tag core_v0.16.1)
test-megatron-lm: setup
	@test -n "$(MEGATRON_LM_DIR)" || { echo "set MEGATRON_LM_DIR to a Megatron-LM work tree at tag core_v0.16.1 (git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout core_v0.16.1)"; exit 2; }
	MEGATRON_LM_DIR=$(abspath $(MEGATRON_LM_DIR)) $(BIN)/python -m pytest -q -rsP tests/test_megatron_lm.py tests/test_patches.py

clean:
	rm -rf $(VENV) .venv-mcore-* data runs
