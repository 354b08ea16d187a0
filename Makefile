# ResNet50 v1.5: train -> ONNX / INT8 / TensorRT -> DALI serving.
# Every target runs inside .venv (created by `make setup` when missing).
#   make demo          fresh machine -> data, train, export, infer, validate, results
#   make test          fresh machine -> the test suite (what CI runs)

SHELL      := /bin/bash
PY         := .venv/bin/python
STAMP      := .venv/.installed
DATA       ?= data/fashion-mnist
RUN        ?= runs/default
CHECKPOINT ?= $(RUN)/best.pt
PRECISION  ?= fp16
# A TensorRT engine where TensorRT can be imported, else an ONNX model for ONNX Runtime.
HAVE_TRT   := $(shell test -x $(PY) && $(PY) -c "import tensorrt; tensorrt.Builder" >/dev/null 2>&1 && echo 1)
OUTPUT     ?= artifacts/rn50.$(PRECISION).$(if $(HAVE_TRT),plan,onnx)
IMAGES     ?= $(DATA)/val
TRAIN_ARGS ?=
EXPORT_ARGS ?=
FMNIST_SRC := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup fmnist data train export infer validate demo test lint format typecheck bench gpu-check clean help

help:
	@sed -n '1,4p' Makefile; echo; grep -E '^[a-z-]+:' Makefile | cut -d: -f1 | tr '\n' ' '; echo

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to the pair this machine carries on disk (cu130 builds).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q 'torch>=2.11' 'torchvision>=0.26'
	$(PY) -m pip install -q -e '.[test,triton]'
	# serve.triton: PyTriton (tritonserver 2.51 + its Python backend) without its numpy<2 pin; the
	# backend stub, built against numpy 1, runs in a small numpy<2 environment of its own.
	$(PY) -m pip install -q --no-deps 'nvidia-pytriton==0.7.0'
	$(PY) -m venv --clear .venv/triton-stub
	.venv/triton-stub/bin/python -m pip install -q 'numpy<2' 'pyzmq>=23'
	touch $(STAMP)

setup: $(STAMP)

# Debian's dataset-fashion-mnist: installed with apt where we are root, else explained.
fmnist:
	@if [ ! -f $(FMNIST_SRC) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist' (Debian/Ubuntu) and retry" >&2; exit 1; \
	  fi; \
	fi

data: setup fmnist
	$(PY) -m rn50.fashion_mnist --out $(DATA)

train: data
	$(PY) -m train --data $(DATA) --output $(RUN) $(TRAIN_ARGS)

export: setup
	$(PY) -m export --checkpoint $(CHECKPOINT) --precision $(PRECISION) --output $(OUTPUT) $(EXPORT_ARGS)

infer: setup
	$(PY) -m serve.infer --engine $(OUTPUT) --output $(OUTPUT).predictions.jsonl $(IMAGES)

validate: setup
	$(PY) -m serve.validate --engine $(OUTPUT) --checkpoint $(CHECKPOINT) $(DATA)/val

# The demo starts its run afresh (--overwrite): run twice, it replaces its own earlier run.
demo: data
	$(PY) -m train --data $(DATA) --output $(RUN) --overwrite $(TRAIN_ARGS)
	$(MAKE) --no-print-directory export PRECISION=fp32 OUTPUT=artifacts/rn50.fp32.onnx
	$(MAKE) --no-print-directory export PRECISION=int8 OUTPUT=artifacts/rn50.int8.onnx
	$(MAKE) --no-print-directory validate OUTPUT=artifacts/rn50.int8.onnx
	$(PY) -m serve.infer --engine artifacts/rn50.int8.onnx --output artifacts/demo-predictions.jsonl $(DATA)/val
	@echo; echo "Artifacts in artifacts/, training run in $(RUN)/ (see $(RUN)/curves.png)"

# mypy reads the TensorRT stubs kept in typings/ (pyproject.toml mypy_path; typings/README.md).
typecheck: setup
	# --no-incremental: a cache from an earlier tree has hidden errors in modules the checked ones import
	$(PY) -m mypy --strict --no-incremental export/tensorrt_engine.py rn50/backends/tensorrt.py

# ruff (pyproject.toml [tool.ruff]: pycodestyle, pyflakes, import order, pyupgrade, bugbear; 120
# columns) and its formatter, checked; `make format` rewrites.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The suite writes up to about 3 GB at once (checkpoints of ~100 MB, exports, compiled kernels)
# under the temporary folder; pytest keeps only failed tests' folders afterwards.
test: setup fmnist lint typecheck
	@$(PY) -c "import shutil, tempfile; d = tempfile.gettempdir(); f = shutil.disk_usage(d).free / 2**30; \
	  f < 4 and print(f'warning: {f:.1f} GB free in {d}; the test suite needs about 3 GB there (set TMPDIR elsewhere)')"
	$(PY) -m pytest -q

# The benchmarks time the trained model: `make train` runs first when $(CHECKPOINT) is missing,
# and the FP32 ONNX that bench.serve times is exported when artifacts/rn50.fp32.onnx is missing.
# Each script prints its table; all but bench.triton also write it with a bar chart to runs/bench/NAME.{md,png}.
bench: data
	@test -f $(CHECKPOINT) || $(MAKE) --no-print-directory train
	@test -f artifacts/rn50.fp32.onnx || $(MAKE) --no-print-directory export PRECISION=fp32 OUTPUT=artifacts/rn50.fp32.onnx
	$(PY) -m bench.data_loaders
	$(PY) -m bench.inference
	$(PY) -m bench.serve
	$(PY) -m bench.triton

# The GPU check (docs/benchmarks.md): training speed, accuracy, inference, DALI serving, one table
# last. STAGES picks some of: speed data train infer serve (default all); GPU_CHECK_ARGS adds flags
# (e.g. --epochs 26 --train-timeout 500); bench/gpu_check.sh --help explains.
STAGES         ?=
GPU_CHECK_ARGS ?=
gpu-check: data
	PY=$(PY) bench/gpu_check.sh $(STAGES) --data $(DATA) $(GPU_CHECK_ARGS)

clean:
	rm -rf runs artifacts .pytest_cache .mypy_cache
