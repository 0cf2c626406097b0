"""The renderer of the learning world: a person (identity) in a context, drawn with PIL,
deterministically from (identity, context, seed).

Drawn on a 128² canvas and reduced to 64² (the world's resolution: the largest at which a base model
trains from scratch within two hours on a 2-core CPU, and one at which every identity feature still
spans at least one cell of the VAE's 16² latents — the eyes are 5 px wide at 64²). The seed moves
what a real photo would vary: a few pixels of position, lighting, the details of the background.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageEnhance, ImageFilter

from ..errors import PhotoError
from .attributes import CONTEXT_ATTRIBUTES, default_context, identity_attributes

RESOLUTION = 64  # the world's image side
CANVAS = 128  # drawing side (reduced to RESOLUTION: anti-aliasing)

SKIN = {"porcelain": (255, 228, 206), "light": (238, 194, 156), "tan": (214, 160, 112), "olive": (176, 132, 82),
        "brown": (130, 84, 52), "dark": (78, 50, 34)}
HAIR = {"black": (28, 24, 26), "brown": (112, 64, 28), "blonde": (236, 206, 112), "red": (196, 58, 26),
        "grey": (196, 198, 206), "pink": (238, 108, 180)}
EYES = {"brown": (104, 58, 22), "blue": (36, 112, 232), "green": (34, 170, 64), "violet": (150, 60, 210)}
CLOTHES = {"red": (208, 36, 40), "blue": (40, 72, 210), "green": (40, 150, 60), "yellow": (240, 210, 40),
           "white": (240, 240, 236), "black": (30, 30, 34)}
HATS = {"red_hat": (214, 30, 36), "blue_hat": (30, 60, 220), "green_hat": (30, 160, 50)}
# half-width, half-height of the head (canvas px); "square" is a rounded rectangle of these halves
FACE_SIZES = {"round": (30, 31), "oval": (25, 33), "long": (21, 36), "square": (28, 31)}
POSITIONS = {"center": (0, 0, 1.0), "left": (-28, 0, 0.85), "right": (28, 0, 0.85), "far": (0, 8, 0.55)}


@dataclass
class WorldImage:
    """One render: the image, the face mask, and every attribute it shows."""

    image: Image.Image  # RGB, RESOLUTION²
    mask: Image.Image  # L, RESOLUTION², 255 on the face (the head's skin), 0 elsewhere
    identity: int  # the person's number
    attributes: dict  # identity and context attribute values


RECORD_KEY = "personamagic-world"  # PNG text chunk of a saved render: {"identity", "context", "seed"}


def save_render(item: WorldImage, path, seed: int) -> None:
    """Write the render as PNG with its world record (so the world model can redraw its face mask)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    context = {a.name: item.attributes[a.name] for a in CONTEXT_ATTRIBUTES}
    info.add_text(RECORD_KEY, json.dumps({"identity": item.identity, "context": context, "seed": seed}))
    item.image.save(path, format="PNG", pnginfo=info)


def recorded_render(path) -> dict | None:
    """The world record of a saved render ({"identity", "context", "seed"}); None if it carries none."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get(RECORD_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
        return {"identity": int(record["identity"]), "context": dict(record["context"]), "seed": int(record["seed"])}
    except (ValueError, KeyError, TypeError) as err:
        raise PhotoError(f"{path} has a damaged world record ({err}); pass the mask with --mask FILE") from None


def recorded_mask(path) -> Image.Image | None:
    """The face mask of a saved render, redrawn from its world record; None if it carries none."""
    record = recorded_render(path)
    if record is None:
        return None
    try:
        return render(record["identity"], record["context"], record["seed"]).mask
    except ValueError as err:  # a value the renderer does not know
        raise PhotoError(f"{path} has a damaged world record ({err}); pass the mask with --mask FILE") from None


def render(identity: int, context: dict | None = None, seed: int = 0) -> WorldImage:
    """Person `identity` in `context` (missing keys: the reference photo's), drawn from `seed`."""
    full = default_context()
    full.update(context or {})
    for attribute in CONTEXT_ATTRIBUTES:
        attribute.index(full[attribute.name])  # unknown values raise here
    person = identity_attributes(identity)
    rng = np.random.default_rng([identity, seed, 0x5EED])
    canvas = _background(full["background"], rng)
    layer, alpha, face = _person(person, full, rng)
    layer, alpha, face = _place(layer, alpha, face, full["position"], rng)
    canvas.paste(layer, (0, 0), alpha)
    canvas = _style(canvas, full["style"], rng)
    image = canvas.resize((RESOLUTION, RESOLUTION), Image.LANCZOS)
    mask = face.resize((RESOLUTION, RESOLUTION), Image.BILINEAR).point(lambda v: 255 if v >= 128 else 0)
    return WorldImage(image, mask, identity, {**person, **full})


# --------------------------------------------------------------------------------------------------
# backgrounds


def _background(kind: str, rng) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS))
    draw = ImageDraw.Draw(image)
    if kind == "studio":
        for y in range(CANVAS):
            v = int(150 - 40 * y / CANVAS)
            draw.line([(0, y), (CANVAS, y)], fill=(v, v, v + 6))
    elif kind == "beach":
        horizon = 52 + int(rng.integers(-4, 5))
        draw.rectangle([0, 0, CANVAS, horizon], fill=(120, 190, 245))
        draw.rectangle([0, horizon, CANVAS, horizon + 22], fill=(30, 120, 190))
        draw.rectangle([0, horizon + 22, CANVAS, CANVAS], fill=(238, 214, 160))
        sx = int(rng.integers(8, 120))
        draw.ellipse([sx - 9, 6, sx + 9, 24], fill=(255, 236, 120))
    elif kind == "forest":
        draw.rectangle([0, 0, CANVAS, CANVAS], fill=(36, 84, 40))
        for _ in range(7):
            x, top = int(rng.integers(0, CANVAS)), int(rng.integers(-10, 40))
            draw.rectangle([x - 4, top + 30, x + 4, CANVAS], fill=(84, 56, 30))
            draw.ellipse([x - 22, top, x + 22, top + 44], fill=(20, 120 + int(rng.integers(0, 40)), 36))
        draw.rectangle([0, 112, CANVAS, CANVAS], fill=(60, 110, 40))
    elif kind == "snow":
        draw.rectangle([0, 0, CANVAS, 76], fill=(200, 218, 236))
        draw.rectangle([0, 76, CANVAS, CANVAS], fill=(250, 250, 252))
        for _ in range(40):
            x, y = int(rng.integers(0, CANVAS)), int(rng.integers(0, 76))
            draw.ellipse([x - 1, y - 1, x + 2, y + 2], fill=(255, 255, 255))
    elif kind == "city":
        draw.rectangle([0, 0, CANVAS, CANVAS], fill=(240, 150, 90))
        x = -int(rng.integers(0, 12))
        while x < CANVAS:
            w, h = int(rng.integers(16, 30)), int(rng.integers(40, 100))
            shade = int(rng.integers(60, 100))
            draw.rectangle([x, CANVAS - h, x + w - 2, CANVAS], fill=(shade, shade, shade + 14))
            for wy in range(CANVAS - h + 6, CANVAS - 4, 10):
                for wx in range(x + 3, x + w - 6, 7):
                    draw.rectangle([wx, wy, wx + 3, wy + 4], fill=(250, 220, 100))
            x += w
    elif kind == "space":
        draw.rectangle([0, 0, CANVAS, CANVAS], fill=(8, 8, 24))
        for _ in range(60):
            x, y = int(rng.integers(0, CANVAS)), int(rng.integers(0, CANVAS))
            draw.point((x, y), fill=(255, 255, 255))
            draw.point((x + 1, y), fill=(200, 200, 255))
        px, py = int(rng.integers(10, 118)), int(rng.integers(10, 40))
        draw.ellipse([px - 10, py - 10, px + 10, py + 10], fill=(200, 110, 60))
    return image


# --------------------------------------------------------------------------------------------------
# the person: drawn centred on its own layer, then placed


HEAD_X, HEAD_Y = 64, 60  # head centre on the person layer


def _person(person: dict, context: dict, rng):
    layer = Image.new("RGB", (CANVAS, CANVAS))
    alpha = Image.new("L", (CANVAS, CANVAS), 0)
    face = Image.new("L", (CANVAS, CANVAS), 0)
    draw, cut, mask = ImageDraw.Draw(layer), ImageDraw.Draw(alpha), ImageDraw.Draw(face)
    skin, hair = SKIN[person["skin_tone"]], HAIR[person["hair_colour"]]
    rx, ry = FACE_SIZES[person["face_shape"]]
    head = [HEAD_X - rx, HEAD_Y - ry, HEAD_X + rx, HEAD_Y + ry]

    def both(shape: str, box, fill, **kw):  # draw on the layer and make it opaque
        getattr(draw, shape)(box, fill=fill, **kw)
        getattr(cut, shape)(box, fill=255, **kw)

    if person["hair_style"] == "long":  # behind the head and shoulders
        both("rounded_rectangle", [HEAD_X - rx - 8, HEAD_Y - ry - 6, HEAD_X + rx + 8, HEAD_Y + ry + 26], hair, radius=14)
    # shoulders and neck
    both("rounded_rectangle", [14, HEAD_Y + ry + 10, 114, CANVAS + 20], CLOTHES[context["clothing"]], radius=22)
    both("rectangle", [HEAD_X - 9, HEAD_Y + ry - 6, HEAD_X + 9, HEAD_Y + ry + 14], skin)
    # the head
    if person["face_shape"] == "square":
        both("rounded_rectangle", head, skin, radius=9)
        mask.rounded_rectangle(head, fill=255, radius=9)
    else:
        both("ellipse", head, skin)
        mask.ellipse(head, fill=255)
    _hair(both, person["hair_style"], hair, rx, ry)
    _face_features(draw, person, rx, ry)
    _beard(draw, person["beard"], hair, rx, ry)
    _glasses(draw, context["glasses"], rx)
    _headwear(both, context["headwear"], rx, ry)
    return layer, alpha, face


def _hair(both, style: str, colour, rx: int, ry: int) -> None:
    top = HEAD_Y - ry
    if style in ("short", "long", "bun"):
        both("chord", [HEAD_X - rx - 2, top - 4, HEAD_X + rx + 2, HEAD_Y + ry // 3], colour, start=180, end=360)
    if style == "bun":
        both("ellipse", [HEAD_X - 11, top - 20, HEAD_X + 11, top + 2], colour)
    if style == "spiky":
        for k in range(5):
            x = HEAD_X - rx + 4 + k * (2 * rx - 8) / 4
            both("polygon", [(x - 8, top + 10), (x, top - 14), (x + 8, top + 10)], colour)
        both("chord", [HEAD_X - rx, top, HEAD_X + rx, HEAD_Y], colour, start=195, end=345)


def _face_features(draw, person: dict, rx: int, ry: int) -> None:
    eye_y, dx = HEAD_Y - 2, max(10, rx // 2 + 1)
    iris = EYES[person["eye_colour"]]
    for side in (-1, 1):
        cx = HEAD_X + side * dx
        draw.ellipse([cx - 8, eye_y - 5, cx + 8, eye_y + 5], fill=(250, 250, 250))
        draw.ellipse([cx - 5, eye_y - 5, cx + 5, eye_y + 5], fill=iris)
        draw.ellipse([cx - 2, eye_y - 2, cx + 2, eye_y + 2], fill=(10, 10, 10))
    dark = (70, 30, 30)
    nose_y = HEAD_Y + 8
    if person["nose"] == "button":
        draw.ellipse([HEAD_X - 3, nose_y, HEAD_X + 3, nose_y + 5], fill=dark)
    elif person["nose"] == "long":
        draw.polygon([(HEAD_X, nose_y - 10), (HEAD_X - 4, nose_y + 7), (HEAD_X + 4, nose_y + 7)], fill=dark)
    else:
        draw.rectangle([HEAD_X - 8, nose_y + 2, HEAD_X + 8, nose_y + 6], fill=dark)
    mouth_y = HEAD_Y + ry * 2 // 3 - 4
    if person["mouth"] == "small":
        draw.rectangle([HEAD_X - 5, mouth_y, HEAD_X + 5, mouth_y + 3], fill=(160, 40, 50))
    elif person["mouth"] == "smile":
        draw.chord([HEAD_X - 13, mouth_y - 8, HEAD_X + 13, mouth_y + 6], start=0, end=180, fill=(160, 40, 50))
    else:
        draw.ellipse([HEAD_X - 6, mouth_y - 4, HEAD_X + 6, mouth_y + 7], fill=(60, 10, 20))


def _beard(draw, beard: str, colour, rx: int, ry: int) -> None:
    mouth_y = HEAD_Y + ry * 2 // 3 - 4
    if beard == "moustache":
        draw.rounded_rectangle([HEAD_X - 13, mouth_y - 8, HEAD_X + 13, mouth_y - 3], fill=colour, radius=2)
    elif beard == "goatee":
        draw.polygon([(HEAD_X - 8, mouth_y + 7), (HEAD_X + 8, mouth_y + 7), (HEAD_X, HEAD_Y + ry + 6)], fill=colour)
    elif beard == "full":
        draw.chord([HEAD_X - rx, HEAD_Y - ry // 2, HEAD_X + rx, HEAD_Y + ry + 4], start=20, end=160, fill=colour)


def _glasses(draw, glasses: str, rx: int) -> None:
    if glasses == "none":
        return
    eye_y, dx = HEAD_Y - 2, max(10, rx // 2 + 1)
    for side in (-1, 1):
        cx = HEAD_X + side * dx
        box = [cx - 10, eye_y - 8, cx + 10, eye_y + 8]
        if glasses == "sunglasses":
            draw.rounded_rectangle(box, fill=(16, 16, 20), radius=4)
        else:
            draw.ellipse(box, outline=(20, 20, 20), width=3)
    draw.line([(HEAD_X - dx + 10, eye_y), (HEAD_X + dx - 10, eye_y)], fill=(20, 20, 20), width=3)


def _headwear(both, headwear: str, rx: int, ry: int) -> None:
    top = HEAD_Y - ry
    if headwear in HATS:
        colour = HATS[headwear]
        both("rectangle", [HEAD_X - rx - 12, top + 2, HEAD_X + rx + 12, top + 9], colour)
        both("rectangle", [HEAD_X - rx + 4, top - 26, HEAD_X + rx - 4, top + 4], colour)
    elif headwear == "crown":
        gold = (250, 196, 20)
        points = [(HEAD_X - rx, top + 6), (HEAD_X - rx, top - 16), (HEAD_X - rx // 2, top - 4), (HEAD_X, top - 22),
                  (HEAD_X + rx // 2, top - 4), (HEAD_X + rx, top - 16), (HEAD_X + rx, top + 6)]
        both("polygon", points, gold)


def _place(layer, alpha, face, position: str, rng):
    """Shift and scale the person layer (position and a seed's few pixels of jitter)."""
    dx, dy, scale = POSITIONS[position]
    jx, jy = (int(v) for v in rng.integers(-3, 4, size=2))
    size = int(round(CANVAS * scale))
    if size != CANVAS:
        layer, alpha, face = (im.resize((size, size), Image.LANCZOS) for im in (layer, alpha, face))
    offset = ((CANVAS - size) // 2 + dx + jx, (CANVAS - size) + dy + jy if scale < 1 else dy + jy)
    placed = []
    for im, mode in ((layer, "RGB"), (alpha, "L"), (face, "L")):
        out = Image.new(mode, (CANVAS, CANVAS))
        out.paste(im, offset)
        placed.append(out)
    return tuple(placed)


# --------------------------------------------------------------------------------------------------
# rendering styles


def _style(image: Image.Image, style: str, rng) -> Image.Image:
    if style == "photo":
        # soft light from a seed's direction, and a little sensor noise
        angle = float(rng.uniform(0, 2 * np.pi))
        ys, xs = np.mgrid[0:CANVAS, 0:CANVAS] / CANVAS - 0.5
        light = 1.0 + 0.18 * (np.cos(angle) * xs + np.sin(angle) * ys)
        pixels = np.asarray(image, dtype=np.float32) * light[..., None] + rng.normal(0, 3, (CANVAS, CANVAS, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if style == "sketch":
        # pencil lines over a wash of the colours on warm paper
        lines = image.convert("L").filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(3))
        lines = ImageChops.invert(lines.point(lambda v: 255 if v > 24 else 0))
        paper = Image.new("RGB", image.size, (246, 240, 226))
        wash = Image.blend(paper, ImageEnhance.Color(image).enhance(0.6), 0.5)
        return ImageChops.multiply(wash, Image.merge("RGB", (lines,) * 3))
    if style == "painting":
        # flat strokes, strong colours, a canvas weave
        painted = ImageEnhance.Color(image.filter(ImageFilter.ModeFilter(7))).enhance(1.5)
        weave = (np.indices((CANVAS, CANVAS)).sum(axis=0) % 4 < 2) * 14.0 - 7.0
        pixels = np.asarray(painted, dtype=np.float32) + weave[..., None]
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    raise ValueError(f"unknown style {style!r}")
