"""Shared command-line plumbing: one ``error: ...`` line and exit status 2 for user errors.

Every script ends with ``run_absl(main)`` (absl scripts) or returns ``run_cli(_main, argv)``
from its ``main`` (argparse scripts). A user error (a bad config key or value, a missing data
folder, checkpoint or split, a malformed benchmark file, an output path that cannot be
written) prints one line on stderr and exits 2; the traceback is shown only with ``--debug`` on the
command line (removed before the script parses it) or ``DKNET_DEBUG=1`` in the
environment. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import sys
import warnings
from typing import Callable

from dknet_jax.config import ConfigError

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A bad argument or path that the user fixes (a script's own checks)."""


# the project's user-error types, looked up only in modules already imported (an exception
# of a module nobody imported cannot occur; importing dknet_jax.checkpoint would load JAX)
_PROJECT_ERRORS = (
    ("dknet_jax.checkpoint", "CheckpointError"),
    ("dknet_jax.data.dataset", "SceneError"),
    ("dknet_jax.data.preparation", "SettingsMismatch"),
    ("dknet_jax.data.scannet", "LabelTableError"),
    ("dknet_jax.eval.scannet_io", "BenchmarkFormatError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types reported as one line. OSError: a missing file or folder, a file
    where a folder is expected, no permission, a full disk."""
    found = [getattr(sys.modules[m], n) for m, n in _PROJECT_ERRORS if m in sys.modules]
    return (UserError, ConfigError, UnicodeDecodeError, OSError, *found)


def _debug_requested() -> bool:
    debug = os.environ.get("DKNET_DEBUG", "") not in ("", "0")
    if "--debug" in sys.argv[1:]:
        sys.argv = [a for a in sys.argv if a != "--debug"]  # the scripts' parsers never see it
        debug = True
    return debug


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Python warnings as ``warning: <message>`` lines, without the source file and line
    (shown with --debug)."""
    text = " ".join(str(message).split())
    return text + "\n" if text.startswith("warning:") else f"warning: {text}\n"


def _setup_warnings(debug: bool) -> None:
    if not debug:
        warnings.formatwarning = _format_warning


def _message(e: BaseException) -> str:
    if isinstance(e, UnicodeDecodeError):
        return (
            f"a file that should be text is binary or not UTF-8 ({e.reason} at byte "
            f"{e.start}); check the files passed"
        )
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__  # one line


def _fail(e: BaseException, prefix: str = "") -> int:
    print(f"error: {prefix}{_message(e)}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """``main(argv)`` (an argparse main; None: the command line) as an exit status; a user
    error prints ``error: <message>`` and gives 2."""
    debug = _debug_requested()
    if argv is not None and "--debug" in argv:
        argv, debug = [a for a in argv if a != "--debug"], True
    _setup_warnings(debug)
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr, flush=True)
        return 130  # the shell's status for Ctrl-C
    except Exception as e:
        if debug or not isinstance(e, user_errors()):
            raise
        return _fail(e)


def run_absl(main: Callable[[list[str]], int | None]) -> None:
    """``absl.app.run(main)`` with `run_cli`'s handling of user errors.

    Errors raised while absl parses the flags (an unknown ``--config.<key>`` override, a
    config file that fails to load, a value absl cannot convert such as
    ``--config.train.lr=abc``, a missing required flag, an unknown flag) and a
    ``UsageError`` of ``main`` (stray arguments) are command-line errors too: one line,
    exit 2, instead of absl's ``FATAL Flags parsing error`` (exit 1) or its full usage."""
    from absl import app, flags

    debug = _debug_requested()
    _setup_warnings(debug)
    started = False

    def wrapped(argv):
        nonlocal started
        started = True
        try:
            return main(argv)
        except app.UsageError as e:
            if debug:
                raise
            raise UserError(f"{str(e).rstrip('.')}; see --helpshort") from e

    def parse_flags(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            msg = " ".join(str(e).split()).rstrip(".")
            print(f"error: {msg}; see --helpshort", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    try:
        if debug:
            app.run(wrapped)
        else:
            app.run(wrapped, flags_parser=parse_flags)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        if isinstance(e, user_errors()):
            sys.exit(_fail(e))
        if started or not isinstance(e, (AttributeError, KeyError, TypeError, ValueError)):
            raise  # a bug: keep the traceback
        # before main: absl parsing the config file and its --config.<key> overrides
        overrides = [a for a in sys.argv[1:] if a.startswith("--config")]
        msg = str(e)
        with contextlib.suppress(ValueError, SyntaxError):  # KeyError reprs its message
            msg = str(ast.literal_eval(msg)) if msg[:1] in "'\"" else msg
        msg = " ".join(msg.split())
        unknown = (
            re.match(r"'([^']+)'\s*(.*)", msg)
            if isinstance(e, (AttributeError, KeyError))
            else None
        )
        if unknown:  # ml_collections: "'candidate' Did you mean "candidates" ...?"
            key, hint = unknown.groups()
            culprit = [a for a in overrides if key in a.split("=")[0].split(".")] or overrides
            print(
                f"error: unknown config key {key!r} in {' '.join(culprit)}"
                f"{'; ' + hint if hint else ''}; the keys are listed in dknet_jax/config.py",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"error: bad config ({' '.join(overrides)}): {msg}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def check_input_dir(path: str, what: str) -> str:
    """``path`` if it is an existing folder, else a `UserError` naming ``what``."""
    if not os.path.isdir(path):
        state = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise UserError(f"{what} {path} {state}")
    return path


def check_output_dir(path: str, what: str) -> str:
    """Check, creating nothing, that the folder ``path`` can be used or created (not a
    file; the nearest existing folder above it writable): for outputs created only after
    the inputs are checked (train.py's --workdir, evaluate.py's --out)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file; pass a folder (it is created if missing)")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{what} {path}: cannot create the folder ({parent} is a file)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {parent} is not writable; pass another folder")
    return path


def prepare_output_dir(path: str, what: str = "--out") -> str:
    """Create the output folder ``path`` and check it is writable, before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what} {path} is a file; pass a folder (it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {path}: cannot create the folder ({e.strerror})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: folder is not writable; pass another folder")
    return path


def prepare_output_file(path: str, what: str = "--out") -> str:
    """Check a file can be written at ``path`` (creating its folder), before any work."""
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder; pass a file name (e.g. {path}/results.json)")
    prepare_output_dir(os.path.dirname(os.path.abspath(path)), what=f"{what} folder")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} is not writable")
    return path
