"""The `onnx-resync` command line: a thin face over the Python API.

Each subcommand lives in onnx_resync/commands/<name>.py and exposes `register(subparsers)`, which
adds its parser and sets `func` (args -> exit code). Results go to stdout, logs to stderr.
Exit codes: 0 pass, 1 check failed, 2 usage (one line, also for every malformed option value), 3+ load
or runtime error (one line, no traceback); 141 when the reader of stdout went away (`| head`), quietly;
130 on Ctrl-C, 143 on SIGTERM, 129 on SIGHUP (temporary files removed: they end the run like Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from .errors import ResyncError

COMMANDS = ("demo", "groups", "permute", "resync", "verify", "inputs", "audit", "reduce")


EXIT_BROKEN_PIPE = 128 + 13  # the shell's status for a process ended by SIGPIPE


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the usage text is one --help away)."""

    def error(self, message: str):
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        self.exit(2, f"onnx-resync: error: {where}{message} (see {self.prog} --help)\n")


OUT_OF_MEMORY = 6  # (4 is verify's 'cannot check', 5 an internal error)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-resync",
        description="Find, apply, undo and recover neuron permutations in ONNX models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"onnx_resync.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"onnx_resync.commands.{name}":
                raise
            continue  # command not built yet
        module.register(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that every
    `finally` runs (the library's writes remove their temporary files there); main then exits with
    128 + the signal's number, as a shell reports a process the signal ended."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


TERMINATING = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _terminate(signum, frame) -> None:
    for s in TERMINATING:  # a second signal must not cut the cleanup short
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def _install_signal_handlers() -> dict:
    """The CLI's handlers (never installed on importing the library); returns the ones they replace."""
    saved = {}
    for s in TERMINATING:
        try:
            saved[s] = signal.signal(s, _terminate)
        except (ValueError, OSError):  # not the main thread: the caller keeps its own handling
            pass
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    saved = _install_signal_handlers()
    try:
        return _run(args)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _run(args) -> int:
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _broken_pipe()
    except ResyncError as exc:
        print(f"onnx-resync: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated as exc:
        try:  # (after SIGHUP the terminal may be gone)
            print(f"onnx-resync: terminated ({signal.Signals(exc.signum).name})",
                  file=sys.stderr)
        except (OSError, ValueError):
            pass
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("onnx-resync: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("onnx-resync: error: out of memory", file=sys.stderr)
        return OUT_OF_MEMORY
    except OSError as exc:  # the file system said no (full disk, permissions, a name too long, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"onnx-resync: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # last line of defence: never a traceback unless asked for
        if os.environ.get("ONNX_RESYNC_DEBUG"):
            raise
        print(f"onnx-resync: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 5


def _broken_pipe() -> int:
    """The reader of stdout left (`| head`): stop quietly, with the status a SIGPIPE'd tool gives."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
