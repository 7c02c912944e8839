"""Build of vcreg_kernels._C: the C++ CPU kernels always, the CUDA kernels where CUDA is present.

Environment (the ecosystem's conventions):
  VCREG_NO_EXTENSION=1   build no compiled extension (the package then runs the reference backend)
  FORCE_CUDA=1           build the CUDA kernels even without a visible GPU (needs CUDA_HOME / nvcc)
  TORCH_CUDA_ARCH_LIST   CUDA targets; defaults to "8.0;9.0" when no GPU is visible
  MAX_JOBS               parallel compile jobs (read by torch.utils.cpp_extension)
"""
import glob
import os
import sysconfig

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("VCREG_NO_EXTENSION", "0") != "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    has_cuda_torch = torch.version.cuda is not None or torch.version.hip is not None
    with_cuda = has_cuda_torch and cuda_sources and (
        os.environ.get("FORCE_CUDA", "0") == "1" or (torch.cuda.is_available() and CUDA_HOME is not None)
    )
    # torch 2.14's headers use C++20. No contraction into FMAs: the CPU kernels' AVX-512 loops and
    # their portable twins (built for any x86-64, no FMA) must round alike.
    cxx = ["-O3", "-std=c++20", "-ffp-contract=off"]
    link = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inline header code: without OpenMP here it runs serially.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        # torch's CUDA headers include cusparse.h and friends from the nvidia wheels.
        include_dirs = [p for p in glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu*", "include"))]
        ext = CUDAExtension(
            "vcreg_kernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros + [("VCREG_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++20"]},
            extra_link_args=link,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "vcreg_kernels._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            py_limited_api=True,
        )
    ext_modules.append(ext)
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass, options={"bdist_wheel": {"py_limited_api": "cp39"}})
