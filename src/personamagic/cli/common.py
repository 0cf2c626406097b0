"""What every command shares: the argparse parser class that reports a bad flag in one line, logging
as `warning: ...` lines, quiet libraries, the device flags, and the handler wrapper that turns a user
mistake into one `error: ...` line and exit code 2 (a traceback only with --verbose)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line: `error: ...` (exit 2), with the closest flag or command
    when one is near ("did you mean --steps?")."""

    _innermost = None  # the last (sub)command parser that parsed: its flags are the ones to suggest

    def parse_known_args(self, args=None, namespace=None):
        Parser._innermost = self
        return super().parse_known_args(args, namespace)

    def error(self, message):
        parser = Parser._innermost or self
        self.exit(EXIT_USER_ERROR, f"error: {message}{_suggestion(message, parser)} (see {parser.prog} --help)\n")


def _suggestion(message: str, parser: argparse.ArgumentParser) -> str:
    """"; did you mean X?" for a mistyped flag or choice, or nothing."""
    import difflib
    import re

    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    if unknown:
        word = unknown.group(1).split("=")[0]
        known = [o for action in parser._actions for o in action.option_strings]
    else:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if not choice:
            return ""
        word, known = choice.group(1), re.findall(r"'([^']*)'", choice.group(2))
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def add_device_flags(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="weights' precision; auto = bf16/fp16 on CUDA, fp32 elsewhere")
    parser.add_argument("--local-files-only", action="store_true", help="never download; use the local hub cache")


class LowercaseLevelFormatter(logging.Formatter):
    """`warning: ...` like the `error: ...` lines."""

    def format(self, record):
        record.levelname = record.levelname.lower()
        return super().format(record)


class _CurrentStderr(logging.StreamHandler):
    """A handler on whatever sys.stderr is when a record is written (not the stream it was made with),
    so that a command run in-process after sys.stderr was swapped and closed still reports."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


def configure_logging(verbose: bool) -> None:
    handler = _CurrentStderr()
    handler.setFormatter(LowercaseLevelFormatter("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("personamagic").setLevel(logging.DEBUG if verbose else logging.INFO)


def quiet_libraries(verbose: bool) -> None:
    """diffusers/transformers reset their loggers on import: set their verbosity after importing."""
    if verbose:
        return
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (`kill`, `timeout`, a scheduler ending a job) stops a command as Ctrl-C does: what it
    wrote is kept or cleaned up the same way, and it says so."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_handler(handler, args) -> int:
    """Run a command: any `PersonaMagicError` (a mistake the user can fix) ends as one `error: ...` line
    and exit code 2, or 130 for an `Interrupted` run (a traceback only with --verbose); Ctrl-C as
    `error: interrupted` and exit code 130."""
    from ..errors import Interrupted, PersonaMagicError

    try:
        with _terminate_as_interrupt():
            return handler(args)
    except PersonaMagicError as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(err, Interrupted) else EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (OSError, MemoryError) as err:  # a fault of the disk or the machine a command did not word itself
        if args.verbose:
            raise
        what = f"cannot {'allocate memory' if isinstance(err, MemoryError) else 'read or write'}"
        where = f" {err.filename}" if getattr(err, "filename", None) else ""
        reason = getattr(err, "strerror", None) or str(err) or "out of memory"
        print(f"error: {what}{where}: {reason}", file=sys.stderr)
        return EXIT_USER_ERROR


# flags that tune a plug-in -> the flag that plugs it in
ADAPTER_SUB_FLAGS = {
    "ip_adapter_scale": "ip_adapter", "photomaker_merge_step": "photomaker", "photomaker_lora_scale": "photomaker",
}


def check_adapter_flags(args) -> None:
    """A flag that tunes a plug-in, given without the plug-in, is a mistake (it would do nothing)."""
    from ..errors import SettingsError

    for flag, adapter in ADAPTER_SUB_FLAGS.items():
        if getattr(args, flag, None) is not None and getattr(args, adapter, None) is None:
            raise SettingsError(f"--{flag.replace('_', '-')} needs --{adapter.replace('_', '-')}")
