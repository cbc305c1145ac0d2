# make demo: distil the embedded student from the embedded teacher; make test: lint and tests.
# Each target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs zoo mutate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: on this project's GPU-less machines 2.13.0 is the CPU build on their disk
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/opd demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench tools examples
	$(MAKE) docs
	$(BIN)/pytest -q

# the docs site in site/ (open site/index.html): the references generated from the code, then a strict build
# (a broken link, a missing page or a warning fails)
docs: $(STAMP)
	COLUMNS=100 $(BIN)/python tools/gen_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint: $(STAMP)
	$(BIN)/ruff check src tests bench tools examples

# the core modules' functions mutated by `make mutate` (mutmut name patterns; see README, Mutation testing)
MUTATE := 'opd.losses.*' 'opd.samplers.local.*' 'opd.scoring.*' 'opd.rollouts.*' 'opd.teachers.remote.*' \
	'opd.objective.*' 'opd.samplers.sources.*' 'opd.step_record.*' 'opd.trainer.x_update*' \
	'opd.trainer.x_training_step*' \
	'opd.server.api.x_check_sampling*' 'opd.server.api.x_validate_prompt*' 'opd.server.api.x_sampled_choice*' \
	'opd.server.api.x_stop_ids*' 'opd.server.worker.*' 'opd.http.*' 'opd.samplers.remote.*' 'opd.samplers.sync.*' \
	'opd.samplers.service.*' 'opd.divergences.*' 'opd.teachers.routed.*' 'opd.setup.x_restore*' \
	'opd.experiments.sft_curve.x_log_linear_fit*' 'opd.experiments.sft_curve.x_extrapolate*' \
	'opd.experiments.sft_curve.x_fit_summary*' 'opd.experiments.sft_curve.x_power10*' \
	'opd.teachers.alignment.*' 'opd.teachers.view.*' 'opd.tasks.custom.*' 'opd.tasks.math.*' 'opd.api.*' \
	'opd.tasks.sources.*' 'opd.tasks.jsonl.*' 'opd.trackers.*' 'opd.export.*' 'opd.plan.*' \
	'opd.domains.*' 'opd.runs.*' 'opd.micro_batches.*' 'opd.teachers.grade.*' 'opd.teachers.programmatic.*'

mutate: $(STAMP)
	$(BIN)/pip install -q -e '.[mutate]'
	# forked test processes must not inherit an OpenMP thread pool: one thread each, two at a time
	OMP_NUM_THREADS=1 TRANSFORMERS_VERBOSITY=error $(BIN)/mutmut run --max-children 2 $(MUTATE)
	$(BIN)/python tools/mutation_report.py

zoo: $(STAMP)
	$(BIN)/opd zoo build

clean:
	rm -rf $(VENV) site runs .pytest_cache .ruff_cache mutants mutation-report.md
