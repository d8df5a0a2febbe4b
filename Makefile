# Relay: the commands the README names.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Relay needs Python 3.11 or newer"'
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)
	@# The advanced viewer (OHIF) comes from the npm registry; without npm Relay runs without it.
	@if [ "$$RELAY_OHIF" = 0 ]; then echo "RELAY_OHIF=0: OHIF viewer not installed"; \
	elif command -v npm >/dev/null 2>&1; then $(BIN)/python manage.py ohif_install; \
	else echo "npm not found: the advanced viewer (OHIF) is left out. To add it, install Node.js" \
	  "with npm (Debian: apt-get install nodejs npm) and run 'make install' again."; fi

run: install
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py seed_demo
	$(BIN)/python manage.py run_embedded

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/python manage.py makemigrations --check --dry-run
	DEBUG=0 SECRET_KEY="lint-$$(date +%s%N)-not-a-real-secret-but-long-enough-for-check" \
	  SITE_URL=https://relay.example.org ALLOWED_HOSTS=relay.example.org RELAY_STORAGE_ENCRYPTED=1 \
	  EMAIL_HOST=smtp.relay.example.org \
	  $(BIN)/python manage.py check --deploy --fail-level WARNING

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var
