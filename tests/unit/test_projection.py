"""The projection head's least-squares start: the ridge solve, fitting a student's head, and what align gains."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hlm.config import TrainJob
from hlm.projection import fit_head, least_squares_head
from hlm.tiny import WORDS, tiny_encoder
from hlm.train import prepare_student, train_align

QUERIES = [f"{a} {b}" for a, b in itertools.permutations(WORDS, 2)][:48]
STUDENT_DIM, TEACHER_DIM = 32, 48

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mean_l2(emb: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(np.sum((emb - target) ** 2, axis=1)))


def test_least_squares_head_recovers_an_exact_linear_map_and_names_bad_shapes():
    rng = np.random.default_rng(0)
    features, w_true = rng.standard_normal((200, 8)), rng.standard_normal((5, 8))  # (n, h), (D, h)
    np.testing.assert_allclose(least_squares_head(features, features @ w_true.T, ridge=1e-9), w_true, atol=1e-6)
    with pytest.raises(ValueError, match="same n"):
        least_squares_head(features, np.zeros((199, 5)))


def test_a_fitted_head_starts_far_closer_to_the_teacher_than_an_orthogonal_one():
    target = tiny_encoder("bert", hidden=TEACHER_DIM, seed=1).encode(QUERIES)  # (n, D) unit rows
    orthogonal = prepare_student(tiny_encoder("bert", hidden=STUDENT_DIM, seed=0), TEACHER_DIM, "projection")
    fitted = prepare_student(tiny_encoder("bert", hidden=STUDENT_DIM, seed=0), TEACHER_DIM, "projection",
                             fit=(QUERIES, target))
    # the backbones are the same: only the head differs, and it is the best linear map the solve could find
    assert mean_l2(fitted.encode(QUERIES), target) < 0.5 * mean_l2(orthogonal.encode(QUERIES), target)


def test_fitting_needs_a_head():
    with pytest.raises(ValueError, match="no projection head"):
        fit_head(tiny_encoder("bert", hidden=STUDENT_DIM), QUERIES, np.zeros((len(QUERIES), TEACHER_DIM)))


def test_align_starts_from_the_least_squares_head_unless_told_otherwise():
    target = tiny_encoder("bert", hidden=TEACHER_DIM, seed=1).encode(QUERIES)
    first_loss = {init: train_align(tiny_encoder("bert", hidden=STUDENT_DIM, seed=0), QUERIES, target,
                                    TrainJob(lr=1e-6, batch_size=48, max_steps=1, projection_init=init)).losses[0]
                  for init in ("least_squares", "orthogonal")}
    assert first_loss["least_squares"] < 0.5 * first_loss["orthogonal"]
