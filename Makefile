# The two set-up commands of the README. Both install what they need first (scripts/bootstrap.sh is idempotent).
.PHONY: demo quickstart test lint audit bootstrap bootstrap-demo bench

VENV := .venv/bin

bootstrap:
	@bash scripts/bootstrap.sh test

bootstrap-demo:
	@bash scripts/bootstrap.sh demo

## demo: the main job on the embedded defaults (local processes, SQLite, Debian's Prometheus): train v1/v2/v3,
## roll v2 out through shadow → canary → A/B → full under load, roll the bad v3 back; report under var/demo/report
demo: bootstrap-demo
	$(VENV)/fraudwatch-demo

## quickstart: the model only — data → train → MLflow → bentoml serve → score → stop
quickstart: bootstrap-demo
	$(VENV)/fraudwatch demo

## lint: ruff + mypy --strict + the import contracts of .importlinter (part of test)
lint: bootstrap
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/mypy service rollout tests benchmarks loadtests scripts
	$(VENV)/lint-imports

## audit: the images' locks (locks/*.txt) against the advisories PyPI publishes (part of test; ~10 s)
audit: bootstrap
	$(VENV)/python scripts/audit.py

## test: lint, the dependency audit, then every test layer (unit, integration, quality, e2e)
test: lint audit
	$(VENV)/pytest -p no:cacheprovider

## bench: the benchmarks (not tests): JSON figures under var/benchmarks/
bench: bootstrap
	$(VENV)/python benchmarks/serving_benchmark.py
	$(VENV)/python benchmarks/router_benchmark.py
	$(VENV)/python benchmarks/revert_benchmark.py --reverts 10 --out var/benchmarks/revert.json
	$(VENV)/python benchmarks/creditcard_benchmark.py
	$(VENV)/python benchmarks/gate_error_rates.py
