"""Maps the top-level source folders onto import names.

`api/`, `shim/` and `vminitd/` are generic names; installing them as top-level packages would
collide with other distributions (and `api/.../types` with the stdlib). They become
`spinbox.api`, `spinbox.shim` and `spinbox.vminitd`; `ttrpc/` stays `ttrpc`.
"""
import os

from setuptools import setup

ROOTS = {
    "spinbox.api": "api",
    "spinbox.shim": "shim",
    "spinbox.vminitd": "vminitd",
    "ttrpc": "ttrpc",
}


def _packages():
    found = []
    for name, folder in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, folder)
                found.append(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    return found


setup(
    packages=_packages(),
    package_dir=ROOTS,
    package_data={"": ["*.proto", "*.pyi", "py.typed"]},
)
