"""Training the world's base model from scratch, in three resumable stages:

1. *data*: render the training set (training identities only) into `data.npz`;
2. *vae*: train the AutoencoderKL alone (reconstruction MSE + a small KL term), then cache every
   image's latent distribution (`latents.npz`); the scaling factor is 1/std of the latents, as SD's;
3. *unet*: train the UNet and the text encoder together on the cached latents (ε-prediction on SD-1.4's
   noise schedule, 10% of captions dropped for classifier-free guidance), with an EMA of both.

Each stage checkpoints (safetensors + JSON, atomically) and a rerun continues where it stopped. Every
random draw (batches, noise, timesteps) is made on the CPU and then moved to the training device, so a
GPU run draws the same numbers as a CPU run. The
result is a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`) that `--model world` loads like any user's folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..files import load_safetensors, save_safetensors_atomic, write_atomic
from .base_model import WorldModelConfig, build_text_encoder, build_unet, build_vae, scheduler_config
from .dataset import load_dataset, render_dataset, save_dataset


@dataclass
class BaseTrainingConfig:
    """How the world's base model is trained (defaults: what `world train-base` runs)."""

    images: int = 48000  # renders in the training set
    data_seed: int = 0  # seed of the training set
    vae_steps: int = 1200  # VAE steps (batch vae_batch)
    vae_batch: int = 32
    vae_lr: float = 1.5e-3  # VAE AdamW learning rate
    vae_kl: float = 1e-6  # weight of the VAE's KL term (SD's VAE: small, so latents stay informative)
    unet_steps: int = 7000  # UNet + text encoder steps (batch unet_batch)
    unet_batch: int = 32
    unet_lr: float = 5e-4  # AdamW learning rate after warm-up
    warmup_steps: int = 300  # linear learning-rate warm-up of the UNet stage
    ema_decay: float = 0.999  # EMA of the UNet and text encoder weights (what is saved)
    caption_drop: float = 0.1  # share of empty captions (classifier-free guidance)
    checkpoint_every: int = 500  # steps between checkpoints (both stages)
    grid_seeds: int = 4  # seeds per prompt of the fixed-seed grid drawn at each UNet checkpoint (0: no grid)
    seed: int = 0  # seed of noise, timesteps and batches
    model: WorldModelConfig = field(default_factory=WorldModelConfig)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return out


# --------------------------------------------------------------------------------------------------
# checkpoints: modules, optimizer and step in one safetensors file


def _save_state(path: Path, modules: dict, optimizer, step: int, extra: dict) -> None:
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    state = optimizer.state_dict()
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    header = {"step": step, "param_groups": state["param_groups"], **extra}
    save_safetensors_atomic(tensors, {"state": json.dumps(header)}, path)


def _load_state(path: Path, modules: dict, optimizer) -> dict:
    tensors, header = load_safetensors(path)
    meta = json.loads(header["state"])
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    state = {"state": {}, "param_groups": meta["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(state)
    return meta


# --------------------------------------------------------------------------------------------------
# stage 2: the VAE


def _pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) renders as (N, 3, H, W) floats in [-1, 1] on `device`."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).to(device)


def train_vae(config: BaseTrainingConfig, images: np.ndarray, folder: Path, log,
              device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    vae = build_vae(config.model).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    path, step = folder / "vae-state.safetensors", 0
    if path.is_file():
        step = _load_state(path, {"vae": vae}, optimizer)["step"]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
    generator = torch.Generator().manual_seed(config.seed + step)  # a resume continues with its own stream
    bar = tqdm(total=config.vae_steps, initial=step, desc="vae", unit="step")
    started = time.monotonic()
    while step < config.vae_steps:
        index = order[(step * config.vae_batch + torch.arange(config.vae_batch)) % len(images)]
        x = _pixels(images[index.numpy()], device)
        posterior = vae.encode(x).latent_dist
        # the posterior's sample, drawn on the CPU (what diffusers' `sample(generator)` draws there)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        reconstruction = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(reconstruction, x)
        loss = mse + config.vae_kl * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(mse=f"{mse.item():.4f}")
        log({"stage": "vae", "step": step, "mse": mse.item(), "seconds": time.monotonic() - started})
        if step % config.checkpoint_every == 0 or step == config.vae_steps:
            _save_state(path, {"vae": vae}, optimizer, step, {})
    bar.close()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def cache_latents(vae, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray, float]:
    """Every image's latent mean and std (N, 4, 16, 16) float16, and the scaling factor 1/std(latents)."""
    means, stds = [], []
    device = next(vae.parameters()).device
    for start in tqdm(range(0, len(images), batch), desc="latents", unit="batch"):
        dist = vae.encode(_pixels(images[start:start + batch], device)).latent_dist
        means.append(dist.mean.half().cpu().numpy())
        stds.append(dist.std.half().cpu().numpy())
    mean, std = np.concatenate(means), np.concatenate(stds)
    sample_var = mean.astype(np.float64).var() + (std.astype(np.float64) ** 2).mean()
    return mean, std, float(1 / math.sqrt(sample_var))


# --------------------------------------------------------------------------------------------------
# stage 3: the UNet and the text encoder


class EMA:
    """An exponential moving average of a module's floating-point weights (warm-up as in diffusers'
    EMAModel: decay min(d, (1 + n) / (10 + n)))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for key, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].lerp_(value, 1 - decay)
            else:
                self.shadow[key].copy_(value)


def tokenize(tokenizer, captions) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(config: BaseTrainingConfig, latents: dict, captions: np.ndarray, folder: Path, log, sample=None,
               device: torch.device = torch.device("cpu")):
    from diffusers import DDPMScheduler

    from ..models.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    unet = build_unet(config.model).to(device).train()
    text_encoder = build_text_encoder(config.model).to(device).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = EMA(unet, config.ema_decay), EMA(text_encoder, config.ema_decay)
    path, step = folder / "unet-state.safetensors", 0
    ema_modules = _EmaModules(ema_unet, ema_text)
    if path.is_file():
        step = _load_state(path, {"unet": unet, "text_encoder": text_encoder, **ema_modules.as_modules()}, optimizer)[
            "step"]
    scheduler = DDPMScheduler.from_config(scheduler_config())
    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])[0]
    mean, std, scale = torch.from_numpy(latents["mean"]), torch.from_numpy(latents["std"]), latents["scaling_factor"]
    generator = torch.Generator().manual_seed(config.seed + step)  # a resume continues with its own stream
    schedule = lambda s: config.unet_lr * min(1.0, (s + 1) / config.warmup_steps)  # noqa: E731
    bar = tqdm(total=config.unet_steps, initial=step, desc="unet", unit="step")
    started = time.monotonic()
    while step < config.unet_steps:
        index = torch.randint(len(mean), (config.unet_batch,), generator=generator)
        x0 = (mean[index].float() + std[index].float() * torch.randn(mean[index].shape, generator=generator)) * scale
        batch_ids = ids[index].clone()
        batch_ids[torch.rand(len(index), generator=generator) < config.caption_drop] = empty
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        x0, noise, t, batch_ids = x0.to(device), noise.to(device), t.to(device), batch_ids.to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        prediction = unet(noisy, t, text_encoder(batch_ids).last_hidden_state).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log({"stage": "unet", "step": step, "loss": loss.item(), "seconds": time.monotonic() - started})
        if step % config.checkpoint_every == 0 or step == config.unet_steps:
            _save_state(path, {"unet": unet, "text_encoder": text_encoder, **ema_modules.as_modules()}, optimizer,
                        step, {})
            if sample is not None:
                sample(ema_modules.build(config.model, device), step)
    bar.close()
    return ema_modules.build(config.model, device)


class _EmaModules:
    """The EMA weights as modules (to checkpoint them with the rest, and to sample from them)."""

    def __init__(self, ema_unet: EMA, ema_text: EMA):
        self.ema_unet, self.ema_text = ema_unet, ema_text

    def as_modules(self) -> dict:
        return {"ema_unet": _Holder(self.ema_unet.shadow), "ema_text_encoder": _Holder(self.ema_text.shadow)}

    def build(self, model: WorldModelConfig, device: torch.device):
        unet, text_encoder = build_unet(model).to(device), build_text_encoder(model).to(device)
        unet.load_state_dict(self.ema_unet.shadow)
        text_encoder.load_state_dict(self.ema_text.shadow)
        return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


class _Holder:
    """A dict of tensors that speaks state_dict/load_state_dict (loading copies in place)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def state_dict(self) -> dict:
        return self.tensors

    def load_state_dict(self, tensors: dict) -> None:
        for key, value in tensors.items():
            self.tensors[key].copy_(value)


# --------------------------------------------------------------------------------------------------
# the whole run


def save_world_model(folder: Path, vae, unet, text_encoder, model: WorldModelConfig) -> None:
    """The diffusers folder of the world model (weights in safetensors)."""
    from ..models.tokenizer import clip_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder / "vae")
    unet.save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = {k: v for k, v in scheduler_config().items() if k != "_class_name"}
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", **scheduler}, indent=2) + "\n")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.36.0",
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "world_model.json").write_text(json.dumps(model.to_dict(), indent=2) + "\n")


PROGRESS_PROMPTS = (
    "a photo of a face wearing a red hat in a studio", "a photo of a face wearing a blue hat in a studio",
    "a photo of a face in a forest", "a photo of a face in the snow", "a photo of a face on a beach",
    "a sketch of a face with glasses", "a painting of a face in a yellow shirt", "a photo of a face on the left",
)


@torch.no_grad()
def progress_grid(vae, unet, text_encoder, path: Path, seeds: int = 4, steps: int = 25, guidance: float = 5.0):
    """A fixed-seed grid (prompts × seeds) of the model as it trains: DDIM, classifier-free guidance."""
    from diffusers import DDIMScheduler
    from PIL import Image

    from ..models.tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    scheduler = DDIMScheduler.from_config(scheduler_config())
    scheduler.set_timesteps(steps)
    prompts = [p for p in PROGRESS_PROMPTS for _ in range(seeds)]
    device = unet.device
    cond = text_encoder(tokenize(tokenizer, prompts).to(device)).last_hidden_state
    uncond = text_encoder(tokenize(tokenizer, [""] * len(prompts)).to(device)).last_hidden_state
    size = unet.config.sample_size
    latents = torch.stack([torch.randn(4, size, size, generator=torch.Generator().manual_seed(i % seeds))
                           for i in range(len(prompts))]).to(device)
    for t in scheduler.timesteps:
        both = unet(torch.cat([latents] * 2), t, torch.cat([uncond, cond])).sample
        noise_uncond, noise_cond = both.chunk(2)
        latents = scheduler.step(noise_uncond + guidance * (noise_cond - noise_uncond), t, latents).prev_sample
    images = (vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1) + 1) * 127.5
    images = images.permute(0, 2, 3, 1).round().to(torch.uint8).cpu().numpy()
    side = images.shape[1]
    grid = Image.new("RGB", (seeds * side, len(PROGRESS_PROMPTS) * side))
    for i, image in enumerate(images):
        grid.paste(Image.fromarray(image), ((i % seeds) * side, (i // seeds) * side))
    grid.save(path)


def export_state(work: Path, output: Path, model: WorldModelConfig = WorldModelConfig()) -> int:
    """Write the diffusers folder of the EMA weights in `work`'s last UNet checkpoint (while training
    goes on: to look at a model half-way); returns its step."""
    vae = build_vae(model)
    vae.load_state_dict({k[4:]: v for k, v in load_safetensors(work / "vae-state.safetensors")[0].items()
                         if k.startswith("vae.")})
    with np.load(work / "latents.npz") as f:
        vae.register_to_config(scaling_factor=float(f["scaling_factor"]))
    tensors, header = load_safetensors(work / "unet-state.safetensors")
    unet, text_encoder = build_unet(model), build_text_encoder(model)
    unet.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("ema_unet.")})
    text_encoder.load_state_dict({k[17:]: v for k, v in tensors.items() if k.startswith("ema_text_encoder.")})
    save_world_model(output, vae.eval(), unet.eval(), text_encoder.eval(), model)
    return json.loads(header["state"])["step"]


def run(config: BaseTrainingConfig, work: Path, output: Path, device: torch.device = torch.device("cpu")) -> None:
    """Run (or continue) every stage in `work` on `device`, then write the diffusers folder `output`."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    log_file = open(work / "log.jsonl", "a", encoding="utf-8")

    def log(record: dict) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    data_path = work / "data.npz"
    if not data_path.is_file():
        save_dataset(render_dataset(config.images, config.data_seed), data_path)
    data = load_dataset(data_path)
    latents_path = work / "latents.npz"
    if latents_path.is_file():
        with np.load(latents_path) as f:
            latents = {"mean": f["mean"], "std": f["std"], "scaling_factor": float(f["scaling_factor"])}
        vae = build_vae(config.model)
        vae.load_state_dict({k[4:]: v for k, v in load_safetensors(work / "vae-state.safetensors")[0].items()
                             if k.startswith("vae.")})
        vae.to(device)
    else:
        vae = train_vae(config, data["images"], work, log, device)
        mean, std, scale = cache_latents(vae, data["images"])
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, mean=mean, std=std, scaling_factor=scale)

        write_atomic(latents_path, write)
        latents = {"mean": mean, "std": std, "scaling_factor": scale}
    vae.register_to_config(scaling_factor=latents["scaling_factor"])
    vae.eval()

    def sample(modules, step: int) -> None:
        progress_grid(vae, *modules, work / f"grid-{step:06d}.png", seeds=config.grid_seeds)

    unet, text_encoder = train_unet(config, latents, data["captions"], work, log,
                                    sample if config.grid_seeds else None, device)
    save_world_model(output, vae.eval(), unet, text_encoder, config.model)
    log_file.close()
    write_model_card(work, output)


def training_summary(work: Path, every: int = 100) -> dict:
    """The run's log condensed: mean VAE MSE and UNet loss per `every` steps (and at the last step), and the
    UNet stage's time."""
    records = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((work / "config.json").read_text())
    final = {"vae": config["vae_steps"], "unet": config["unet_steps"]}  # a run cut short: steps past its end
    records = [r for r in records if r["step"] <= final.get(r["stage"], r["step"])]  # were never kept
    summary = {}
    for stage, key in (("vae", "mse"), ("unet", "loss")):
        rows = {r["step"]: r for r in records if r["stage"] == stage}  # a resumed step: its last record
        steps = sorted(rows)
        summary[stage] = [[s, float(np.mean([rows[t][key] for t in steps if s - every < t <= s]))]
                          for s in steps if s % every == 0 or s == steps[-1]]
    for stage in ("vae", "unet"):
        timed = [r["seconds"] for r in records if r["stage"] == stage and "seconds" in r]
        if timed:
            summary[f"{stage}_seconds"] = _resumed_seconds(timed)
    return summary


def _resumed_seconds(readings: list[float]) -> float:
    """A stage's time from its log's clock readings, which restart at each resume: each segment's last."""
    segments, last = [], None
    for seconds in readings:
        if last is not None and seconds < last:
            segments.append(last)
        last = seconds
    return sum(segments) + (last or 0.0)


def write_model_card(work: Path, output: Path) -> None:
    """The model card (README.md) and training log (training_log.json, loss.png) of the world model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = json.loads((work / "config.json").read_text())
    summary = training_summary(work)
    (output / "training_log.json").write_text(json.dumps({"config": config, **summary}, indent=1) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, stage, label in ((axes[0], "vae", "VAE reconstruction MSE"), (axes[1], "unet", "UNet ε-MSE")):
        steps, values = zip(*summary[stage])
        ax.plot(steps, values)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(output / "loss.png", dpi=80)
    plt.close(fig)
    vae_last, unet_last = summary["vae"][-1], summary["unet"][-1]
    vae_time = f", in {summary['vae_seconds'] / 60:.0f} minutes" if "vae_seconds" in summary else ""
    card = f"""# The world model

A Stable Diffusion 1.x-shaped text-to-image model of the learning world's drawn people (64² images),
trained from scratch on a 2-core CPU by `personamagic world train-base`; what the world is, the
figures measured on it and what it cannot tell about real faces: docs/world.md in the repository.

- **Data**: {config['images']:,} renders of training identities (never a held-out one) in random
  contexts, each with one caption of the world's grammar (seed {config['data_seed']}).
- **Parts**: diffusers `AutoencoderKL` (block channels {config['model']['vae_channels']}), diffusers
  `UNet2DConditionModel` (block channels {config['model']['unet_channels']}), transformers
  `CLIPTextModel` (width {config['model']['text_width']}, {config['model']['text_layers']} layers) with the
  real Stable Diffusion tokenizer; SD-1.4's noise schedule, DDIM by default.
- **Training**: the VAE alone for {config['vae_steps']} steps of {config['vae_batch']} (AdamW
  {config['vae_lr']}), last 100-step mean reconstruction MSE {vae_last[1]:.4f} (pixels in [−1, 1]){vae_time}; then
  the UNet and the text encoder together on the cached latents for {config['unet_steps']} steps of
  {config['unet_batch']} (AdamW {config['unet_lr']}, {config['warmup_steps']} warm-up steps, {config['caption_drop']:.0%}
  empty captions), last 100-step mean ε-MSE {unet_last[1]:.4f}, in {summary['unet_seconds'] / 60:.0f}
  minutes. The weights are the EMA (decay {config['ema_decay']}) of both.
- **Loss curves**: `loss.png`; every 100 steps: `training_log.json`.
- **Licence**: the same as the package (MIT); the tokenizer's vocabulary is OpenAI CLIP's (MIT).

## Quality

<!-- figures:start -->
Not measured yet: `personamagic evaluate world` measures the shipped model and `python benchmarks/world_doc.py`
writes its figures here.
<!-- figures:end -->
"""
    (output / "README.md").write_text(card)
