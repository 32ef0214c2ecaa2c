# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.install-stamp
RUN    ?= runs/demo

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# torch first, pinned, from the local wheel; then the project (editable) with test and bench
# extras. The stamp makes a second `make install` a no-op until pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

# The default job on the embedded default: the whole pipeline on the tiny recipe (gptstack run:
# tokenizer, pretraining, SFT, comparisons, reward model, best-of-N, PPO, the over-optimization
# study, GRPO, DPO, PRM + search; resumable), its report card (RUN/report.md, RUN/report.html),
# then the tokenizer's view of a chat and two separate one-turn chats (/reset between) with the fine-tuned model.
demo: install
	$(VENV)/bin/gptstack run --out $(RUN)
	printf '%s\n' '[{"role":"user","content":"What is 17 + 25?"},{"role":"assistant","content":"17 + 25 = 42.\nThe answer is 42."}]' \
		| $(VENV)/bin/gptstack tokenizer show --tokenizer $(RUN)/tokenizer --chat
	printf 'Which is larger, 58 or 85?\n/reset\nReverse the list: 3, 9, 4.\n' | $(VENV)/bin/gptstack chat $(RUN)/sft --temperature 0

# The layering contracts (pyproject.toml [tool.importlinter]), then the whole suite, slow end-to-end
# runs included (pytest's exit 5, "no tests collected", is not a failure).
test: install
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/bench_tokenizer.py
	$(PY) bench/bench_pretrain.py
	$(PY) bench/bench_sampling.py
	$(PY) bench/bench_rl.py    # first run creates bench/.cache/venv-trl-{1.12.0,1.16.0} (~2 min)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .hypothesis
