"""Old import path of the losses, kept for existing code: see `personamagic.method.losses`."""

from .method.losses import identity_loss, identity_weight, masked_mse, tandem_equilibrium_loss

__all__ = ["identity_loss", "identity_weight", "masked_mse", "tandem_equilibrium_loss"]
