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

demo: install
	$(VENV)/bin/gptstack tokenizer train --input src/gptstack/data/texts/tinyshakespeare.txt \
		--vocab-size 4096 --pattern digits --out $(RUN)/tokenizer
	echo "To be, or not to be: that is the question. 1234 + 5678 = 6912." \
		| $(VENV)/bin/gptstack tokenizer show --tokenizer $(RUN)/tokenizer
	echo '[{"role":"user","content":"What is 17 + 25?"},{"role":"assistant","content":"17 + 25 = 42. The answer is 42."}]' \
		| $(VENV)/bin/gptstack tokenizer show --tokenizer $(RUN)/tokenizer --chat

# The whole suite, slow end-to-end runs included (pytest's exit 5, "no tests collected", is not a failure).
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/bench_tokenizer.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .hypothesis
