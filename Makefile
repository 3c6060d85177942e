# One command to set everything up and run the agent; one to set up and run every test.
#   make run FOLDER=~/Documents     set up, build, and run the agent on a folder
#   make test                       set up, build, and run the whole test suite
FOLDER ?= $(HOME)/Documents
CARGO ?= cargo

.PHONY: setup build run test bench

setup:
	scripts/setup

build:
	$(CARGO) build --release

run: setup build
	./target/release/docusearch-agent run "$(FOLDER)"

test: setup
	$(CARGO) test

bench: setup
	$(CARGO) bench
