"""The exceptions the package raises for what its caller can fix, each kind its own class so that a
Python caller catches the one it handles; the command line turns any of them into its one `error: ...`
line and an exit code (`cli/common.run_handler`). Each is a `ValueError` whose message says what to do."""


class PersonaMagicError(ValueError):
    """Something PersonaMagic cannot do with what it was given; the message says what to do instead."""


class ModelLoadError(PersonaMagicError):
    """A model or weights file (base model, VAE, plug-in, encoder, identity network) that cannot be found,
    downloaded or read, or is not what it should be."""


class ConceptError(PersonaMagicError):
    """A concept file or folder (or a training checkpoint) that is missing, damaged, or does not fit."""


class PhotoError(PersonaMagicError):
    """A photo, mask or image that cannot be used: unreadable, too large, no face found, a mask that marks
    nothing, an image without the record asked of it."""


class SettingsError(PersonaMagicError):
    """A mistake in the run's settings that no photo changes (a value out of range, options that exclude each
    other, an output path that cannot be one): a job over many identities stops at the first instead of
    reporting it for each."""


class DiskError(PersonaMagicError, OSError):
    """A fault of the disk while writing (full, read-only, no permission), worded with the path;
    `remedy` is what to do about it, for a message that goes on to say how to continue."""

    @property
    def remedy(self) -> str:
        import errno

        full = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # a full disk, a used-up quota
        return "free some space" if self.errno in full else "make it writable"


class FolderInUse(PersonaMagicError):
    """An output folder another live run holds (its lock): `train-many` leaves that identity to it."""


class Interrupted(PersonaMagicError):
    """The user stopped a run (Ctrl-C); the message says what was kept and how to go on."""


# What `json.loads` raises on text that is damaged or hostile: a syntax error (JSONDecodeError is a
# ValueError), an integer of more digits than Python converts (ValueError), nesting deeper than the
# parser recurses (RecursionError). Every read of JSON from a file catches all of them.
BAD_JSON = (ValueError, RecursionError)
