"""The identity loss's face patch: decode only the latent patch under the aligned face crop.

The identity loss decodes x̂0 through the VAE and back-propagates through it; at 512² that costs more
than the rest of the step. Only the face matters to it, so the latent patch that covers the aligned
face crop (plus a margin) is decoded instead: about 1/8 of the latent at SD-1.x sizes. An approximation
(the decoder sees less context), measured by the tests and the benchmark.
"""

from __future__ import annotations

import math

import torch


def face_patches(face_theta: torch.Tensor, latent_size: tuple[int, int], scale: int, margin: int):
    """Latent patches that cover each photo's aligned face crop.

    face_theta: (N, 2, 3) `affine_grid` matrices (output crop -> normalised image coordinates) for
    images of latent_size x scale pixels. Returns (flat indices (N, ph*pw) into the h*w latent grid,
    (ph, pw), patch thetas (N, 2, 3) for the decoded patches). All patches share one size so the
    batch stays rectangular; each is placed to cover its face and stay inside the latent.
    """
    h, w = latent_size
    H, W = h * scale, w * scale
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    boxes = []
    for theta in face_theta.float().cpu():
        normalised = corners @ theta.T  # (4, 3) x (3, 2) -> (4, 2) in [-1, 1] image units
        x = (normalised[:, 0] + 1) / 2 * W
        y = (normalised[:, 1] + 1) / 2 * H
        boxes.append((math.floor(y.min() / scale) - margin, math.ceil(y.max() / scale) + margin,
                      math.floor(x.min() / scale) - margin, math.ceil(x.max() / scale) + margin))
    ph = min(h, max(b[1] - b[0] for b in boxes))
    pw = min(w, max(b[3] - b[2] for b in boxes))
    indices, thetas = [], []
    for (y0, y1, x0, x1), theta in zip(boxes, face_theta.float().cpu()):
        y0 = min(max(0, (y0 + y1 - ph) // 2), h - ph)
        x0 = min(max(0, (x0 + x1 - pw) // 2), w - pw)
        rows = torch.arange(y0, y0 + ph)[:, None]
        cols = torch.arange(x0, x0 + pw)[None, :]
        indices.append((rows * w + cols).reshape(-1))
        # full-image normalised coords -> patch normalised coords (pixel centres kept)
        Hp, Wp, py, px = ph * scale, pw * scale, y0 * scale, x0 * scale
        to_patch = torch.tensor([[W / Wp, 0.0, (W - 2 * px) / Wp - 1], [0.0, H / Hp, (H - 2 * py) / Hp - 1],
                                 [0.0, 0.0, 1.0]])
        thetas.append((to_patch @ torch.cat([theta, torch.tensor([[0.0, 0.0, 1.0]])]))[:2])
    return torch.stack(indices), (ph, pw), torch.stack(thetas)


def gather_patches(latents: torch.Tensor, indices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) latents, (B, ph*pw) flat indices -> (B, C, ph, pw) patches (capture-safe gather)."""
    B, C = latents.shape[:2]
    flat = latents.flatten(2)  # (B, C, h*w)
    picked = flat.gather(2, indices[:, None, :].expand(B, C, -1))  # (B, C, ph*pw)
    return picked.view(B, C, *size)
