"""Builds the optional compiled accelerator, ``stm._accel`` (Rust, PyO3, in ``rust/``).

Everything else is in pyproject.toml. The extension is optional: without cargo (or if it
fails to build) stm installs and works in pure Python, and ``STM_NO_ACCEL=1`` turns it off
at run time (see ``stm/accel.py``).
"""

from setuptools import setup
from setuptools_rust import Binding, RustExtension

setup(
    rust_extensions=[
        RustExtension(
            "stm._accel",
            path="rust/Cargo.toml",
            binding=Binding.PyO3,
            optional=True,
            debug=False,  # editable installs too: a debug build is several times slower
        )
    ],
)
