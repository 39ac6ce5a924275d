"""Progressive pruning on tiny random models: which layers stay, FFN narrowing, save/load, the re-aligned schedule.

Fixture: 48 two-word queries over the tiny vocabulary and the teacher's (48-d, seed 1) embeddings of them.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hlm.checkpoint import load_checkpoint
from hlm.config import TrainJob
from hlm.encoder import Encoder
from hlm.pruning import ffn_layout, kept_layers, layer_stack, num_layers, prune_ffn, prune_layers, train_prune
from hlm.tiny import WORDS, tiny_encoder

QUERIES = [f"{a} {b}" for a, b in itertools.permutations(WORDS, 2)][:48]
TEACHER_DIM = 48


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher() -> dict:
    encoder = tiny_encoder("bert", hidden=TEACHER_DIM, seed=1)
    return {"space": encoder.space, "q_emb": encoder.encode(QUERIES)}


def n_params(encoder: Encoder) -> int:
    return sum(p.numel() for p in encoder.parameters())


def layers(encoder: Encoder) -> torch.nn.ModuleList:
    parent, attr = layer_stack(encoder.backbone)
    return getattr(parent, attr)


# ---------------------------------------------------------------------------------------------- layers


def test_kept_layers_are_evenly_spaced_with_first_and_last():
    assert kept_layers(6, 4) == [0, 2, 3, 5]
    assert kept_layers(28, 4) == [0, 9, 18, 27]
    assert kept_layers(4, 1) == [0]
    with pytest.raises(ValueError):
        kept_layers(4, 5)


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_pruned_model_has_fewer_layers_and_saves_loads_and_encodes(family, tmp_path):
    encoder = tiny_encoder(family, layers=4, projection_dim=TEACHER_DIM)
    pruned = prune_layers(encoder, 2)
    assert num_layers(pruned) == 2 and num_layers(encoder) == 4  # the input is left as it was
    assert pruned.backbone.config.num_hidden_layers == 2
    # the last kept layer is the old last layer
    old_last, new_last = (dict(m.named_parameters()) for m in (encoder, pruned))
    name = next(n for n in new_last if ".1." in n)
    torch.testing.assert_close(new_last[name], old_last[name.replace(".1.", ".3.")])
    loaded = Encoder.load(pruned.save(tmp_path / family))
    assert num_layers(loaded) == 2
    np.testing.assert_allclose(loaded.encode(QUERIES[:4]), pruned.encode(QUERIES[:4]), atol=1e-5)


# ---------------------------------------------------------------------------------------------- FFN width


@pytest.mark.parametrize(("family", "weights_per_neuron"), [
    ("bert", 32 + 1 + 32),  # intermediate.dense row + its bias, output.dense column
    ("qwen3", 32 + 32 + 32),  # gate_proj row, up_proj row, down_proj column (no biases)
])
def test_ffn_pruning_keeps_the_output_shape_drops_the_expected_weights_and_round_trips(family, weights_per_neuron,
                                                                                        tmp_path):
    # Given a 2-layer encoder of width 32 with 64 FFN neurons per layer
    encoder = tiny_encoder(family, hidden=32, layers=2)
    before = encoder.encode(QUERIES[:4])
    # When every FFN keeps 40 neurons
    pruned = prune_ffn(encoder, 40)
    # Then the embeddings keep their shape, each layer lost 24 neurons' weights, and the input is unchanged
    assert pruned.encode(QUERIES[:4]).shape == before.shape == (4, 32)
    assert n_params(encoder) - n_params(pruned) == 2 * 24 * weights_per_neuron
    assert pruned.backbone.config.intermediate_size == 40 and encoder.backbone.config.intermediate_size == 64
    np.testing.assert_array_equal(encoder.encode(QUERIES[:4]), before)
    # and it saves and loads as a plain HF model of the new width
    loaded = Encoder.load(pruned.save(tmp_path / family))
    assert loaded.backbone.config.intermediate_size == 40 and n_params(loaded) == n_params(pruned)
    np.testing.assert_allclose(loaded.encode(QUERIES[:4]), pruned.encode(QUERIES[:4]), atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "qwen3"])
def test_ffn_pruning_to_the_full_width_changes_no_output(family):
    encoder = tiny_encoder(family, hidden=32, layers=2)
    np.testing.assert_array_equal(prune_ffn(encoder, 64).encode(QUERIES), encoder.encode(QUERIES))


def test_ffn_pruning_drops_the_neurons_with_the_smallest_weights():
    # Given neuron 5 of every layer with a zero input row: it contributes nothing
    encoder = tiny_encoder("bert", hidden=32, layers=2)
    for layer in layers(encoder):
        inputs, _ = ffn_layout(layer)
        with torch.no_grad():
            layer.get_submodule(inputs[0]).weight[5] = 0
    # When one neuron per layer goes
    pruned = prune_ffn(encoder, 63)
    # Then it is neuron 5, and the others keep their weights in order
    for old, new in zip(layers(encoder), layers(pruned), strict=True):
        keep = [i for i in range(64) if i != 5]
        torch.testing.assert_close(new.output.dense.weight, old.output.dense.weight[:, keep])
        torch.testing.assert_close(new.intermediate.dense.bias, old.intermediate.dense.bias[keep])


# ---------------------------------------------------------------------------------------------- the schedule


def test_train_prune_writes_one_checkpoint_per_schedule_step(teacher, tmp_path):
    # Given a 4-layer student with 64 FFN neurons and a schedule that also halves the FFNs at every step
    student = tiny_encoder("bert", hidden=32, layers=4, seed=0)
    job = TrainJob(lr=3e-3, batch_size=16, prune_schedule=[3, 2], steps_per_prune=3, prune_ffn_ratio=0.5)
    steps, stages = [], []
    # When it runs
    folders = train_prune(student, QUERIES, teacher["q_emb"], job, tmp_path, teacher_space=teacher["space"],
                          on_step=lambda s, m, _: steps.append((s, m["n_layers"])),
                          on_stage=lambda n, folder: stages.append((n, folder.name)))
    # Then each step re-aligns and leaves a checkpoint of its size, announced as soon as it is written
    assert [f.name for f in folders] == ["layers-3", "layers-2"]
    assert stages == [(3, "layers-3"), (2, "layers-2")]
    assert steps == [(1, 3), (2, 3), (3, 3), (4, 2), (5, 2), (6, 2)]
    for folder, n, width in zip(folders, (3, 2), (32, 16), strict=True):
        encoder, _, step = load_checkpoint(folder)
        assert num_layers(encoder) == n and step == 3 and encoder.space == teacher["space"]
        assert encoder.backbone.config.intermediate_size == width
