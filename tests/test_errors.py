"""The library's errors are kinds a Python caller catches (each a ValueError); the command line turns any
of them into one `error: ...` line and its exit code."""

import argparse
import os

import pytest

from cli_helpers import assert_one_line_error, run_cli
from personamagic import errors
from personamagic.errors import ConceptError, DiskError, Interrupted, ModelLoadError, PersonaMagicError

PHOTO = os.path.join(os.path.dirname(__file__), "data", "astronaut.png")


def test_every_kind_is_a_persona_magic_error_and_a_value_error():
    kinds = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, Exception)]
    assert PersonaMagicError in kinds and len(kinds) > 1
    for kind in kinds:
        assert issubclass(kind, PersonaMagicError) and issubclass(kind, ValueError), kind
        assert kind.__doc__ and not hasattr(kind, "exit_code"), kind


def test_a_missing_concept_is_a_concept_error(tmp_path):
    from personamagic.concept import Concept

    with pytest.raises(ConceptError, match="no concept at") as info:
        Concept.load(tmp_path / "nowhere")
    assert isinstance(info.value, ValueError)


def test_an_unknown_model_is_a_model_load_error():
    from personamagic.models import load_base_model

    with pytest.raises(ModelLoadError, match="unknown model '/nope/model'") as info:
        load_base_model("/nope/model")
    assert isinstance(info.value, ValueError)


def test_a_fault_of_the_disk_is_also_an_os_error(tmp_path):
    from personamagic.files import disk_error

    err = disk_error(tmp_path / "x", OSError(28, "No space left on device"))
    assert isinstance(err, DiskError) and isinstance(err, OSError) and isinstance(err, PersonaMagicError)
    assert str(err) == f"cannot write {tmp_path / 'x'}: No space left on device"


def test_the_command_line_prints_a_library_error_in_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", tmp_path / "nowhere")
    assert_one_line_error(code, err, "no concept at")
    code, _, err = run_cli(capsys, "train", PHOTO, "-o", tmp_path / "out", "--model", "/nope/model")
    assert_one_line_error(code, err, "unknown model '/nope/model'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error, exit_code", [(ModelLoadError("no such model"), 2), (Interrupted("stopped"), 130)])
def test_the_command_line_decides_the_exit_code_by_kind(error, exit_code, capsys):
    from personamagic.cli.common import run_handler

    def handler(args):
        raise error

    code = run_handler(handler, argparse.Namespace(verbose=False))
    assert_one_line_error(code, capsys.readouterr().err, str(error), exit_code=exit_code)
