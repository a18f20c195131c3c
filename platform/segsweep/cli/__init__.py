"""The ``segsweep`` command line.

Every user error prints one line, ``error: <what is wrong, naming the file or field>``, and
exits with code 2; a diverged run exits 1; an interrupted one 130. Python tracebacks are
kept for bugs.

``arguments`` builds each command's parser, ``commands`` holds what each command does (the
run use case itself lives in ``segsweep.training.one_run``); here they are bound together.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Sequence

from segsweep.cli.arguments import (
    Parser,
    add_bench,
    add_check_data,
    add_curve,
    add_dashboard,
    add_datasets,
    add_methods,
    add_probe,
    add_run,
    add_sweep,
    add_weights,
)
from segsweep.cli.commands import (
    cmd_bench,
    cmd_check_data,
    cmd_curve,
    cmd_dashboard,
    cmd_datasets,
    cmd_methods,
    cmd_probe,
    cmd_run,
    cmd_sweep,
    cmd_weights,
)
from segsweep.errors import InjectedFailure, UserError, one_line, redact, user_message

#: errno values meaning the machine, not segsweep, refused a file operation.
MACHINE_REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def build_parser() -> Parser:
    """The ``segsweep`` parser, each command bound to its function (looked up here when the
    parser is built, so a test can replace one)."""
    parser = Parser(prog="segsweep", description="Label-efficient semantic segmentation sweeps.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for add, func in (  # in the order --help lists them
        (add_run, cmd_run),
        (add_sweep, cmd_sweep),
        (add_curve, cmd_curve),
        (add_dashboard, cmd_dashboard),
        (add_check_data, cmd_check_data),
        (add_weights, cmd_weights),
        (add_bench, cmd_bench),
        (add_probe, cmd_probe),
        (add_methods, cmd_methods),
        (add_datasets, cmd_datasets),
    ):
        add(sub).set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:  # a message may quote a URI: its password never reaches the terminal
        print(f"error: {redact(one_line(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except InjectedFailure as exc:  # asked for by the user: their crash, not our bug
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a DataLoader worker's re-raised DataError: still one line
        message = user_message(exc)
        if message is None:
            raise
        print(f"error: {redact(message)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The machine refused a file (disk full, permissions, a read-only mount) where no
        # check before the work could foresee it: one line naming it. Any other OSError (a
        # wrong path of ours) is a bug and keeps its traceback.
        if exc.filename is None or exc.errno not in MACHINE_REFUSALS:
            raise
        print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1
