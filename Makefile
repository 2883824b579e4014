# kdcore: build, test, demo, bench. `make demo` and `make test` work on a fresh Debian
# machine with Python 3.11 (they install what they need first).
#
# Knobs: NO_OMP=1 (no OpenMP), DEBUG=1 (-O0 -g, KD_ASSERT on), SANITIZE=1 (ASan+UBSan, into
# build/asan). Checking targets (all part of `make test`): sanitize (= sanitize-c +
# sanitize-py), valgrind, fuzz (FUZZ_SECONDS=60 per harness).

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
  # Any UB report is fatal (-fno-sanitize-recover), like an ASan error; float-cast-overflow
  # (a float out of an integer's range, or NaN, converted to it) is UB that GCC's "undefined"
  # group leaves out. Objects and test binaries go to build/asan: build/ is never clobbered.
  SAN    := -fsanitize=address,undefined,float-cast-overflow -fno-sanitize-recover=undefined,float-cast-overflow
  CFLAGS += -O1 -g $(SAN) -fno-omit-frame-pointer -DKD_DEBUG
  LDLIBS += $(SAN)
  BUILD  ?= build/asan
endif
BUILD   ?= build
ifneq ($(NO_OMP),1)
  CFLAGS += -fopenmp
  LDLIBS += -fopenmp
else
  CFLAGS += -Wno-unknown-pragmas
endif

SRCS    := $(wildcard kdcore/src/*.c)
OBJS    := $(patsubst kdcore/src/%.c,$(BUILD)/obj/%.o,$(SRCS))
CTESTS  := $(patsubst tests/c/%.c,$(BUILD)/%,$(wildcard tests/c/test_*.c))
STAMP   := build/.deps-stamp

.PHONY: all deps deps-test build lib test test-c test-c-isa test-py demo bench bench-feature bench-datafree clean check-env \
        sanitize sanitize-c sanitize-py valgrind fuzz mutate FORCE

all: lib

# ---- dependencies ----------------------------------------------------------------
APT_PKGS      := libopenblas-openmp-dev zlib1g-dev pkgconf dataset-fashion-mnist
# The checking tools of `make test`: valgrind; clang with its compiler-rt (libclang_rt.fuzzer,
# only a Recommends of clang on Debian, so named here) for the libFuzzer harnesses.
APT_TEST_PKGS := valgrind clang libclang-rt-14-dev
apt_install = missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
deps:
	@$(call apt_install,$(APT_PKGS))
	@$(PYTHON) -c "import numpy" 2>/dev/null || $(PYTHON) -m pip install -q "numpy>=1.24"
	@$(PYTHON) -c "import tqdm" 2>/dev/null || $(PYTHON) -m pip install -q tqdm

# nbclient, nbformat and ipykernel run examples/*.ipynb (tests/test_notebooks.py). No kernelspec
# needs installing: jupyter_client falls back to ipykernel's own "python3" spec and runs it with
# the interpreter that runs pytest.
deps-test: deps
	@$(call apt_install,$(APT_TEST_PKGS))
	@$(PYTHON) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
	  || $(PYTHON) -m pip install -q torch==2.13.0
	@$(PYTHON) -c "import pytest, hypothesis, safetensors, sklearn, matplotlib, onnx, onnxruntime, yaml, dask.distributed, \
	  nbclient, nbformat, ipykernel" 2>/dev/null || $(PYTHON) -m pip install -q pytest hypothesis safetensors scikit-learn \
	  matplotlib onnx onnxruntime pyyaml "dask[distributed]" nbclient nbformat ipykernel

check-env:
	@test -n "$(BLAS_LIBDIR)" && echo "✓ OpenBLAS (OpenMP build) at $(BLAS_LIBDIR)" || (echo "✗ OpenBLAS OpenMP build not found: run make deps"; exit 1)
	@echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo "✓ OpenMP" || echo "✗ OpenMP (build with NO_OMP=1)"

# ---- C library and C tests ---------------------------------------------------------
# The flags are a dependency too: switching DEBUG/SANITIZE/NO_OMP rebuilds what they change.
$(BUILD)/.flags: FORCE
	@mkdir -p $(BUILD)
	@echo '$(CC) $(CFLAGS) $(LDLIBS)' | cmp -s - $@ || echo '$(CC) $(CFLAGS) $(LDLIBS)' > $@
FORCE:

$(BUILD)/obj/%.o: kdcore/src/%.c kdcore/include/kdcore.h $(wildcard kdcore/src/*.h) $(BUILD)/.flags
	@mkdir -p $(BUILD)/obj
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libkdcore.a: $(OBJS)
	ar rcs $@ $^

lib: $(BUILD)/libkdcore.a

$(BUILD)/test_%: tests/c/test_%.c tests/c/kdtest.h $(BUILD)/libkdcore.a $(BUILD)/.flags
	$(CC) $(CFLAGS) -Itests/c $< $(BUILD)/libkdcore.a -o $@ $(LDLIBS)

# TEST_RUN prefixes each C test binary (valgrind sets it); TEST_ENV adds environment.
test-c: $(CTESTS)
	@fail=0; for t in $(CTESTS); do echo "== $$t"; env OMP_NUM_THREADS=2 $(TEST_ENV) $(TEST_RUN) $$t || fail=1; done; exit $$fail

# The kernel and net tests once per instruction set of kdcore's kernels (KDCORE_ISA) that
# this CPU has, as the library detects them (AVX-512F; AVX2 with FMA; the portable C kernels
# always): test-c runs only the best one, the CPUs without it run the others. Override with
# ISAS="avx2 portable". Threads wait passively (OMP_WAIT_POLICY, result-neutral): with
# spinning barriers a shared machine made the same runs 3-10x slower. Wall time on the
# 2-core machine (loaded), builds excluded: ~30 s for the three instruction sets.
ISAS      ?= $(strip $(if $(shell grep -qw avx512f /proc/cpuinfo && echo y),avx512) \
               $(if $(shell grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo && echo y),avx2) portable)
ISA_TESTS := $(BUILD)/test_layers $(BUILD)/test_net
test-c-isa: $(ISA_TESTS)
	@fail=0; for isa in $(ISAS); do for t in $(ISA_TESTS); do echo "== KDCORE_ISA=$$isa $$t"; \
	  env OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive KDCORE_ISA=$$isa $(TEST_ENV) $(TEST_RUN) $$t || fail=1; done; done; exit $$fail

# ---- Python package ----------------------------------------------------------------
build: deps
	$(PYTHON) -m pip install -q --no-build-isolation -e . 2>&1 | grep -v "Running pip as the 'root'" || true
	@$(PYTHON) -c "import kdcore; print('✓ kdcore', kdcore.__version__, 'built')"

test-py: build
	$(PYTHON) -m pytest -q tests

# The whole default suite (CI: .ci/run; DEVELOPERS.md says what each step checks). Measured
# on a clean clone of the idle 2-core machine (dependencies installed): 25 minutes in all, of
# which test-py ~5 min (3310 tests; the layer and model parity tests run once per instruction
# set; the example notebooks and the Dask sweep tests start their own processes) and
# sanitize-py ~12 min (the same suite under ASan, notebook kernels and sweep workers included).
# With other jobs sharing the cores at equal priority the same run took 46 minutes. A later
# tree (3491 tests: Winograd, two-view steps, RandAugment, data-free resume, the studies) took
# 26 minutes on a clean clone of the idle machine: test-py 4:56, sanitize-py 13:14. With the
# studies R2, R3, R5, R6 (3554 tests) it took 31 minutes (test-py 6:24, sanitize-py 16:34),
# most of the growth the studies' --quick end-to-end runs under ASan, which sanitize-py now
# leaves to test-py (ASAN_PY_DESELECT): alone it then took 13:40 (3547 passed, ASan build included). The other
# steps: test-c ~10 s, test-c-isa ~20 s (the instruction sets test-c did not run: on an AVX-512
# CPU avx2 and portable), sanitize-c ~20 s, valgrind ~3.5 min (test_layers ~1.5, test_net
# ~1.5), fuzz ~65 s (2 x 30 s).
test: deps-test check-env
	$(MAKE) test-c
	$(MAKE) test-c-isa ISAS="$(wordlist 2,9,$(ISAS))"
	$(MAKE) test-py
	$(MAKE) sanitize-c
	$(MAKE) valgrind
	$(MAKE) fuzz FUZZ_SECONDS=30
	$(MAKE) sanitize-py

# ---- sanitizers, valgrind, fuzzing --------------------------------------------------
# `make sanitize`: the C tests and the pytest suite under AddressSanitizer +
# UndefinedBehaviorSanitizer (any UB report fatal), with nothing suppressed. Builds go to
# build/asan (C) and build/asan/py (the extension, next to a copy of the Python package), so
# the normal build and the editable install are untouched.
ASAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1 \
            UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
sanitize: sanitize-c sanitize-py

sanitize-c: deps check-env
	$(MAKE) SANITIZE=1 test-c TEST_ENV="$(ASAN_ENV)"

# pytest under ASan: python3 is not instrumented, so libasan must be the first library
# loaded (LD_PRELOAD); the extension brings libubsan itself. Leak checking is off here
# (detect_leaks=0): CPython, numpy and torch keep interned objects and caches for the life of
# the process, which LeakSanitizer would report by the thousand; kdcore's own leaks are the
# C tests' business (LeakSanitizer on there) and the refcount tests'. Torch runs fine under
# the preload: no torch test module is excluded. The quarantine of freed blocks is cut from
# 256 to 16 MB: the RSS-bound test (tests/test_api.py) allows for it, and at 256 MB ordinary
# malloc/free churn over its 1000 calls grew RSS by 70 MB.
ASAN_PY    := build/asan/py
# libstdc++ is preloaded too: python3 is not C++, so without it ASan's __cxa_throw
# interceptor finds no real __cxa_throw and aborts on the first C++ exception (torch.load of a
# truncated file raises one).
ASAN_PRELOAD = $(shell $(CC) -print-file-name=libasan.so) $(shell $(CC) -print-file-name=libstdc++.so)
PY_SRCS    := $(wildcard python/kdcore/*.py) $(wildcard python/binding/*.c python/binding/*.h) $(SRCS) $(wildcard kdcore/src/*.h) \
              kdcore/include/kdcore.h setup.py
$(ASAN_PY)/.stamp: $(PY_SRCS)
	rm -rf $(ASAN_PY) && mkdir -p $(ASAN_PY)
	cp -r python/kdcore $(ASAN_PY)/kdcore && rm -f $(ASAN_PY)/kdcore/*.so
	SANITIZE=1 $(PYTHON) setup.py -q build_ext --force --build-lib $(ASAN_PY) --build-temp build/asan/ext-tmp \
	  2>&1 | grep -v "Running setup.py\|^$$" || true
	@test -f $(ASAN_PY)/kdcore/_kdcore*.so || (echo "the ASan extension was not built"; exit 1)
	touch $@

# The studies' --quick end-to-end runs (tests/test_studies.py) train teachers and students
# through the same C entry points the rest of the suite calls under ASan; they check the
# scripts' plumbing, which test-py does. Under ASan they cost ~5 of the suite's minutes.
ASAN_PY_DESELECT := --deselect tests/test_studies.py::test_quick_run_end_to_end
ASAN_PY_RUN = env LD_PRELOAD="$(ASAN_PRELOAD)" PYTHONPATH=$(CURDIR)/$(ASAN_PY) \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:quarantine_size_mb=16 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
sanitize-py: deps-test $(ASAN_PY)/.stamp
	$(ASAN_PY_RUN) $(PYTHON) -c "import kdcore, sys; f = kdcore._kdcore.__file__; print('ASan build:', f); \
	  sys.exit(0 if f.startswith('$(CURDIR)/$(ASAN_PY)/') else 'kdcore resolves elsewhere')"
	$(ASAN_PY_RUN) $(PYTHON) -m pytest -q -p no:cacheprovider tests $(ASAN_PY_DESELECT)

# valgrind (memcheck) on the normal C test binaries: invalid accesses, uses of uninitialised
# values, and definite/indirect leaks are errors. No suppression file: the only reports on
# clean code are libgomp's worker threads' TLS blocks, "possibly lost" because the threads
# are alive at exit; they are neither shown nor counted (--show/--errors-for-leak-kinds).
# OMP_WAIT_POLICY=passive: valgrind runs one thread at a time, so libgomp's spinning
# barriers made test_net take 14 minutes instead of ~1.5. KDTEST_QUICK=1: test_layers' conv
# timing loop (informational, 8 large convolutions) runs each case once: it was 12 of the 17
# minutes. Valgrind cannot execute AVX-512 and hides it from CPUID, so the kernels dispatch
# to their AVX2 versions here.
VALGRIND := valgrind -q --error-exitcode=1 --leak-check=full --show-leak-kinds=definite,indirect \
            --errors-for-leak-kinds=definite,indirect --track-origins=yes
valgrind: deps-test check-env
	$(MAKE) test-c TEST_RUN="$(VALGRIND)" TEST_ENV="OMP_WAIT_POLICY=passive GOMP_SPINCOUNT=0 KDTEST_QUICK=1"

# libFuzzer (clang) on the two readers of untrusted files: the safetensors checkpoint reader
# and the IDX reader (plain and gzip), with ASan+UBSan. Each runs FUZZ_SECONDS from the
# committed seeds (tests/fuzz/corpus/<name>, never written to) plus what earlier runs here
# found (build/fuzz/corpus-<name>); a crash is saved in build/fuzz/crashes and fails the run.
# Add a crashing input to the seeds (as regress-<what>) once fixed.
FUZZ_SECONDS ?= 60
FUZZ_CC    := clang
FUZZ_SRCS  := kdcore/src/checkpoint.c kdcore/src/data.c kdcore/src/status.c
FUZZ_FLAGS := -std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
              -fno-sanitize-recover=undefined -DKD_DEBUG -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas \
              -Ikdcore/include -Ikdcore/src $(BLAS_CFLAGS)
FUZZERS    := checkpoint idx

build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_common.h $(FUZZ_SRCS) kdcore/include/kdcore.h $(wildcard kdcore/src/*.h)
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_FLAGS) $< $(FUZZ_SRCS) -o $@ -L$(BLAS_LIBDIR) -Wl,-rpath,$(BLAS_LIBDIR) -lopenblas -lz -lm

fuzz: deps-test check-env $(patsubst %,build/fuzz/fuzz_%,$(FUZZERS))
	@fail=0; for f in $(FUZZERS); do \
	  mkdir -p build/fuzz/corpus-$$f build/fuzz/crashes; echo "== fuzz_$$f: $(FUZZ_SECONDS) s"; \
	  env OMP_NUM_THREADS=1 ./build/fuzz/fuzz_$$f -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	    -dict=tests/fuzz/$$f.dict -print_final_stats=1 -artifact_prefix=build/fuzz/crashes/$$f- \
	    build/fuzz/corpus-$$f tests/fuzz/corpus/$$f > build/fuzz/fuzz_$$f.log 2>&1 \
	    || { fail=1; tail -n 60 build/fuzz/fuzz_$$f.log; }; \
	  grep -E "^(Done|stat::number_of_executed_units|stat::new_units_added)" build/fuzz/fuzz_$$f.log; \
	done; exit $$fail

# Mutation check of the training schemes' options, the step engine and kdcore.metrics (not
# part of `make test`): each mutation in tests/mutation/mutate.py breaks one behaviour in a copy
# of the repository (rebuilt when a C file changes) and must make one of its tests fail; prints
# which tests caught which mutation. 86 mutations of the schemes and the engine: 31 minutes
# measured on the shared, loaded 2-core machine (a C mutation is a ~10-30 s rebuild plus its
# tests); the 18 of kdcore.metrics (Python only): 2 minutes. One mutation: python3 tests/mutation/mutate.py --only NAME; list: --list.
mutate: deps-test
	$(PYTHON) tests/mutation/mutate.py

demo: deps build
	$(PYTHON) -m kdcore.demo

bench: deps-test build
	$(PYTHON) benchmarks/bench_train.py

# Feature-distillation table (not part of `make test`): every kdcore.losses.METHODS entry plus
# SLKD, resnet8x4 -> resnet8, 3 seeds x 8 epochs, per-step cost table; appends a section to
# benchmarks/RESULTS.md. Estimated ~65 min on an idle 2-core machine with the 11 methods
# METHODS had when it was written (the teacher ~20 min of it, trained once and cached in
# build/feature_bench; each further feature method adds ~4 min); far longer on a loaded
# machine (the docstring gives the estimate's basis). FEATURE_BENCH_ARGS
# passes options, e.g. FEATURE_BENCH_ARGS="--quick --out /tmp/fb.md" (a few minutes).
FEATURE_BENCH_ARGS ?=
bench-feature: deps build
	$(PYTHON) benchmarks/feature_bench.py $(FEATURE_BENCH_ARGS)

# Data-free table (not part of `make test`): DAFL, DFAD, ZSKT and DeepInversion students next
# to the student alone and KD with real data, cnn width 32 -> 16, 3 seeds, equal student-step
# budgets; appends a section to benchmarks/RESULTS.md. Measured: ~18 min of CPU per seed at 1 thread,
# plus ~7 min once for the teacher (cached in build/datafree_bench); runs resume.
# DATAFREE_BENCH_ARGS passes options, e.g. "--quick --out /tmp/df.md" (about 2 minutes).
DATAFREE_BENCH_ARGS ?=
bench-datafree: deps build
	$(PYTHON) benchmarks/datafree_bench.py $(DATAFREE_BENCH_ARGS)

clean:
	rm -rf build python/kdcore/*.so *.egg-info python/*.egg-info
