"""Entry script of the frozen application: one Analysis serves both executables.

PyInstaller builds ``snapgen`` and ``snapgen-studio`` from this one script (see snapgen.spec), so the
module graph is analysed once and both executables share one ``_internal`` folder. The executable's
own name picks the entry point: ``snapgen-studio[.exe]`` starts the Qt application, anything else is
the command line.
"""

from __future__ import annotations

import sys
from pathlib import PureWindowsPath

GUI_NAME = "snapgen-studio"


def entry_name(executable: str) -> str:
    """``"gui"`` when ``executable`` is the studio launcher, else ``"cli"``.

    PureWindowsPath splits on both ``/`` and ``\\``, so one rule serves every platform."""
    return "gui" if PureWindowsPath(executable).stem.lower() == GUI_NAME else "cli"


def main() -> int:
    """Dispatch to ``ui.app.main`` or ``snapgen_app.cli.main``; returns the exit code."""
    if entry_name(sys.executable) == "gui":
        from ui.app import main as gui_main  # Qt is imported only by the studio executable

        return gui_main(sys.argv)
    from snapgen_app.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
