"""The metadata lives in pyproject.toml; this file adds the one C module, the response
scanner's loop (``imapproxy/protocol/_scan.c``). It is optional: without a compiler the build
goes on and the scanner runs its Python loop (``imapproxy.protocol.scanner``)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "imapproxy.protocol._scan",
            ["imapproxy/protocol/_scan.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
