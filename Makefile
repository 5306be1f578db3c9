# Trinity's entry points. `make demo` and `make test` work on a fresh clone:
# each sets up the environment first, and starts whatever servers it needs.

# uv runs on the machine's Python, and trusts the system's certificates.
export UV_PYTHON_DOWNLOADS := never
export UV_SYSTEM_CERTS := 1

PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
RUN := $(UV) run --locked

.PHONY: setup demo test lint format bench soak

setup:  ## Install uv if missing, then the locked environment
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --locked

# DATASET and OPTIONS reach the demo through its environment, neither expanded by
# make nor parsed by the shell, so a path or a JSON object arrives exactly as typed.
demo: export TRINITY_DEMO_DATASET := $(value DATASET)
demo: export TRINITY_DEMO_OPTIONS := $(value OPTIONS)
demo: setup  ## Profile a real dataset end to end (DATASET=file.csv for another, OPTIONS='<JSON>' for analysis options, KEEP=1 to explore)
	$(RUN) python scripts/demo.py $(if $(KEEP),--keep)

test: lint  ## Lint, type-check, then run the whole suite against real servers
	$(RUN) pytest

lint: setup  ## Ruff and mypy, as CI runs them
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

format: setup
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

bench: setup  ## Publish and accept rates side by side (needs wrk), then Object Store rates
	@command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null
	$(RUN) python bench/accept.py
	$(RUN) python bench/objects.py

soak: setup  ## 10,000 analysis jobs through SIGKILLs and a NATS restart; prints the counts
	$(RUN) python scripts/soak.py $(if $(JOBS),--jobs $(JOBS))
