"""Everything is in pyproject.toml; this only ships based-lm-eval.pth (see based_lm_eval_plugin.py).

A .pth file must sit at the top of site-packages, where no pyproject setting of setuptools puts a file,
so build_py copies it there, for wheels and for editable installs alike.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "based-lm-eval.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        # An editable build keeps build_lib out of its wheel; setuptools points `install` at the wheel's
        # root instead (where it also writes data files), so the .pth goes there.
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, os.path.join(root, PTH), preserve_mode=0)


setup(cmdclass={"build_py": BuildWithPth})
