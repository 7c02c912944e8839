# The two quick-start commands (README): `make report` (the latency report) and `make test`.
# Each sets up what it needs first: a virtual environment in .venv and the compiled extension.
# Neither rewrites a tracked file: fresh reports go to out/ (ignored); `make report
# RESULTS=bench/results/<device>` updates a committed results folder on purpose.
PYTHON ?= python3
VENV ?= .venv
# torch and torchvision pinned together (the versions CI uses); the rest comes from pyproject.toml's
# extras `test` and `bench`, installed with the package.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,bench
RESULTS ?=
# No GPU device node: leave out the gpu-marked tests (conftest would skip them) rather than list skips.
TEST_MARKS ?= $(if $(wildcard /dev/nvidia0 /dev/kfd),,-m "not gpu")
# nvcc present: build the CUDA kernels too, GPU or not (FORCE_CUDA=1, as torchvision does).
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
BUILD_ENV = $(if $(CUDA_HOME),CUDA_HOME=$(CUDA_HOME) FORCE_CUDA=1,)

.PHONY: setup build test report clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/pip install -q $(TORCH_PINS) ninja
	touch $@

setup: $(VENV)/.installed

# The package (editable, built against the venv's torch) with its extras' dependencies.
build: setup
	$(BUILD_ENV) $(VENV)/bin/pip install -q --no-build-isolation -e ".[$(EXTRAS)]"

# The tests, the benchmarks' smoke run (every section of the report, tiny sizes), and the
# ahead-of-time compile checks of every GPU kernel for sm_80/sm_90/gfx906/gfx90a/gfx942 (Triton)
# and gfx906 (the CUDA kernels through hipify+hipcc). Their reports go to out/.
test: build
	$(VENV)/bin/python -m pytest tests -q $(TEST_MARKS)
	VCREG_BENCH_SMOKE=1 $(VENV)/bin/python -m pytest bench -q -p no:cacheprovider
	$(VENV)/bin/python tools/triton_aot_check.py
	@if command -v hipcc >/dev/null; then $(VENV)/bin/python tools/hip_compile_check.py --cuda sm_80 --cuda sm_90 --out out/cuda_kernels_resources.md; \
	else echo "hipcc not found: the HIP compile check of csrc/cuda did not run (apt-get install hipcc)"; fi

report: build
	$(VENV)/bin/python -m bench.report $(if $(RESULTS),--out $(RESULTS),)

clean:
	rm -rf build *.egg-info vcreg_kernels/_C*.so out
