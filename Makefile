# emo: two commands matter. `make demo` renders the demo; `make test` runs the test suite.
# Both create .venv on first use (Python 3.11; pinned dependencies, see pyproject.toml).

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint bench services clean demo-model chaos farm

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The main job: the sample portrait and vocal track through the real render flow (embedded
# defaults: SQLite, a local store and an ephemeral Prefect server under EMO_HOME).
demo: $(STAMP)
	$(BIN)/emo demo -o out/demo.mp4

# PostgreSQL is a machine service here; start it if it has stopped (no-op elsewhere).
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || \
	  { command -v pg_ctlcluster >/dev/null && \
	    pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; } || true

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) services lint
	$(BIN)/python -m pytest

# Unit and in-process tests only (a few minutes): what to run while working. CI runs `test`.
test-fast: $(STAMP) services lint
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP) services
	$(BIN)/python bench/assembly.py
	$(BIN)/python bench/claims.py
	$(BIN)/python bench/model.py
	$(BIN)/python bench/orchestration.py
	$(BIN)/python bench/train.py

# Fault injection on a farm of real parts (bench/chaos.py; figures in bench/README.md).
SEED ?= 1
chaos: $(STAMP) services
	$(BIN)/python bench/chaos.py --seed $(SEED) --json chaos-$(SEED).json

# GPU time on the farm: slot use and sharing between batches (bench/farm.py; figures in
# README.md). BEFORE=REV also measures that commit first, on a farm of its own.
farm: $(STAMP) services
	$(BIN)/python bench/farm.py $(if $(BEFORE),--before $(BEFORE)) --json farm.json

clean:
	rm -rf $(VENV) .pytest_cache

# The demo model, end to end (recipes/demo.yaml; see docs/training.md).
# Every step resumes: synth and prepare skip finished videos, train continues from its run
# directory, and finished stages are not redone. Run state lives in runs/ (not committed).
# Stages 4-5 continue stages 1-3 (recipes/demo-continue.yaml); the upgrade before them adds
# layers newer than a stage-3 bundle (run 3 added the audio time embedding to run 2's) and
# copies a current bundle unchanged.
DEMO_RUN := runs/demo-model
# The audio guidance and continuation strength the bundle ships with (chosen by evaluation;
# see docs/training.md).
DEMO_GUIDANCE := 5.0
DEMO_STRENGTH := 0.5
demo-model: $(STAMP)
	$(BIN)/emo synth -o $(DEMO_RUN)/corpus --videos 300 --seconds 8 --size 64 --seed 0
	$(BIN)/emo prepare $(DEMO_RUN)/corpus -o $(DEMO_RUN)/data --resolution 64
	test -f $(DEMO_RUN)/init/emo.json || $(BIN)/emo weights new --config demo -o $(DEMO_RUN)/init
	test -f $(DEMO_RUN)/stage1/emo.json || $(BIN)/emo train --stage 1 --config recipes/demo.yaml \
	  --data $(DEMO_RUN)/data --init $(DEMO_RUN)/init -o $(DEMO_RUN)/stage1 --run-dir $(DEMO_RUN)/run1
	test -f $(DEMO_RUN)/stage2/emo.json || $(BIN)/emo train --stage 2 --config recipes/demo.yaml \
	  --data $(DEMO_RUN)/data --init $(DEMO_RUN)/stage1 -o $(DEMO_RUN)/stage2 --run-dir $(DEMO_RUN)/run2
	test -f $(DEMO_RUN)/stage3/emo.json || $(BIN)/emo train --stage 3 --config recipes/demo.yaml \
	  --data $(DEMO_RUN)/data --init $(DEMO_RUN)/stage2 -o $(DEMO_RUN)/stage3 --run-dir $(DEMO_RUN)/run3
	test -f $(DEMO_RUN)/stage3-up/emo.json || $(BIN)/emo weights upgrade $(DEMO_RUN)/stage3 \
	  -o $(DEMO_RUN)/stage3-up
	test -f $(DEMO_RUN)/stage4/emo.json || $(BIN)/emo train --stage 2 --config recipes/demo-continue.yaml \
	  --data $(DEMO_RUN)/data --init $(DEMO_RUN)/stage3-up -o $(DEMO_RUN)/stage4 --run-dir $(DEMO_RUN)/run4
	test -f $(DEMO_RUN)/stage5/emo.json || $(BIN)/emo train --stage 3 --config recipes/demo-continue.yaml \
	  --data $(DEMO_RUN)/data --init $(DEMO_RUN)/stage4 -o $(DEMO_RUN)/stage5 --run-dir $(DEMO_RUN)/run5
	$(BIN)/emo eval $(DEMO_RUN)/stage5 --heldout 4 --guidance $(DEMO_GUIDANCE) \
	  --continuation-strength $(DEMO_STRENGTH) --report $(DEMO_RUN)/eval.json
	rm -rf emo/weights/demo
	$(BIN)/emo weights export $(DEMO_RUN)/stage5 -o emo/weights/demo --recipe recipes/demo.yaml \
	  --recipe recipes/demo-continue.yaml --eval $(DEMO_RUN)/eval.json --guidance $(DEMO_GUIDANCE) \
	  --continuation-strength $(DEMO_STRENGTH)
