"""Where a model's files come from: a local path, or a Hugging Face hub reference `owner/name[/path/in/repo]`
downloaded into the hub cache by `huggingface_hub` (which honours `HF_HUB_OFFLINE`; `local_files_only`
reads the cache alone and never the network).

`hub_reference` tells a hub reference from a local path by its shape alone; `resolve_file` turns either
into the local path of one file, downloading it when needed. Every failure is one `ModelLoadError` that ends
in what to pass instead.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError
from .files import first_line

logger = logging.getLogger(__name__)

# file types of model weights: `dir/name.pt` is a relative local path, not the hub repo `dir/name.pt`
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx")
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")  # a whole base model in one file (a fine-tune)
_OWNER = re.compile(r"[A-Za-z0-9][\w.-]*")  # a hub user or organisation name
_NAME = re.compile(r"[\w.-]+")  # a hub repo name


@dataclass(frozen=True)
class HubReference:
    """A repo on the Hugging Face hub, or one file in it."""

    repo_id: str  # owner/name
    filename: str | None  # path of a file inside the repo ("models/x.safetensors"); None: the repo itself


def hub_reference(text: str) -> HubReference | None:
    """`owner/name[/path/in/repo]` split into repo id and file; None for text of another shape (a local
    path: absolute, `./`, `~`, with backslashes, `dir/file.pt`; or a name without a slash)."""
    parts = text.split("/")
    if len(parts) < 2 or text.startswith((".", "~")) or "\\" in text or not all(parts) or re.search(r"\s", text):
        return None
    owner, name, *rest = parts
    if not (_OWNER.fullmatch(owner) and _NAME.fullmatch(name)):
        return None
    if not rest and name.lower().endswith(WEIGHTS_SUFFIXES):
        return None
    return HubReference(f"{owner}/{name}", "/".join(rest) or None)


def is_hub_id(text: str) -> bool:
    """`owner/name`: a hub repo itself (not a file in one, not a local path)."""
    reference = hub_reference(text)
    return reference is not None and reference.filename is None


def resolve_file(
    spec: str | Path,
    *,
    what: str,
    advice: str,
    filename: str | None = None,
    suffixes: tuple[str, ...] = WEIGHTS_SUFFIXES,
    local_files_only: bool = False,
    revision: str | None = None,
) -> Path:
    """The local path of the file `spec` names, downloaded into the hub cache when it is on the hub.

    `spec` is a local file; a local folder or a hub repo `owner/name`, of which the file `filename` is
    meant (no `filename`: a folder is refused, and a repo must hold exactly one file ending in one of
    `suffixes`); or a file on the hub, `owner/name/path/in/repo`. `what` names the file in messages
    ("identity model file"); `advice` ends every message, saying what to pass instead. `revision`: a hub
    branch, tag or commit.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if filename is None:
            raise ModelLoadError(f"the {what} {spec} is a directory; pass the file inside it")
        if not (path / filename).is_file():
            raise ModelLoadError(f"{spec} has no {filename}; {advice}")
        return path / filename
    reference = hub_reference(str(spec))
    if reference is None:
        raise ModelLoadError(
            f"the {what} {spec} does not exist (no such file or folder, and not a hub reference "
            f"owner/name[/path/in/repo]); {advice}"
        )
    name = reference.filename or filename or _only_file(reference.repo_id, suffixes, revision, advice)
    import huggingface_hub

    try:
        local = huggingface_hub.hf_hub_download(
            reference.repo_id, name, revision=revision, local_files_only=local_files_only
        )
    except Exception as err:  # hub errors come in many classes: offline, not cached, no such repo or file, auth
        raise ModelLoadError(
            f"could not get the {what} {reference.repo_id}/{name} from the hub ({first_line(err)}); {advice}"
        ) from None
    logger.debug("%s %s/%s is %s", what, reference.repo_id, name, local)
    return Path(local)


def _only_file(repo_id: str, suffixes: tuple[str, ...], revision: str | None, advice: str) -> str:
    """The one file of a hub repo whose name ends in one of `suffixes`."""
    import huggingface_hub

    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception as err:  # as in resolve_file: every hub failure means the same here
        raise ModelLoadError(f"could not list the files of the hub repo {repo_id} ({first_line(err)}); "
                             f"{advice}") from None
    candidates = [f for f in files if f.lower().endswith(suffixes)]
    if len(candidates) != 1:
        raise ModelLoadError(
            f"hub repo {repo_id} holds {len(candidates)} weights files ({', '.join(candidates[:5])}); "
            f"name one as {repo_id}/FILE"
        )
    return candidates[0]
