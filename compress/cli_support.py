"""How every console script of the project ends: one line on stderr and the contract's exit
code (0 success, 2 bad usage or bad input, 1 unexpected failure), never a traceback on the
terminal. Shared by ``compress`` and ``bench``."""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
from typing import Sequence

import typer

from .errors import UsageError


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_app(app: typer.Typer, prog: str, argv: Sequence[str] | None = None,
            failures: tuple[type[BaseException], ...] = ()) -> None:
    """Run a typer app and map exceptions to exit codes. ``failures`` are known, expected
    failure types whose message is enough (exit 1, no traceback file)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["--help"]
    try:
        app(args=args, prog_name=prog, standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # typer's (vendored click) usage errors: bad flags, bad values
        if os.environ.get("RANK", "0") != "0":  # under torchrun every rank parses the same argv: rank 0 says it
            sys.exit(getattr(exc, "exit_code", 2) or 2)
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"{prog}: error: {first_line(Exception(message))}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2) or 2)
    except (typer.Abort, KeyboardInterrupt):
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except UsageError as exc:
        print(f"{prog}: error: {first_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except failures as exc:
        print(f"{prog}: {first_line(exc)}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # a bug or an environment failure: keep the traceback, out of the way
        with tempfile.NamedTemporaryFile("w", prefix=f"{prog}-error-", suffix=".log", delete=False) as log:
            traceback.print_exc(file=log)
        print(f"{prog}: unexpected error: {type(exc).__name__}: {first_line(exc)} (traceback in {log.name})",
              file=sys.stderr)
        sys.exit(1)
