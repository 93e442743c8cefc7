# Two commands on a fresh machine: `make run` and `make test`. See README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: run test check format bench migrate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(VENV)/.runtime $@

migrate: $(VENV)/.runtime
	$(BIN)/python manage.py migrate --no-input

## Serve the chat on http://$(HOST):$(PORT) with SQLite and the in-memory layer.
run: migrate
	$(BIN)/python manage.py seed_chat --demo
	@echo "chat: http://$(HOST):$(PORT)/  admin: http://$(HOST):$(PORT)/admin/"
	$(BIN)/python -m esports_chat.daphne_uvloop -e tcp:port=$(PORT):interface=$(HOST):backlog=4096 \
		--websocket-max-message-size 262144 esports_chat.asgi:application

## The whole suite. Tests needing Redis start a throwaway redis-server (or use REDIS_URL).
test: $(VENV)/.dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
