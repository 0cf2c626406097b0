"""Identity networks for the identity loss (paper Eq. 3): the encoder interface (`encoder`), the
networks (`iresnet`), and where their weights come from (`loading`). The alignment of faces to a
recogniser's template lives in `personamagic.faces.alignment`."""

from ..faces.alignment import (
    ARCFACE_INPUT_SIZE,
    ARCFACE_TEMPLATE_112,
    align_faces,
    alignment_theta,
    similarity_transform,
    warp_faces,
)
from .encoder import ArcFaceEncoder, IdentityEncoder, identity_similarity
from .iresnet import IRESNET_LAYERS, IBasicBlock, IResNet, IResNetConfig, build_iresnet
from .loading import (
    DEFAULT_IDENTITY_MODEL,
    RANDOM_IRESNET100,
    TINY_IRESNET_CONFIG,
    build_tiny_identity_model,
    load_identity_model,
)

__all__ = [
    "ARCFACE_INPUT_SIZE", "ARCFACE_TEMPLATE_112", "ArcFaceEncoder", "DEFAULT_IDENTITY_MODEL", "IBasicBlock",
    "IRESNET_LAYERS", "IResNet", "IResNetConfig", "IdentityEncoder", "RANDOM_IRESNET100", "TINY_IRESNET_CONFIG",
    "align_faces", "alignment_theta", "build_iresnet", "build_tiny_identity_model", "identity_similarity",
    "load_identity_model", "similarity_transform", "warp_faces",
]
