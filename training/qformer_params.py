"""Settings of the Q-Former trainer: one dataclass parsed by training.config (the ClipConfig pattern).

Flags keep the names they had as inline argparse arguments, so recipes
(training/shipped_qformer.json) and commands in model cards still run. The
parsed dataclass is saved verbatim (`training.config.to_dict`) under
"training" in every checkpoint the trainer writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from training.config import UsageError, arg, parse

ENCODERS = ("i3resnet152", "i3resnet-tiny")


@dataclass
class QFormerTrainConfig:
    """Train the Q-Former (BLIP-2 stage 1) on a QA manifest."""

    # data
    qa_manifest: str = field(default="", metadata=arg("QA manifest from `python -m training.recipes.qa`", required=True))
    data_root: str = field(default="", metadata=arg("folder the manifest's paths are relative to", required=True))
    out: str = field(default="", metadata=arg("run folder: best/ and last/ checkpoints, history.json", required=True))
    cache: str | None = field(default=None, metadata=arg("token cache folder (default: <out>/../qformer_cache)"))
    max_image_rows: int = field(default=0, metadata=arg("cap on 2D train rows (0 = all), drawn per dataset evenly"))
    # model
    layers: int = field(default=4, metadata=arg("num_hidden_layers (the first N MiniLM layers)"))
    cross_attention_frequency: int = field(default=2, metadata=arg("a cross-attention layer every N layers"))
    dropout: float = field(default=0.1, metadata=arg("hidden and attention dropout (BLIP-2: 0.1)"))
    num_query_tokens: int = field(default=32, metadata=arg("learned queries"))
    image_size: int = field(default=128, metadata=arg("2D images: side in pixels (128 -> 4x4 tokens)"))
    encoder: str = field(
        default="i3resnet152",
        metadata=arg("frozen image encoder (i3resnet-tiny: random weights, for tests and smoke runs)", choices=ENCODERS),
    )
    volume_size: list[int] | None = field(default=None, metadata=arg("3D input X Y Z (default: engine's VolumePrep)"))
    volume_spacing: list[float] | None = field(default=None, metadata=arg("3D spacing mm x y z"))
    volume_pad_to_size: bool = field(default=False, metadata=arg("pad every volume to the full input size (fixed token grid)"))
    freeze_text_ffn: bool = field(default=False, metadata=arg("keep MiniLM's text FFN frozen (not saved: smaller checkpoint)"))
    init: str | None = field(default=None, metadata=arg("start from a saved Q-Former folder (its trainable weights; same architecture)"))
    # optimisation and sampling
    steps: int = field(default=1200, metadata=arg("optimiser steps"))
    batch_size: int = field(default=32, metadata=arg("rows per step (one kind: 2D images or volume crops)"))
    lr: float = field(default=1e-4, metadata=arg("peak learning rate (AdamW, cosine decay)"))
    warmup: int = field(default=60, metadata=arg("warm-up steps"))
    volume_share: float = field(default=0.4, metadata=arg("share of steps drawing volume crops"))
    caption_share: float = field(default=0.2, metadata=arg("share of decoder targets that are the caption, not a question"))
    finding_weight: float = field(
        default=1.0,
        metadata=arg(
            "how much likelier an image-specific question (finding, diagnosis, organ, count, side) is picked than a "
            "modality/region/plane one"
        ),
    )
    balance: float = field(
        default=0.0,
        metadata=arg("class balancing of 2D rows: 0 as they come, 0.5 square-root, 1 even (datasets get equal shares when > 0)"),
    )
    closed_weight: float = field(
        default=0.0, metadata=arg("weight of the discriminative closed-question loss (cross-entropy over candidates' likelihoods); 0 = off")
    )
    # bookkeeping
    eval_every: int = field(default=200, metadata=arg("steps between validation passes"))
    cache_only: bool = field(default=False, metadata=arg("fill the token cache (train, val and test rows) and stop"))
    threads: int = field(default=0, metadata=arg("torch threads (0: torch's default)"))
    seed: int = field(default=0, metadata=arg("random seed of sampling and initialisation"))
    device: str = field(default="auto", metadata=arg("auto, cpu or cuda"))

    def validate(self) -> "QFormerTrainConfig":
        for name, value in (("volume_size", self.volume_size), ("volume_spacing", self.volume_spacing)):
            if value is not None and len(value) != 3:
                raise UsageError(f"--{name.replace('_', '-')} takes three numbers (x y z), got {len(value)}")
        if self.steps < 0 or self.batch_size < 1 or self.eval_every < 1:
            raise UsageError("--steps must be >= 0, --batch-size and --eval-every >= 1")
        if not 0.0 <= self.volume_share <= 1.0 or not 0.0 <= self.caption_share <= 1.0:
            raise UsageError("--volume-share and --caption-share are shares between 0 and 1")
        return self


def parse_qformer_args(argv: Sequence[str] | None = None) -> QFormerTrainConfig:
    return parse(QFormerTrainConfig, argv, prog="python -m training.qformer").validate()
