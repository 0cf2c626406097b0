"""What a command will download, checked before anything loads: offline, one message lists every asset
that is missing from the local hub cache, with the flag that replaces each.

Without this an offline run finds its missing files one at a time, each after seconds of loading. The
check runs when the hub is out of reach: `HF_HUB_OFFLINE=1`, `--local-files-only`, or no network (one
short connection attempt, made only when something is not cached).
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ModelLoadError
from ..hub import hub_reference, is_hub_id


def built_names() -> tuple[str, ...]:
    """Names of models built in code or shipped with the package (never downloaded)."""
    from ..identity.loading import RANDOM_IRESNET100, SFACE
    from ..models.tiny import BUILT_MODELS, RANDOM_IMAGE_ENCODER
    from ..models.world import WORLD

    return (*BUILT_MODELS, RANDOM_IMAGE_ENCODER, RANDOM_IRESNET100, SFACE, WORLD)


@dataclass(frozen=True)
class Asset:
    """One thing a command reads from the hub (or a local path)."""

    what: str  # in words: "the base model", "CLIPSeg (the face mask)"
    spec: str  # hub id (owner/name[/file]) or local path
    flag: str  # what to pass instead, in words: "--mask landmarks"
    filename: str = "config.json"  # a file the repo must hold in the cache (hub ids without a file part)


def is_local_or_built(spec: str) -> bool:
    return spec in built_names() or Path(spec).expanduser().exists() or spec.startswith((".", "/", "~"))


def cached(asset: Asset) -> bool:
    """Whether the asset can be read without the network: it is local, built, in the hub cache, or no
    hub reference at all (nothing to download: its loader says what is wrong with it)."""
    import huggingface_hub

    reference = hub_reference(asset.spec)
    if is_local_or_built(asset.spec) or reference is None:
        return True
    filename = reference.filename or asset.filename
    return isinstance(huggingface_hub.try_to_load_from_cache(reference.repo_id, filename), str)


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One short TCP connection to the hub's endpoint (checked once per process)."""
    import huggingface_hub.constants as constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_assets(assets: list[Asset], *, local_files_only: bool = False) -> None:
    """ModelLoadError listing every asset that is neither cached nor downloadable now; nothing when the hub
    can be reached or all is cached."""
    missing = [a for a in assets if not cached(a)]
    if not missing or (not local_files_only and hub_reachable()):
        return
    advice = "download them once with a network, or use the alternatives named"
    if len(missing) == 1:
        (a,) = missing
        raise ModelLoadError(f"offline, and a download this command needs is not in the local hub cache: {a.what} "
                             f"{a.spec} (or {a.flag}); "
                             f"{advice.replace('them', 'it').replace('alternatives', 'alternative')}")
    listed = "".join(f"\n  {a.what} {a.spec} (or {a.flag})" for a in missing)
    raise ModelLoadError(f"offline, and {len(missing)} downloads this command needs are not in the local hub cache "
                         f"({advice}):{listed}")


def base_model_asset(model: str, family=None) -> Asset:
    """A hub model, with the offline toy of its family as the alternative: `family` where the caller knows
    it (its concepts'), else the family the name suggests (the config that would tell is what is missing)."""
    from ..families import offline_toy

    return Asset("the base model", model, f"--model {offline_toy(model, family)} (an offline toy) or a local folder or file",
                 filename="model_index.json")


def model_assets(model: str, *, family=None, model_config: str | None = None, vae: str | None = None,
                 photomaker=None, ip_adapter=None) -> list[Asset]:
    """What loading `model` with these options downloads: the model (or, for a single file without
    `model_config`, its family's config repo), another VAE, PhotoMaker's weights, an IP-Adapter's
    weights and image encoder. `family`: the model's, where the caller knows it (`base_model_asset`)."""
    from ..models.loading import checkpoint_tensor_shapes, family_of_checkpoint

    found = []
    if is_hub_id(model):
        found.append(base_model_asset(model, family))
    elif Path(model).expanduser().is_file() and model_config is None:
        path = Path(model).expanduser()
        family = family_of_checkpoint(path, checkpoint_tensor_shapes(path))
        found.append(Asset(f"the {family.title} configs of {model}", family.checkpoint_config_repo,
                           "--model-config FOLDER", filename="model_index.json"))
    if vae is not None and is_hub_id(vae):
        found.append(Asset("the VAE", vae, "the model's own VAE (no --vae)"))
    weights = getattr(photomaker, "weights", photomaker)
    if weights is not None and is_hub_id(str(weights)):
        found.append(Asset("PhotoMaker's weights", f"{weights}/photomaker-v1.bin", "a local photomaker-v1.bin"))
    if ip_adapter is not None and is_hub_id(ip_adapter.model):
        folder = "/".join(part for part in (ip_adapter.model, ip_adapter.subfolder) if part)
        found.append(Asset("the IP-Adapter", f"{folder}/{ip_adapter.weight_name}", "a local IP-Adapter file"))
        if "/" not in ip_adapter.image_encoder_folder:
            found.append(Asset("the IP-Adapter's image encoder", f"{folder}/{ip_adapter.image_encoder_folder}/config.json",
                               "a local IP-Adapter file with its image_encoder/ folder"))
    return found
