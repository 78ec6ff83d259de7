"""forged: a local LLM appliance daemon for NVIDIA edge boxes."""

import contextlib
import ctypes
import os
import sys

__version__ = "0.1.0"


def _libstdcxx_first() -> None:
    """Put libstdc++ in the process's global scope before any C++ Python extension loads it.

    numpy and aiohttp's frozenlist are C++ extensions: imported first, they bring libstdc++ in with
    RTLD_LOCAL, and a CUDA libllama loaded after them crashed in llama_model_load_from_file (SIGSEGV;
    measured on an H100 with the engine `forgectl engine build` makes, and with llama.cpp's own build;
    loading it before those imports, or libstdc++ globally first, both work). This is what
    LD_PRELOAD=libstdc++.so.6 did, done by forged itself so that no unit or shell needs it.
    """
    if sys.platform.startswith("linux"):
        # No C++ runtime at all: then no extension can have loaded one either.
        with contextlib.suppress(OSError):
            ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)


_libstdcxx_first()
