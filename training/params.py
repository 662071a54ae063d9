"""Command-line parameters of the trainers (one place, as open_clip's params.py).

Defaults are the recipe of the shipped default model on a 2-core CPU;
a GPU user raises --image-size, --batch-size and --epochs.
"""

from __future__ import annotations

import argparse


def clip_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.clip", description="Train a CLIP model on a MedLens manifest.")
    p.add_argument("--manifest", required=True, help="JSONL manifest from `python -m training.recipes`")
    p.add_argument("--data-root", required=True, help="folder the manifest's paths are relative to")
    p.add_argument("--out", required=True, help="run folder: checkpoints, logs, the exported model")
    p.add_argument("--datasets", nargs="*", default=None, help="train only on these manifest datasets")
    # model
    p.add_argument("--tower", default="convnext_atto", help="timm image tower name")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--text-proj", default="mlp", choices=["mlp", "linear"])
    p.add_argument("--image-proj", default="linear", choices=["mlp", "linear"], help="image head (mlp suits a frozen trunk)")
    p.add_argument("--unlock-text-layers", type=int, default=0, help="top MiniLM layers to train (0: locked, cached)")
    p.add_argument("--init-trunk", default=None, help="image trunk weights to start from (training.ssl output)")
    p.add_argument("--trunk", default=None, choices=[None, "astra-deflated"], help="a pretrained trunk built in code")
    p.add_argument("--frozen-trunk", action="store_true", help="keep the trunk fixed; train only the image head")
    p.add_argument("--drop-path", type=float, default=0.05)
    # optimisation
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--samples-per-epoch", type=int, default=0, help="0: the number of training rows")
    p.add_argument("--batch-size", type=int, default=128, help="global batch (split over ranks)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    p.add_argument("--init-temperature", type=float, default=0.07)
    p.add_argument("--balance", type=float, default=0.5, help="dataset sampling weight ~ size**balance (1: proportional)")
    p.add_argument("--label-aware", action=argparse.BooleanOptionalAction, default=True,
                   help="pairs with the same labels are positives, not false negatives")
    p.add_argument("--aug-strength", type=float, default=1.0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--grad-clip", type=float, default=1.0)
    # bookkeeping
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=200, help="steps between validation passes (0: only at the end)")
    p.add_argument("--save-every", type=int, default=200, help="steps between resumable checkpoints")
    p.add_argument("--resume", default="auto", help="'auto' (out/last.pt if present), a path, or 'none'")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (tests, smoke runs)")
    p.add_argument("--export", default=None, help="also copy the best model folder here (e.g. assets/models/medlens-clip)")
    p.add_argument("--card-extra", default=None, help="Markdown file appended to the model card")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC memory format (measured 1.5x faster for regnetx_004 on CPU, slower for convnext)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_clip_args(argv=None) -> argparse.Namespace:
    return clip_parser().parse_args(argv)
