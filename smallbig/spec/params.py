"""Typed params: frozen dataclasses built from a validated params mapping.

`smallbig.config.load_params` reads, merges and validates the YAML (schema in this package); this
module turns the result into `Params`. There is one place a default lives: `params/base.yaml`.
`Params.from_dict` (and each section's `from_dict`) fills what a partial mapping leaves out from
that file, so code never writes a default again (no `.get("crop_size", 224)`).

    p = Params.from_dict(load_params("params/experiments/k400-r50-sb-full.yaml"))
    p.data.crop_size, p.train.lr, p.test.protocols[0].views, p.model.stages["res3"].block

`Params.raw` keeps the validated mapping: it is what is hashed (`config.params_hash`), written
(`params.yaml` of a run) and logged to MLflow, so a run's identity does not change with this layer.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallbig.spec.protocol import Protocol

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_PATH = REPO_ROOT / "params" / "base.yaml"
STAGES = ("res2", "res3", "res4", "res5")

_DEFAULTS: dict | None = None


def defaults() -> dict:
    """params/base.yaml, read once (safe loader; a copy each call)."""
    global _DEFAULTS
    if _DEFAULTS is None:
        from smallbig.config import ParamsError
        from smallbig.yamlsafe import YamlInputError, load_yaml_file

        try:
            data = load_yaml_file(BASE_PATH)
        except YamlInputError as e:
            raise ParamsError(f"{e} (the defaults of every experiment)") from None
        if not isinstance(data, dict):
            raise ParamsError(f"{BASE_PATH}: top level must be a mapping")
        _DEFAULTS = data
    return copy.deepcopy(_DEFAULTS)


def _merged(section: str, given: Mapping[str, Any] | None) -> dict:
    from smallbig.config import deep_merge

    base = defaults().get(section) or {}
    return deep_merge(base, dict(given or {}), (section,))


def _frozen(d: Mapping | None) -> dict:
    """A private deep copy (plain dicts: the specs stay deep-copyable and picklable, e.g. for
    data-loader workers); the dataclasses are frozen, nobody mutates these."""
    return copy.deepcopy(dict(d or {}))


PoolSize = tuple  # (kt: int | "T", kh: int, kw: int)


@dataclass(frozen=True)
class UnitSpec:
    pool: str  # max | avg
    share: bool  # one conv W for the small and the big view
    bn: str  # individual | single

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnitSpec:
        return cls(pool=d["pool"], share=bool(d["share"]), bn=d["bn"])


@dataclass(frozen=True)
class StageSpec:
    block: str  # 2d | 3d | smallbig
    smallbig: Mapping[str, PoolSize] = field(default_factory=dict)  # conv1/2/3 -> pooling
    extra: str = "none"  # a stage entry is replaced whole, so absence means none
    nonlocal_: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageSpec:
        units = {k: tuple(v) for k, v in (d.get("smallbig") or {}).items()}
        return cls(
            block=d["block"],
            smallbig=units,
            extra=d.get("extra", "none"),
            nonlocal_=bool(d.get("nonlocal", False)),
        )


@dataclass(frozen=True)
class ModelSpec:
    depth: int
    base_width: int
    num_classes: int
    dropout: float
    pretrained: str | None
    formulation: str
    unit: UnitSpec
    stages: Mapping[str, StageSpec]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        m = _merged("model", d)
        if "stages" in d:  # stages are replaced whole, never merged with the base's
            m["stages"] = copy.deepcopy(dict(d["stages"]))
        if not isinstance(m.get("stages"), Mapping) or set(STAGES) - set(m["stages"]):
            from smallbig.config import ParamsError

            raise ParamsError(
                f"model.stages: needs {', '.join(STAGES)} (there is no default for "
                f"the stages in {BASE_PATH.name})"
            )
        return cls(
            depth=int(m["depth"]),
            base_width=int(m["base_width"]),
            num_classes=int(m["num_classes"]),
            dropout=float(m["dropout"]),
            pretrained=m.get("pretrained"),
            formulation=m["formulation"],
            unit=UnitSpec.from_dict(m["unit"]),
            stages={s: StageSpec.from_dict(m["stages"][s]) for s in STAGES},
        )


@dataclass(frozen=True)
class DataSpec:
    dataset: str
    root: str
    source: Mapping[str, Any]
    format: str
    num_frames: int
    sampling: str  # dense | segment
    frame_stride: int | None
    train_short_side: tuple[int, int]
    crop_size: int
    flip: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frame_short_side: int
    num_workers: int
    limit_train: int | None
    limit_val: int | None
    decode_cache_mb: int  # 0: off (smallbig/data/cache.py)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataSpec:
        m = _merged("data", d)
        if "source" in d:  # replaced whole
            m["source"] = copy.deepcopy(d["source"])
        lo, hi = m["train_short_side"]
        return cls(
            dataset=m["dataset"],
            root=str(m["root"]),
            source=_frozen(m.get("source")),
            format=m["format"],
            num_frames=int(m["num_frames"]),
            sampling=m["sampling"],
            frame_stride=m.get("frame_stride"),
            train_short_side=(int(lo), int(hi)),
            crop_size=int(m["crop_size"]),
            flip=bool(m["flip"]),
            mean=tuple(float(v) for v in m["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in m["std"]),  # type: ignore[arg-type]
            frame_short_side=int(m["frame_short_side"]),
            num_workers=int(m["num_workers"]),
            limit_train=m.get("limit_train"),
            limit_val=m.get("limit_val"),
            decode_cache_mb=int(m.get("decode_cache_mb") or 0),
        )


@dataclass(frozen=True)
class TrainSpec:
    epochs: int
    batch_size: int
    per_gpu_batch: int
    batch_policy: str  # accumulate | scale_lr
    lr: float
    momentum: float
    weight_decay: float
    wd_exclude_bn_bias: bool
    schedule: str  # cosine | step
    lr_steps: tuple[int, ...]
    lr_gamma: float
    warmup_epochs: float
    amp: str  # none | bf16 | fp16
    channels_last: bool
    compile: bool
    sync_bn: bool
    seed: int
    checkpoint_every_iters: int
    val_every_epochs: int
    clips_per_sec_per_gpu: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainSpec:
        m = _merged("train", d)
        return cls(
            epochs=int(m["epochs"]),
            batch_size=int(m["batch_size"]),
            per_gpu_batch=int(m["per_gpu_batch"]),
            batch_policy=m["batch_policy"],
            lr=float(m["lr"]),
            momentum=float(m["momentum"]),
            weight_decay=float(m["weight_decay"]),
            wd_exclude_bn_bias=bool(m["wd_exclude_bn_bias"]),
            schedule=m["schedule"],
            lr_steps=tuple(int(s) for s in m.get("lr_steps") or ()),
            lr_gamma=float(m["lr_gamma"]),
            warmup_epochs=float(m["warmup_epochs"]),
            amp=str(m["amp"]),
            channels_last=bool(m["channels_last"]),
            compile=bool(m["compile"]),
            sync_bn=bool(m["sync_bn"]),
            seed=int(m["seed"]),
            checkpoint_every_iters=int(m["checkpoint_every_iters"]),
            val_every_epochs=int(m["val_every_epochs"]),
            clips_per_sec_per_gpu=float(m["clips_per_sec_per_gpu"]),
        )


@dataclass(frozen=True)
class TestSpec:
    short_side: int
    multi_crop_size: int
    single_crop_size: int
    batch_size: int
    protocols: tuple[Protocol, ...]  # the first is the primary one

    __test__ = False  # not a pytest test class

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TestSpec:
        m = _merged("test", d)
        return cls(
            short_side=int(m["short_side"]),
            multi_crop_size=int(m["multi_crop_size"]),
            single_crop_size=int(m["single_crop_size"]),
            batch_size=int(m["batch_size"]),
            protocols=tuple(Protocol.parse(p) for p in m["protocols"]),
        )

    def crop_size(self, protocol: str | Protocol) -> int:
        return Protocol.parse(protocol).crop_size(self)


@dataclass(frozen=True)
class Resources:
    gpus: int
    cpus_per_gpu: int
    mem_gb: int
    train_runtime_min: int
    eval_runtime_min: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Resources:
        m = _merged("resources", d)
        return cls(
            **{
                k: int(m[k])
                for k in ("gpus", "cpus_per_gpu", "mem_gb", "train_runtime_min", "eval_runtime_min")
            }
        )


@dataclass(frozen=True)
class PretrainedWeight:
    url: str
    sha256: str
    depth: int
    file: str
    size: int | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PretrainedWeight:
        return cls(
            url=d["url"], sha256=d["sha256"], depth=int(d["depth"]), file=d["file"], size=d.get("size")
        )


@dataclass(frozen=True)
class Params:
    id: str
    description: str
    tables: tuple[int, ...]
    notes: tuple[str, ...]
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    test: TestSpec
    resources: Resources
    pretrained_weights: Mapping[str, PretrainedWeight]
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | Params) -> Params:
        """From a validated params mapping (what `config.load_params` returns); sections or keys
        it leaves out come from params/base.yaml."""
        if isinstance(d, Params):
            return d
        declared = d.get("pretrained_weights")
        if declared is None:
            declared = defaults().get("pretrained_weights") or {}
        return cls(
            id=str(d.get("id", "")),
            description=str(d.get("description", "")),
            tables=tuple(d.get("tables") or ()),
            notes=tuple(d.get("notes") or ()),
            model=ModelSpec.from_dict(d.get("model") or {}),
            data=DataSpec.from_dict(d.get("data") or {}),
            train=TrainSpec.from_dict(d.get("train") or {}),
            test=TestSpec.from_dict(d.get("test") or {}),
            resources=Resources.from_dict(d.get("resources") or {}),
            pretrained_weights={k: PretrainedWeight.from_dict(v) for k, v in declared.items()},
            raw=_frozen(d),
        )

    def to_dict(self) -> dict:
        """The validated mapping this was built from (a deep copy)."""
        return copy.deepcopy(dict(self.raw))

    @property
    def primary_protocol(self) -> Protocol:
        return self.test.protocols[0]


def load(path: str | Path, overlay: str | Path | None = None) -> Params:
    """`config.load_params` (read, merge, validate) + typing."""
    from smallbig.config import load_params

    return Params.from_dict(load_params(path, overlay))
