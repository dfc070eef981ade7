# `make demo`: set up (idempotent) and run the whole pipeline on the embedded demo with `dvc repro`.
# `make test`: set up (idempotent) and run the test suite.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
# Stages are invoked by DVC as `python -m stages.<name>`: the venv must come first on PATH.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GX_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: setup setup-export demo demo-gguf test test-fast bench clean-outputs mutation postgres

# llama-cpp-python has no wheel on PyPI: pip builds it from its sdist once (about 3 minutes on 2 cores) and
# caches the wheel. A portable x86-64 build (AVX2; no -march=native, whose AMX kernels crash on small
# matrices) without the multimodal library; `python -m tunegate.llamacpp` unpacks the converter of that sdist.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

# pip compiles every module it installs to bytecode, one file at a time: about 100 s of CPU in the 160 s that an
# install from pip's cache takes on 2 cores. compileall does the same on every core (-j 0): 129 s in all. (One file
# of torch's test helpers is Python 3.12 syntax: pip skips it silently, compileall is told to.) The export extra's
# few packages are left to pip.
COMPILE = $(BIN)/python -m compileall -q -j 0 -x '/torch/testing/_internal/py312_' \
	"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e ".[dev,ray,team]"
	$(COMPILE)
	touch $@

$(VENV)/.export: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,ray,team,export]"
	$(BIN)/python -m tunegate.llamacpp
	touch $@

setup: $(VENV)/.installed

# llama.cpp for export.formats gguf / ollama and the GGUF export check (docs/export.md)
setup-export: $(VENV)/.export

demo: setup
	dvc repro

# The demo with GGUF files and an Ollama Modelfile too, each checked in llama.cpp by the gate.
demo-gguf: setup-export
	dvc exp run -S 'export.formats=[merged,gguf,ollama]'

# The whole suite in one pytest on two workers: the end-to-end files in groups, each group one worker's with its
# own demo project (the demo is built once and shared through DVC's run cache), and the unit test files, each on
# one worker (its fixtures built once), filling every wait (tests/conftest.py: E2E_GROUPS).
test: setup setup-export postgres
	pytest -n 2 --dist loadgroup

# The edit loop: unit tests only (no pipeline runs, no servers, no Ray or multi-process training), a few minutes.
test-fast: setup setup-export
	pytest -m "not slow and not heavy"

# The team tests (tests/e2e/test_team.py) start a real PostgreSQL: its server binaries come from the OS
# package, installed here when missing and this is a Debian/Ubuntu machine we may install on (root).
postgres:
	@command -v postgres >/dev/null || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "PostgreSQL server binaries not found: the team tests will say so (apt-get install postgresql)"

# Every figure of docs/performance.md that needs no pipeline outputs, each next to its baseline
# measured in the same run (interleaved, medians): near duplicates vs datasketch, validation vs json.loads for
# chat and preference rows, dedup memory on 1M rows vs the rows' own (about 15 minutes on 2 cores).
# eval_cost and train need `make demo` first, benchmarks.gpu a GPU; see docs/performance.md.
bench: setup
	python -m benchmarks.dedup --repeat 5
	python -m benchmarks.dedup_ray --repeat 3
	python -m benchmarks.validate_cost --repeat 5
	python -m benchmarks.validate_cost --source preferences --repeat 3
	python -m benchmarks.dedup_memory
	@test -d models/candidate/adapter && python -m benchmarks.eval_cost --repeat 3 \
	  || echo "benchmarks.eval_cost (eval and baseline cost): run \`make demo\` first"
	@test -d models/candidate/adapter && python -m benchmarks.allocator --repeat 3 \
	  || echo "benchmarks.allocator (the train stage with malloc as it comes vs freed memory kept): run \`make demo\` first"

# Mutation testing of the pure core modules ([tool.mutmut] in pyproject.toml names them and the fast tests),
# then the score per module: mutants killed (or timed out) / mutants, as mutmut's own badge counts them.
# `make mutation MODULE=gate` mutates one module. Mutated copies and results stay in mutants/ (ignored).
mutation: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[mutation]"
	mutmut run $(if $(MODULE),"tunegate.$(MODULE).*")
	@mutmut results --all true | awk -F': ' '{ sub(/^ +/, "", $$1); split($$1, part, "."); m = part[1] "." part[2]; \
		if ($$2 == "skipped" || $$2 == "not checked") next; n[m]++; if ($$2 == "killed" || $$2 == "timeout") k[m]++ } \
		END { for (m in n) printf "%-20s %5.1f%%  (%d of %d mutants killed)\n", m, 100 * k[m] / n[m], k[m], n[m] }' | sort
