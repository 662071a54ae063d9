"""Settings of the CLIP trainer (one place, as open_clip's params.py): a dataclass parsed by training.config.

Defaults are the recipe of the shipped default model on a 2-core CPU;
a GPU user raises --image-size, --batch-size and --epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from training.config import arg, parse


@dataclass
class ClipConfig:
    """Train a CLIP model on a MedLens manifest."""

    # data
    manifest: str = field(default="", metadata=arg("JSONL manifest from `python -m training.recipes`", required=True))
    data_root: str = field(default="", metadata=arg("folder the manifest's paths are relative to", required=True))
    out: str = field(default="", metadata=arg("run folder: checkpoints, logs, the exported model", required=True))
    datasets: list[str] | None = field(default=None, metadata=arg("train only on these manifest datasets"))
    max_rows_per_dataset: int = field(default=0, metadata=arg("seeded subsample of at most N train and N val rows per dataset (0: all)"))
    # model
    tower: str = field(default="convnext_atto", metadata=arg("timm image tower name"))
    image_size: int = field(default=96, metadata=arg("model input side in pixels (the model image is resized to it)"))
    embed_dim: int = field(default=256, metadata=arg("joint embedding width"))
    text_proj: str = field(default="mlp", metadata=arg("text projection head", choices=["mlp", "linear"]))
    image_proj: str = field(default="linear", metadata=arg("image head (mlp suits a frozen trunk)", choices=["mlp", "linear"]))
    unlock_text_layers: int = field(default=0, metadata=arg("top MiniLM layers to train (0: locked, cached)"))
    init_trunk: str | None = field(default=None, metadata=arg("image trunk weights to start from (training.ssl output)"))
    trunk: str | None = field(default=None, metadata=arg("a pretrained trunk built in code", choices=[None, "astra-deflated"]))
    frozen_trunk: bool = field(default=False, metadata=arg("keep the trunk fixed; train only the image head"))
    drop_path: float = field(default=0.05, metadata=arg("stochastic depth of a trained trunk"))
    # domain randomisation (training.randomise) of a frozen trunk's cached views
    views: int = field(default=1, metadata=arg("frozen trunk: cached views per training image (1 clean + views-1 randomised)"))
    randomise: list[str] | None = field(default=None, metadata=arg("augmentation families of the randomised views (default: all)"))
    randomise_p: float = field(default=0.5, metadata=arg("probability that each family fires on a randomised view"))
    cache_precision: str = field(
        default="fp32",
        metadata=arg(
            "frozen-trunk feature cache arithmetic (auto: bf16 where the CPU computes it natively; bench/clip_trunk.py)",
            choices=["auto", "fp32", "bf16"],
        ),
    )
    trust: bool = field(default=True, metadata=arg("fit calibration and the OOD reference set into the exported model"))
    # optimisation
    epochs: float = field(default=10.0, metadata=arg("passes over samples_per_epoch rows"))
    samples_per_epoch: int = field(default=0, metadata=arg("0: the number of training rows"))
    batch_size: int = field(default=128, metadata=arg("global batch (split over ranks)"))
    accum: int = field(default=1, metadata=arg("gradient accumulation micro-batches per step"))
    lr: float = field(default=2e-3, metadata=arg("peak learning rate (AdamW, cosine decay)"))
    wd: float = field(default=0.05, metadata=arg("weight decay"))
    warmup: int = field(default=100, metadata=arg("warm-up steps"))
    init_temperature: float = field(default=0.07, metadata=arg("initial softmax temperature of the contrastive loss"))
    balance: float = field(default=0.5, metadata=arg("dataset sampling weight ~ size**balance (1: proportional)"))
    label_aware: bool = field(default=True, metadata=arg("pairs with the same labels are positives, not false negatives"))
    aug_strength: float = field(default=1.0, metadata=arg("scale of the training augmentations (0: none)"))
    precision: str = field(default="auto", metadata=arg("training arithmetic", choices=["auto", "fp32", "bf16"]))
    grad_clip: float = field(default=1.0, metadata=arg("gradient norm clip"))
    # bookkeeping
    seed: int = field(default=0, metadata=arg("random seed of sampling, augmentation and initialisation"))
    eval_every: int = field(default=200, metadata=arg("steps between validation passes (0: only at the end)"))
    save_every: int = field(default=200, metadata=arg("steps between resumable checkpoints"))
    resume: str = field(default="auto", metadata=arg("'auto' (out/last.pt if present), a path, or 'none'"))
    max_steps: int = field(default=0, metadata=arg("stop after this many steps (tests, smoke runs)"))
    export: str | None = field(default=None, metadata=arg("also copy the best model folder here (e.g. assets/models/medlens-clip)"))
    card_extra: str | None = field(default=None, metadata=arg("Markdown file appended to the model card"))
    channels_last: bool = field(
        default=False, metadata=arg("NHWC memory format (measured 1.5x faster for regnetx_004 on CPU, slower for convnext)")
    )
    device: str = field(default="auto", metadata=arg("auto, cpu or cuda"))
    quiet: bool = field(default=False, metadata=arg("no progress bar"))


def parse_clip_args(argv: Sequence[str] | None = None) -> ClipConfig:
    return parse(ClipConfig, argv, prog="python -m training.clip")
