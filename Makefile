# The only entry point: CI runs these targets unchanged (.ci/run -> make ci).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

AGENTRUN_DB ?= sqlite:///agentrun.db
# The TypeScript client's packages (and its code generator) come from npm, where npm is present;
# only the targets that generate, check or test that client need them (`make run` does not).
TS := clients/typescript
NPM := $(shell command -v npm 2>/dev/null)
TS_STAMP := $(if $(NPM),$(TS)/node_modules/.package-lock.json)
# The web console's scripts (htmx), pinned in scripts/web and copied into the server by `make gen`.
WEB_STAMP := $(if $(NPM),scripts/web/node_modules/.package-lock.json)

.PHONY: dist install install-ts install-web install-browser screenshots install-go build-go install-cpp build-cpp conformance install-bench gen gen-check proto-release lint format typecheck test run bench bench-model bench-ingest bench-orchestrate bench-scale bench-pressure bench-auth bench-live bench-otlp bench-console ci clean

install: $(STAMP)

# The distribution `agentrun-grpc` (the import name and command stay `agentrun`): a wheel and an
# sdist in dist/, for `pip install dist/agentrun_grpc-*.whl` on another machine.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

# Go from Debian's packages (this machine kind reaches no Go module proxy): the compiler, gRPC and
# protobuf sources for GOPATH builds, and the code generators. About 20 s, once.
GO_PACKAGES := golang-go golang-google-grpc-dev golang-google-protobuf-dev \
	golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc
install-go:
	@scripts/apt_install.sh $(GO_PACKAGES)

# The Go client, vetted, unit-tested and its examples built into build/go/bin, in GOPATH mode over
# Debian's Go sources (/usr/share/gocode): no module proxy is needed. With one, `go build ./...`
# in clients/go builds the module the ordinary way (its go.mod).
GO_MODULE := github.com/agentrun/agentrun/clients/go
GO_GOPATH := $(CURDIR)/build/gopath
GO_ENV := GO111MODULE=off GOPATH=$(GO_GOPATH):/usr/share/gocode GOCACHE=$(CURDIR)/build/gocache
build-go: install-go
	@mkdir -p $(GO_GOPATH)/src/$(dir $(GO_MODULE)) build/go/bin
	@ln -sfn $(CURDIR)/clients/go $(GO_GOPATH)/src/$(GO_MODULE)
	cd $(GO_GOPATH)/src/$(GO_MODULE) && $(GO_ENV) go vet ./... && $(GO_ENV) go test ./... \
		&& $(GO_ENV) go build -o $(CURDIR)/build/go/bin/ ./examples/... ./conformance

install-ts: $(TS_STAMP)

install-web: $(WEB_STAMP)

scripts/web/node_modules/.package-lock.json: scripts/web/package.json scripts/web/package-lock.json
	cd scripts/web && npm ci --no-audit --no-fund

# Chromium from Debian for the console's browser tests (Playwright drives it: no browser download).
install-browser:
	@scripts/apt_install.sh chromium

# The benchmarks' peers (PgQueuer), beside the development install.
install-bench: $(VENV)/.bench-stamp

$(VENV)/.bench-stamp: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres,bench]'
	touch $@

$(STAMP): pyproject.toml
	@echo "make: installing agentrun and its tools into $(VENV) (about a minute, once)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

$(TS)/node_modules/.package-lock.json: $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund

gen: install install-ts install-go install-web
	$(BIN)/python scripts/gen_protos.py
	$(BIN)/python scripts/gen_limits.py
	$(BIN)/python scripts/gen_dashboard.py
	$(BIN)/python scripts/gen_web.py
	$(BIN)/buf format -w

gen-check: install install-ts install-go install-web
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/python scripts/gen_limits.py --check
	$(BIN)/python scripts/gen_dashboard.py --check
	$(BIN)/python scripts/gen_web.py --check

lint: install
	$(BIN)/buf lint
	$(BIN)/buf breaking --exclude-imports --against protos/released.txtpb
	$(BIN)/buf format --diff --exit-code
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	@if command -v gofmt >/dev/null; then test -z "$$(gofmt -l clients/go)" || \
		{ gofmt -l clients/go; echo "gofmt: the files above need gofmt -w"; exit 1; }; fi

# Mark the contract as released: later changes are checked against it (buf breaking, make lint).
proto-release: install
	$(BIN)/buf build --exclude-source-info -o protos/released.txtpb

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/buf format -w

typecheck: install
	$(BIN)/mypy

test: install install-ts install-go install-cpp install-browser
	$(BIN)/python -m pytest

# Benchmarks print figures; they are not tests. Each reads the real runs from ../shared/data.
bench: bench-model bench-ingest bench-orchestrate bench-scale bench-pressure bench-auth bench-live bench-otlp bench-console

bench-model: install
	$(BIN)/python bench/bench_model.py

# Writer -> server -> SQLite on >= 1 GB of real runs, beside raw SQLite and HTTP+JSON; server RSS.
# DB=postgresql://... measures PostgreSQL beside raw psycopg inserts.
bench-ingest: install
	$(BIN)/python bench/bench_ingest.py

# No-op tasks through three stages with 1, 4 and 16 workers and the Runner; dispatch latency.
# DB=postgresql://USER@HOST:PORT/DBNAME measures on PostgreSQL, beside PgQueuer and two replicas.
bench-orchestrate: install-bench
	$(BIN)/python bench/bench_orchestrate.py

# Reads as history grows: backlog, scrape, leasing while scraping, run pages, WAL; 10k-1M runs.
bench-scale: install
	$(BIN)/python bench/bench_scale.py

# 100 upload streams of near-limit messages at once: the server's peak RSS beside the 512 MB goal.
bench-pressure: install
	$(BIN)/python bench/bench_pressure.py

# What --auth keys and TLS cost the writer and the Runner, beside --auth none, in one run.
bench-auth: install
	$(BIN)/python bench/bench_auth.py

# 1,000 live runs appending real messages: events/s, append-to-ack latency, a 50 MB run.
bench-live: install
	$(BIN)/python bench/bench_live.py

# OTLP spans carrying real messages beside the live-run events path; export-to-readable latency.
bench-otlp: install
	$(BIN)/python bench/bench_otlp.py

# The README's pictures of the web console (docs/console-*.png), from the example runs.
screenshots: install install-browser
	$(BIN)/python scripts/screenshots.py

# The web console at a million runs (collection pages by cursor) and a 50 MB run's page.
bench-console: install install-browser
	$(BIN)/python bench/bench_console.py

# C++ from Debian's packages: gRPC and protobuf with their code generators, and CMake.
CPP_PACKAGES := libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc cmake g++ \
	pkg-config
install-cpp:
	@scripts/apt_install.sh $(CPP_PACKAGES)

# The C++ client: its code generated from protos/ at build time, the library, the examples and
# the conformance driver, into build/cpp (about two minutes on two cores, once).
build-cpp: install-cpp
	cmake -S clients/cpp -B build/cpp -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cpp -j2

# The conformance scenario (tests/conformance/scenario.json) run by every language's driver
# against a live server: a line per language, `go: passed N/N`; non-zero if any step fails.
conformance: install install-ts build-go build-cpp
	$(BIN)/python scripts/conformance.py

# Both services in one process on SQLite: gRPC on 127.0.0.1:50051, metrics on 127.0.0.1:9464.
run: install
	@echo "make: serving both services on $(AGENTRUN_DB); Ctrl-C stops them"
	$(BIN)/agentrun serve --db $(AGENTRUN_DB)

ci: gen-check lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(TS)/node_modules
