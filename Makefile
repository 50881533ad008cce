# One command each: `make run` and `make test` set themselves up from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HTTP_PORT ?= 8080
GRPC_PORT ?= 50051
export OMP_NUM_THREADS := 1
export OPENBLAS_NUM_THREADS := 1
export MKL_NUM_THREADS := 1

.PHONY: run test test-deps bench-deps lint backtest bench bench-scaler proto image clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The service on its embedded default: the bundled traces replayed as live targets.
run: $(STAMP)
	$(VENV)/bin/forecaster serve --demo --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

# Debian's packages the tests need: a real Prometheus with promtool, and headless Chromium to
# render the page. Installed only when missing (as root, or with sudo).
APT_PACKAGES := prometheus chromium fonts-dejavu-core
test-deps:
	@missing=""; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium fonts-dejavu-core"; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi

test: $(STAMP) test-deps
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check forecaster tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

backtest: $(STAMP)
	$(PY) bench/run_backtests.py

bench: $(STAMP)
	$(PY) bench/bench_backtest.py

# The scaler load benchmark also needs h2load (Debian's nghttp2-client), its load generator.
bench-deps: test-deps
	@command -v h2load >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends nghttp2-client; }

bench-scaler: $(STAMP) bench-deps
	$(PY) bench/bench_scaler_load.py

proto: $(STAMP)
	PYTHON=$(PY) scripts/gen_proto.sh

# The container image (Docker with BuildKit; no engine runs here or in CI: see docs/deploy.md).
IMAGE ?= forecaster:dev
image:
	docker build -t $(IMAGE) .

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
