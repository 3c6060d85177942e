# One command to set everything up and run the agent; one to set up and run every test.
#   make run FOLDER=~/Documents     set up, build, and run the agent on a folder
#   make test                       set up, build, and run the whole test suite
#   make cuda-build                 set up CUDA's compiler (no GPU needed) and build with
#                                   --features cuda into target/cuda/release/
FOLDER ?= $(HOME)/Documents
CARGO ?= cargo

# Its own target dir: the CUDA build does not invalidate the CPU build's artefacts.
CUDA_TARGET_DIR ?= target/cuda

.PHONY: setup build run test bench cuda-build

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

cuda-build:
	scripts/setup-cuda
	. .venv-cuda/env.sh && $(CARGO) build --release --features cuda --target-dir $(CUDA_TARGET_DIR)
