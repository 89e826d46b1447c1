"""What the command line checks before it runs a recipe, and how it reports an
error: :func:`check_out` (the output folder can be made and written),
:func:`fit_options` (the ``fit digits`` options, checked together), the
exceptions it reports as bad input or a failed run (:data:`USER_ERRORS`) and
their one-line message (:func:`error_line`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pgm_drm.experiments.digits import check_options

__all__ = ["USER_ERRORS", "check_out", "error_line", "fit_options"]

#: Exceptions a command reports as one line (bad input, a file it cannot read or
#: write, a value out of range). Others (``AssertionError``, ``RuntimeError``,
#: ``AttributeError``, ...) are bugs and keep their traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    OSError,
    KeyError,
    IndexError,
    OverflowError,
)


def check_out(out: Path) -> None:
    """Raise ``ValueError`` when the folder ``out`` cannot be made or written
    (a file in its place or above it, a parent folder that is not writable);
    nothing is created."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot make --out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write --out {out}: {parent} is not writable")


def fit_options(args: dict[str, Any]) -> dict[str, Any]:
    """The keyword options of :func:`~pgm_drm.experiments.run_fit_digits` from the
    parsed arguments of ``fit digits <model>`` (``vars`` of the namespace), checked
    together by :func:`~pgm_drm.experiments.check_options` (``ValueError``)."""
    keys = ("labels", "em", "unlabelled_weight")
    opts = {k: args[k] for k in keys if k in args}
    if "no_translations" in args:
        opts["translations"] = not args["no_translations"]
    if args["model"] != "all":  # "all": every recipe as it is (run_evaluation)
        check_options(args["model"], **opts)
    return opts


def error_line(prog: str, error: BaseException) -> str:
    """``"<prog>: error: <message>"`` on one line. ``ValueError`` and ``OSError``
    messages stand alone; the others (whose message is often just a key or an
    index) are prefixed by their type."""
    message = " ".join(str(error).split()) or "(no message)"
    if not isinstance(error, ValueError | OSError):
        message = f"{type(error).__name__}: {message}"
    return f"{prog}: error: {message}"
