"""Running the command line inside a test."""

from __future__ import annotations

from personamagic.cli import main


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `personamagic *argv`, the arguments turned into text."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err
