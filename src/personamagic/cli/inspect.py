"""`personamagic inspect CONCEPT`: a concept's stages, training settings and file facts."""

from __future__ import annotations


def add_parser(commands) -> None:
    inspect = commands.add_parser("inspect", help="show a concept's stages, training settings and file facts")
    inspect.add_argument("concept", help="concept folder or concept.safetensors file")


def run(args) -> int:
    from ..concept import Concept, resolve_concept_path

    path = resolve_concept_path(args.concept)
    for line in describe_concept(Concept.load(path), path):
        print(line)
    return 0


def describe_concept(concept, path) -> list[str]:
    """A few lines about a concept: file, token, stages, training."""
    size = path.stat().st_size
    c, training, stages = concept, concept.training, concept.stages
    t_lo, t_hi = c.window
    lines = [
        f"{path}  {size / 1e6:.2f} MB, format {c.file_format}, written by personamagic {c.version}, fingerprint {c.fingerprint()}",
        f"placeholder {c.placeholder!r} ({c.mapper_config.get('num_vectors', 1)} vector(s)), supercategory "
        f"{c.supercategory!r}, base model {c.base_model} ({c.family}, text width {c.text_encoder_hidden_size})",
        f"stages: static 1 t >= {t_hi} | dynamic {t_lo} <= t < {t_hi} | static 2 t < {t_lo}  (T = {c.num_train_timesteps})",
    ]
    iou, timesteps = stages.get("iou"), stages.get("timesteps")
    numbers = isinstance(iou, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in iou)
    recorded = numbers and iou and isinstance(timesteps, list) and len(iou) == len(timesteps)
    if stages.get("method") == "auto" and recorded:
        best = max(range(len(iou)), key=lambda i: iou[i])
        flags = [name for name in ("flat", "widened") if stages.get(name)]
        lines.append(
            f"partition: automatic, lambda1={stages.get('lambda1')} lambda2={stages.get('lambda2')}, warm-up "
            f"{stages.get('warmup_steps')} steps ({'restarted' if stages.get('restarted') else 'continued'}), "
            f"IoU max {iou[best]:.3f} at t={timesteps[best]}"
            + (f", {' and '.join(flags)}" if flags else "")
        )
    elif stages.get("method") == "auto":
        lines.append("partition: automatic (its IoU curve is not recorded)")
    else:
        lines.append("partition: fixed window given at training")
    if training:
        get = training.get
        id_loss = f"on (weight {get('id_weight')})" if get("use_id_loss") else "off"
        lines.append(
            f"training: {get('steps_done')} steps, batch {get('train_batch_size')}, lr "
            f"{get('learning_rate')}, seed {get('seed')}, TE weight {get('te_weight')}, identity loss {id_loss}"
        )
    extra = c.extra
    if extra:
        photos = extra.get("photos")
        lines.append(
            f"photos: {', '.join(map(str, photos)) if isinstance(photos, list) else photos}; mask {extra.get('mask')}; image encoder "
            f"{c.image_encoder}; trained on {extra.get('device')} in {extra.get('dtype')}"
        )
    return lines
