"""Build the kdcore C extension: the C core (kdcore/src) plus the binding, linked against the
OpenMP build of OpenBLAS (found through its own pkg-config file) with an rpath to it."""
import glob
import os
import subprocess

import numpy
from setuptools import Extension, setup

BLAS_PC = "/usr/lib/x86_64-linux-gnu/openblas-openmp/pkgconfig"


def pkg(var_or_flag):
    env = dict(os.environ, PKG_CONFIG_PATH=BLAS_PC)
    try:
        out = subprocess.check_output(["pkg-config", var_or_flag, "openblas"], env=env, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(
            "kdcore needs the OpenMP build of OpenBLAS: apt-get install libopenblas-openmp-dev pkgconf "
            f"(or run `make deps`); pkg-config failed: {e}")
    return out.strip()


blas_inc = [f[2:] for f in pkg("--cflags").split() if f.startswith("-I")]
blas_libdir = pkg("--variable=libdir").rstrip("/")
debug = os.environ.get("DEBUG") == "1"
sanitize = os.environ.get("SANITIZE") == "1"
no_omp = os.environ.get("NO_OMP") == "1"

cflags = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers", "-Wno-cast-function-type",
          "-ffp-contract=fast", "-fvisibility=hidden"]
# x86-64-v3 (AVX2/FMA) is the portable baseline for kernels; no fast-math flags (they change
# the floating-point state of the whole Python process).
cflags += ["-O0", "-g", "-DKD_DEBUG"] if debug else ["-O3", "-march=x86-64-v3"]
ldflags = [f"-Wl,-rpath,{blas_libdir}"]
if not no_omp:
    cflags.append("-fopenmp")
    ldflags.append("-fopenmp")
else:
    cflags.append("-Wno-unknown-pragmas")
if sanitize:
    # As the Makefile's SANITIZE=1: -O1 -g for readable reports, any UB report fatal.
    # `make sanitize` builds this into build/asan/py and runs pytest with libasan preloaded.
    san = ["-fsanitize=address,undefined,float-cast-overflow",
           "-fno-sanitize-recover=undefined,float-cast-overflow"]
    cflags += ["-O1", "-g", "-fno-omit-frame-pointer", "-DKD_DEBUG"] + san
    ldflags += san

ext = Extension(
    "kdcore._kdcore",
    sources=sorted(glob.glob("python/binding/*.c")) + sorted(glob.glob("kdcore/src/*.c")),
    include_dirs=["kdcore/include", "kdcore/src", "python/binding", numpy.get_include()] + blas_inc,
    library_dirs=[blas_libdir],
    libraries=["openblas", "z", "m"],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(ext_modules=[ext])
