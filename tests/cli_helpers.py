"""Running the command line inside a test, the one-line error it must end in, and damaged copies of a
concept file."""

from __future__ import annotations

import json

from personamagic.cli import main


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `personamagic *argv`, the arguments turned into text."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *messages, exit_code=2, train=False):
    """One `error: ...` line holding every message, and nothing else on stderr (for `train`: after its
    progress bars and info lines, as the last line)."""
    lines = [line for line in err.strip().replace("\r", "\n").splitlines() if line.strip()]
    assert code == exit_code, err
    if train:
        lines = [line for line in lines if line.startswith("error")] if lines[-1].startswith("error: ") else lines
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(message in lines[0] for message in messages), err
    assert "Traceback" not in err


def rewrite_concept(source, target, meta=None, tensors=None):
    """A copy of the concept file with its metadata and tensors changed by the callables given; a
    metadata callable that returns a str has it written as it is (JSON no encoder writes)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source / "concept.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["personamagic"])
    data = load_file(str(source / "concept.safetensors"))
    header = meta(header) if meta else header
    data = tensors(data) if tensors else data
    target.mkdir(parents=True, exist_ok=True)
    text = header if isinstance(header, str) else json.dumps(header)
    save_file(data, str(target / "concept.safetensors"), metadata={"personamagic": text})
    return target / "concept.safetensors"


def edit(key, value):
    """A metadata edit for `rewrite_concept`: `key` set to `value`."""
    return lambda meta: {**meta, key: value}
