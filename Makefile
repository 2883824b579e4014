# kdcore: build, test, demo, bench. `make demo` and `make test` work on a fresh Debian
# machine with Python 3.11 (they install what they need first).
#
# Knobs: NO_OMP=1 (no OpenMP), DEBUG=1 (-O0 -g, KD_ASSERT on), SANITIZE=1 (ASan+UBSan).

PYTHON  ?= python3
CC      ?= gcc
BLAS_PC := /usr/lib/x86_64-linux-gnu/openblas-openmp/pkgconfig
BLAS_CFLAGS := $(shell PKG_CONFIG_PATH=$(BLAS_PC) pkg-config --cflags openblas 2>/dev/null)
BLAS_LIBDIR := $(shell PKG_CONFIG_PATH=$(BLAS_PC) pkg-config --variable=libdir openblas 2>/dev/null)

CFLAGS  := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Wswitch-enum -Wno-unused-parameter -ffp-contract=fast -fPIC \
           -Ikdcore/include -Ikdcore/src $(BLAS_CFLAGS)
LDLIBS  := -L$(BLAS_LIBDIR) -Wl,-rpath,$(BLAS_LIBDIR) -lopenblas -lz -lm

ifeq ($(DEBUG),1)
  CFLAGS += -O0 -g -DKD_DEBUG
else
  CFLAGS += -O3 -march=x86-64-v3 -mtune=native
endif
ifeq ($(SANITIZE),1)
  CFLAGS += -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -DKD_DEBUG
  LDLIBS += -fsanitize=address,undefined
endif
ifneq ($(NO_OMP),1)
  CFLAGS += -fopenmp
  LDLIBS += -fopenmp
else
  CFLAGS += -Wno-unknown-pragmas
endif

SRCS    := $(wildcard kdcore/src/*.c)
OBJS    := $(patsubst kdcore/src/%.c,build/obj/%.o,$(SRCS))
CTESTS  := $(patsubst tests/c/%.c,build/%,$(wildcard tests/c/test_*.c))
STAMP   := build/.deps-stamp

.PHONY: all deps deps-test build lib test test-c test-py demo bench clean check-env

all: lib

# ---- dependencies ----------------------------------------------------------------
APT_PKGS := libopenblas-openmp-dev zlib1g-dev pkgconf dataset-fashion-mnist
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@$(PYTHON) -c "import numpy" 2>/dev/null || $(PYTHON) -m pip install -q "numpy>=1.24"
	@$(PYTHON) -c "import tqdm" 2>/dev/null || $(PYTHON) -m pip install -q tqdm

deps-test: deps
	@$(PYTHON) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
	  || $(PYTHON) -m pip install -q torch==2.13.0
	@$(PYTHON) -c "import pytest, hypothesis, safetensors" 2>/dev/null || $(PYTHON) -m pip install -q pytest hypothesis safetensors

check-env:
	@test -n "$(BLAS_LIBDIR)" && echo "✓ OpenBLAS (OpenMP build) at $(BLAS_LIBDIR)" || (echo "✗ OpenBLAS OpenMP build not found: run make deps"; exit 1)
	@echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo "✓ OpenMP" || echo "✗ OpenMP (build with NO_OMP=1)"

# ---- C library and C tests ---------------------------------------------------------
build/obj/%.o: kdcore/src/%.c kdcore/include/kdcore.h $(wildcard kdcore/src/*.h)
	@mkdir -p build/obj
	$(CC) $(CFLAGS) -c $< -o $@

build/libkdcore.a: $(OBJS)
	ar rcs $@ $^

lib: build/libkdcore.a

build/test_%: tests/c/test_%.c tests/c/kdtest.h build/libkdcore.a
	$(CC) $(CFLAGS) -Itests/c $< build/libkdcore.a -o $@ $(LDLIBS)

test-c: $(CTESTS)
	@fail=0; for t in $(CTESTS); do echo "== $$t"; OMP_NUM_THREADS=2 ./$$t || fail=1; done; exit $$fail

# ---- Python package ----------------------------------------------------------------
build: deps
	$(PYTHON) -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "Running pip as the 'root'" || true
	@$(PYTHON) -c "import kdcore; print('✓ kdcore', kdcore.__version__, 'built')"

test-py: build
	$(PYTHON) -m pytest -q tests

test: deps-test check-env
	$(MAKE) test-c
	$(MAKE) test-py

demo: deps build
	$(PYTHON) -m kdcore.demo

bench: deps-test build
	$(PYTHON) benchmarks/bench_train.py

clean:
	rm -rf build python/kdcore/*.so *.egg-info python/*.egg-info
