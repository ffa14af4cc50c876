# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch is installed first, pinned, so that pip never pulls a multi-GB CUDA build
# to satisfy pyproject's range. Override for a GPU machine: make TORCH_SPEC='torch' test
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# onnxruntime-node for the Node.js tests of textrnn.js (pinned beside textrnn/web's onnxruntime-web).
# Its install script would fetch CUDA binaries from nuget; its CPU build is in the npm tarball itself.
ORT_NODE_VERSION := 1.30.0
ORT_NODE := .cache/node/node_modules/onnxruntime-node/package.json
DEMO_DIR := runs/demo
DEMO_STEPS ?= 1000

.PHONY: demo test bench bench-full clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev,plot,onnx,serve]'
	@# the pinned onnxruntime-web that export --format web copies (cached; the web tests skip without it)
	$(BIN)/python -m textrnn.web || echo "onnxruntime-web not fetched: export --format web will try again"
	touch $(STAMP)

$(ORT_NODE):
	@if command -v npm >/dev/null; then \
		ONNXRUNTIME_NODE_INSTALL=skip npm install -q --no-audit --no-fund --no-save --prefix .cache/node \
			onnxruntime-node@$(ORT_NODE_VERSION) || echo "npm install failed: the Node.js tests will be skipped"; \
	else echo "npm not found: the Node.js tests of textrnn.js will be skipped"; fi

# Train on the Python standard library's own source for a fixed number of steps (about two minutes
# on a laptop), then write some Python. Steps and threads are fixed, so the text is the same on any
# load (a busy machine only makes it slower).
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/python -m textrnn train $$($(BIN)/python -c 'import glob, sysconfig; print(" ".join(sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))))') \
		--out $(DEMO_DIR) --max-steps $(DEMO_STEPS) --threads 2
	$(BIN)/python -m textrnn generate --checkpoint $(DEMO_DIR) --prompt 'def ' --length 600 --temperature 0.8 --seed 1

test: $(STAMP) $(ORT_NODE)
	$(BIN)/python -m pytest -q

# Benchmarks (results go into BENCHMARKS.md): about 30 minutes; bench-full adds the 5- and
# 10-minute sweeps and the quality runs against the GPT baseline and the char-rnn recipe at 2, 10
# and 30 minutes, on tiny Shakespeare and on Python source, the techniques tried on the default
# (weight averaging, DropConnect, tying), and int8 sampling's cost on a trained 2x512 LSTM (about
# 7.7 h more).
bench: $(STAMP)
	$(BIN)/python bench/preprocess.py --size-mb 1024
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/sampling.py
	$(BIN)/python bench/sampling.py --preset small --cell lstm --quick
	$(BIN)/python bench/threads.py
	$(BIN)/python bench/threads.py --precision fp32
	$(BIN)/python bench/ddp_scaling.py
	$(BIN)/python bench/sweep.py --minutes 2 --presets small --cells gru lstm rnn
	$(BIN)/python bench/sweep.py --minutes 2 --presets medium large --cells gru

bench-full: bench
	$(BIN)/python bench/sweep.py --minutes 5 --presets small --cells gru lstm rnn
	$(BIN)/python bench/sweep.py --minutes 10 --presets small --cells lstm rnn
	$(BIN)/python bench/quality.py --minutes 2 10 30
	$(BIN)/python bench/quality.py --corpus python --minutes 2 10 30
	$(BIN)/python bench/quality.py --minutes 10 --only textrnn --set ema=0.998
	$(BIN)/python bench/quality.py --minutes 10 --only textrnn --set weight_drop=0.1
	$(BIN)/python bench/quality.py --minutes 10 --only textrnn --set tie_weights=true
	$(BIN)/python bench/quality.py --minutes 30 --only textrnn --set weight_drop=0.2
	$(BIN)/python -m textrnn train ../shared/data/tinyshakespeare.txt --preset medium --max-time 30m --out runs/bench-medium
	$(BIN)/python bench/sampling.py --quick --run runs/bench-medium

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .cache
