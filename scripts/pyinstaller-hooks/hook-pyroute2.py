"""PyInstaller hook for pyroute2 (scripts/build-dist): pyroute2 finds some of its modules at run
time by listing a package (pkgutil, e.g. the link kinds of ifinfmsg.plugins), which the build's
import analysis cannot follow, so every submodule is collected; but not pyroute2.fixtures, its
pytest fixtures, which would bring pytest and its dependencies into the file."""

from PyInstaller.utils.hooks import collect_submodules

hiddenimports = collect_submodules("pyroute2", filter=lambda name: not name.startswith("pyroute2.fixtures"))
excludedimports = ["pyroute2.fixtures"]
