"""Only here to run the protobuf build step (proto/generate.py) as part of every
package build, editable installs included; all metadata lives in pyproject.toml."""

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithProtos(build_py):
    def run(self):
        runpy.run_path(str(ROOT / "proto" / "generate.py"))["generate"](ROOT)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
