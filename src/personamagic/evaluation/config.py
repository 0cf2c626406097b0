"""The study config: datasets, methods (presets + overrides), prompts, seeds, models, settings.

Read from JSON or YAML, or taken from a built-in study (`presets.STUDY_PRESETS`); every key is a
field of `StudyConfig`, `DatasetConfig` or `MethodConfig`, and anything unknown is an error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BAD_JSON, SettingsError
from ..models.loading import DEFAULT_BASE_MODEL
from ..prompts import EVALUATION_PROMPTS
from . import DEFAULT_CLIP_MODEL, DEFAULT_FACE_MODEL
from .datasets import LAYOUTS, MODES
from .paper_points import TABLE6
from .presets import METHOD_PRESETS, STUDY_PRESETS
from .statistics import NO_FACE_CONVENTIONS

# Sampling settings a study may set (prompts and seeds are the study's own axes).
GENERATE_KEYS = ("negative_prompt", "num_inference_steps", "guidance_scale", "scheduler", "batch_size")
TEXT_METRICS = ("clip_s", "t_sim")


def _check_keys(cls, data: dict, where: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where}; known: {', '.join(known)}")


@dataclass
class DatasetConfig:
    """Where the identities of one dataset are, and how they are used."""

    name: str  # label in tables and plot panels; CelebA-HQ / FFHQ / LFW get the paper's points
    identities: str  # folder of identities; relative paths start at the config file's folder or --data-root
    layout: str = "auto"  # folders (one sub-folder per identity), files (each image one identity), auto
    mode: str = "one-shot"  # one-shot: one random photo per training run; few-shot: all photos
    repeats: int = 1  # training runs per identity (paper, one-shot: 5), each with its own photo draw and seed
    max_identities: int | None = None  # a seeded random sample of this many identities (paper: 100)
    min_photos: int = 1  # identities with fewer photos are skipped (LFW few-shot: 2)
    max_photos: int | None = None  # few-shot: a seeded random subset of at most this many photos
    paper: str | None = None  # the paper's column for reference points; None = guessed from `name`
    # layout world: the index in the walk of held-out people of the first person drawn (max_identities
    # people from there; max_photos photos each, default 1)
    first_person: int = 0

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError("every dataset needs a name")
        if self.layout not in LAYOUTS:
            raise ValueError(f"dataset {self.name!r}: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.paper is not None and self.paper not in TABLE6:
            raise ValueError(f"dataset {self.name!r}: paper must be one of {', '.join(TABLE6)} or null")
        if self.mode not in MODES:
            raise ValueError(f"dataset {self.name!r}: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for key in ("repeats", "min_photos"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"dataset {self.name!r}: {key} must be a whole number >= 1")
        for key in ("max_identities", "max_photos"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"dataset {self.name!r}: {key} must be a whole number >= 1 or null")
        if self.layout == "world" and self.max_identities is None:
            raise ValueError(f"dataset {self.name!r}: a world dataset needs max_identities, the number of people drawn")
        if not isinstance(self.first_person, int) or self.first_person < 0:
            raise ValueError(f"dataset {self.name!r}: first_person must be a whole number >= 0")

    @property
    def world_photos(self) -> int:
        """Photos drawn per person of a world dataset."""
        return self.max_photos or 1


@dataclass
class MethodConfig:
    """One method of a study: a preset of our trainer plus overrides."""

    name: str  # label in tables, plots and folder names
    preset: str  # a key of METHOD_PRESETS
    train: dict = field(default_factory=dict)  # TrainConfig overrides on top of the preset
    mask: str | None = None  # mask of the denoising loss; None = the preset's (auto if it has none)
    paper: tuple | None = None  # (table, row) of the paper's numbers for it; None = the preset's
    # a plug-in for training and sampling ({"ip_adapter": weights, "scale": x} or {"photomaker": weights});
    # None = the preset's
    plugin: dict | None = None
    # the method of the study whose concepts this one samples instead of training its own; None = the preset's
    concept_of: str | None = None

    def __post_init__(self):
        if self.preset not in METHOD_PRESETS:
            raise ValueError(f"unknown method preset {self.preset!r}; choose from {', '.join(METHOD_PRESETS)}")
        if not self.name or not isinstance(self.name, str):
            raise ValueError("every method needs a name")
        if not isinstance(self.train, dict):
            raise ValueError(f"method {self.name!r}: train must be a mapping of TrainConfig fields")
        if self.paper is not None:
            table, row = self.paper
            self.paper = (table, tuple(row) if isinstance(row, list) else row)

    @classmethod
    def parse(cls, entry) -> MethodConfig:
        """A preset name, or a mapping {name, preset, train, mask, paper}."""
        if isinstance(entry, str):
            return cls(name=entry, preset=entry)
        if not isinstance(entry, dict):
            raise ValueError(f"a method is a preset name or a mapping, got {entry!r}")
        _check_keys(cls, entry, "a method")
        entry = dict(entry)
        entry.setdefault("name", entry.get("preset", ""))
        if "preset" not in entry:
            raise ValueError(f"method {entry['name']!r} needs a preset ({', '.join(METHOD_PRESETS)})")
        return cls(**entry)

    @property
    def effective_mask(self) -> str:
        return self.mask or METHOD_PRESETS[self.preset].mask or "auto"

    @property
    def effective_plugin(self) -> dict | None:
        plugin = self.plugin if self.plugin is not None else METHOD_PRESETS[self.preset].plugin
        if plugin is not None and not (isinstance(plugin, dict) and len({"ip_adapter", "photomaker"} & set(plugin)) == 1):
            raise ValueError(f"method {self.name!r}: plugin must be {{'ip_adapter': ..., 'scale': ...}} or "
                             f"{{'photomaker': ...}}, got {plugin!r}")
        return plugin

    @property
    def effective_concept_of(self) -> str | None:
        return self.concept_of or METHOD_PRESETS[self.preset].concept_of

    @property
    def sampler(self) -> str:
        return METHOD_PRESETS[self.preset].sampler

    @property
    def subject(self) -> str | None:
        return METHOD_PRESETS[self.preset].subject

    @property
    def paper_row(self) -> tuple | None:
        return self.paper or METHOD_PRESETS[self.preset].paper

    def train_config(self, study_train: dict, repeat: int = 0):
        """The TrainConfig of this method: study-wide settings < preset < the method's overrides.

        The preset wins over study-wide settings, so e.g. a study-wide `te_weight` cannot turn TE on
        for `textual-inversion`; the training seed is shifted by the repeat index.
        """
        from ..training.config import TrainConfig

        values = {**study_train, **METHOD_PRESETS[self.preset].train, **self.train}
        values = {k: _parse_window(v) if k == "stage_window" else v for k, v in values.items()}
        values["seed"] = values.get("seed", 0) + repeat
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown TrainConfig field(s) {', '.join(unknown)}")
        return TrainConfig(**values)


def _parse_window(value):
    """None / "auto" -> None (automatic partition); "400:800" or [400, 800] -> (400, 800)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        try:
            lo, hi = (int(part) for part in value.split(":"))
        except ValueError:
            raise ValueError(f"stage_window must be LO:HI, [LO, HI] or auto, got {value!r}") from None
        return (lo, hi)
    return tuple(value)


@dataclass
class StudyConfig:
    """Everything a study does. JSON/YAML files hold these keys; see docs/evaluation.md."""

    datasets: list  # DatasetConfig entries (mappings in files)
    methods: list  # MethodConfig entries: preset names or mappings
    output: str = "evaluation"  # study folder (concepts/, images/, results/, summary.*, pareto.png)
    prompts: list = field(default_factory=lambda: list(EVALUATION_PROMPTS))  # with the placeholder (paper Fig. 16)
    seeds: list = field(default_factory=lambda: [0, 1, 2, 3])  # one image per prompt and seed (paper: 4)
    seed: int = 0  # seeds identity sampling and one-shot photo draws
    model: str = DEFAULT_BASE_MODEL  # base model: hub id, local path, or tiny
    train: dict = field(default_factory=dict)  # TrainConfig settings for every method (e.g. max_train_steps)
    generate: dict = field(default_factory=dict)  # sampling settings, any of GENERATE_KEYS
    image_encoder: str = "auto"  # CLIP vision model of the mapper's residual (personalize's default)
    identity_model: str = "auto"  # identity loss: auto (sface; tiny on tiny), sface, arcface-r100, file or hub id
    clip_model: str = DEFAULT_CLIP_MODEL  # CLIP of T-Sim (tiny = offline toy)
    face_model: str = DEFAULT_FACE_MODEL  # face recogniser of I-Pre: sface, sface-torch, dlib, or an identity model
    device: str = "auto"  # auto: one CUDA device per process (LOCAL_RANK), else MPS, else CPU
    dtype: str = "auto"  # weights' precision of the base model (personalize's rule)
    local_files_only: bool = False  # never download models
    # units a process trains in one step (`training.group`); the concepts are the same for any value,
    # larger is faster on a GPU and takes more memory; 1 trains one unit at a time
    identities_per_step: int = 1
    plot_text_metric: str = "clip_s"  # x axis of the Pareto plot: clip_s (the paper's scale) or t_sim (raw cosine)
    plot_identity_convention: str = "paper"  # y axis: I-Pre with no face = -1 (paper), 0 (zero) or left out (excluded)

    def __post_init__(self):
        if not self.datasets:
            raise ValueError("a study needs at least one dataset")
        if not self.methods:
            raise ValueError("a study needs at least one method")
        self.datasets = [d if isinstance(d, DatasetConfig) else _dataset(d) for d in self.datasets]
        self.methods = [m if isinstance(m, MethodConfig) else MethodConfig.parse(m) for m in self.methods]
        for kind, names in (("dataset", [d.name for d in self.datasets]), ("method", [m.name for m in self.methods])):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{kind} name(s) used twice: {', '.join(duplicates)}")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of non-empty prompts")
        if len(set(self.prompts)) != len(self.prompts):
            raise ValueError("prompts must not repeat")
        seeds_ok = all(isinstance(s, int) and s >= 0 for s in self.seeds) and len(set(self.seeds)) == len(self.seeds)
        if not self.seeds or not seeds_ok:
            raise ValueError("seeds must be a non-empty list of distinct whole numbers >= 0")
        unknown = sorted(set(self.generate) - set(GENERATE_KEYS))
        if unknown:
            raise ValueError(f"unknown generate setting(s) {', '.join(unknown)}; known: {', '.join(GENERATE_KEYS)}")
        if self.plot_text_metric not in TEXT_METRICS:
            raise ValueError(f"plot_text_metric must be one of {', '.join(TEXT_METRICS)}")
        if self.plot_identity_convention not in NO_FACE_CONVENTIONS:
            raise ValueError(f"plot_identity_convention must be one of {', '.join(NO_FACE_CONVENTIONS)}")
        steps = self.identities_per_step
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"identities_per_step must be a whole number >= 1, got {steps!r}")
        self.generate_config("check")
        names = {m.name: m for m in self.methods}
        for method in self.methods:
            source = method.effective_concept_of
            if source is not None and (source not in names or names[source].effective_concept_of is not None):
                raise ValueError(f"method {method.name!r} samples the concepts of {source!r}, which is not a method of "
                                 "this study that trains its own; add it (or set concept_of)")
        for method in self.methods:
            config = method.train_config(self.train)
            missing = [p for p in self.prompts if config.placeholder not in p]
            if missing:
                raise ValueError(
                    f"prompt {missing[0]!r} lacks the placeholder {config.placeholder!r} of method {method.name!r}"
                )

    def generate_config(self, prompt: str, seed: int = 0):
        from ..jobs.generate_config import GenerateConfig

        return GenerateConfig(prompts=[prompt], seed=seed, num_images=1, grid=False, **self.generate)

    @classmethod
    def from_dict(cls, data: dict) -> StudyConfig:
        if not isinstance(data, dict):
            raise ValueError("a study config is a mapping of settings")
        _check_keys(cls, data, "the study config")
        missing = [k for k in ("datasets", "methods") if k not in data]
        if missing:
            raise ValueError(f"the study config needs {' and '.join(missing)}")
        return cls(**data)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for method in data["methods"]:
            if method["paper"] is not None:
                method["paper"] = list(method["paper"])
        return data

    def resolved(self, data_dir: Path, config_dir: Path, output: str | None = None) -> StudyConfig:
        """A copy with absolute paths: dataset folders from `data_dir` (a world dataset's, which the study
        draws itself, from the output folder), the output folder from `config_dir` (or `output`, from the
        current folder)."""
        out = Path(output) if output is not None else config_dir / self.output
        datasets = [dataclasses.replace(d, identities=str(((out if d.layout == "world" else data_dir) / d.identities)
                                                          .resolve())) for d in self.datasets]
        return dataclasses.replace(self, datasets=datasets, output=str(out.resolve()))


def _dataset(entry) -> DatasetConfig:
    if not isinstance(entry, dict):
        raise ValueError(f"a dataset is a mapping with name and identities, got {entry!r}")
    _check_keys(DatasetConfig, entry, "a dataset")
    return DatasetConfig(**entry)


def load_study_config(spec: str, *, data_root: str | None = None, output: str | None = None) -> StudyConfig:
    """A study from a JSON/YAML file or a built-in study (a key of `STUDY_PRESETS`: `table6`, `world`, …).

    Dataset folders are relative to `data_root` if given (built-in studies of real photos need it), else
    to the config file's folder; a world dataset's folder is relative to the output folder; the output folder is relative to the config file's folder (built-in studies: the
    current folder), unless `output` replaces it.
    """
    path = Path(spec)
    if spec in STUDY_PRESETS and not path.is_file():
        drawn = all(d.get("layout") == "world" for d in STUDY_PRESETS[spec]["datasets"])
        if data_root is None and not drawn:
            raise SettingsError(f"the built-in study {spec} needs --data-root, the folder holding its datasets "
                                "(see docs/evaluation.md)")
        data, base_dir = json.loads(json.dumps(STUDY_PRESETS[spec])), Path.cwd()
        data.setdefault("output", f"evaluation-{spec}")
    elif path.is_file():
        data, base_dir = _read_config_file(path), path.resolve().parent
    else:
        raise SettingsError(f"{spec} is neither a study config file nor a built-in study ({', '.join(STUDY_PRESETS)})")
    try:
        config = StudyConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise SettingsError(f"{spec}: {err}") from None
    return config.resolved(Path(data_root) if data_root else base_dir, base_dir, output)


def _read_config_file(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SettingsError(f"{path} is YAML but PyYAML is not installed; pip install pyyaml or use JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SettingsError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    try:
        return json.loads(text)
    except BAD_JSON as err:
        raise SettingsError(f"{path} is not valid JSON ({err}); fix it or use a .yaml file") from None


