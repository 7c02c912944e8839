# The two quick-start commands (README): `make report` (the latency report) and `make test`.
# Each sets up what it needs first: a virtual environment in .venv and the compiled extension.
PYTHON ?= python3
VENV ?= .venv
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# nvcc present: build the CUDA kernels too, GPU or not (FORCE_CUDA=1, as torchvision does).
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
BUILD_ENV = $(if $(CUDA_HOME),CUDA_HOME=$(CUDA_HOME) FORCE_CUDA=1,)

.PHONY: setup build test report bench-smoke clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q $(TORCH_PINS) ninja numpy expecttest pytest pytest-benchmark matplotlib
	touch $@

setup: $(VENV)/.installed

build: setup
	$(BUILD_ENV) $(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .

test: build
	$(VENV)/bin/python -m pytest tests -q

report: build
	$(VENV)/bin/python -m bench.report

clean:
	rm -rf build *.egg-info vcreg_kernels/_C*.so
