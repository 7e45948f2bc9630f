"""Adds elm-lm-eval.pth to the installed files (see _elm_lm_eval.py); the rest is pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_FILE = "elm-lm-eval.pth"


class BuildPyWithPth(build_py):
    """Puts the .pth file at the top of what becomes site-packages: the build tree, or for an
    editable install (which ignores the build tree) the wheel being assembled."""

    def pth_target(self) -> Path:
        top = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        return Path(top) / PTH_FILE

    def run(self) -> None:
        super().run()
        self.copy_file(PTH_FILE, str(self.pth_target()), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(self.pth_target())]


setup(cmdclass={"build_py": BuildPyWithPth})
