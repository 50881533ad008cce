# One command each: `make run` and `make test` set themselves up from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS := 1
export OPENBLAS_NUM_THREADS := 1
export MKL_NUM_THREADS := 1

.PHONY: run test lint backtest bench proto prometheus clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/forecaster backtest data/aws_elb_request_count_8c0756.csv --target 16.70 \
		--eval-start 2014-04-20T00:40Z --out out/backtest/aws_elb_request_count_8c0756

# Debian's prometheus package gives a real server and promtool for the tests.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus; }

test: $(STAMP) prometheus
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check forecaster tests bench
	$(VENV)/bin/mypy

backtest: $(STAMP)
	$(PY) bench/run_backtests.py

bench: $(STAMP)
	$(PY) bench/bench_backtest.py

proto: $(STAMP)
	PYTHON=$(PY) scripts/gen_proto.sh

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
