"""How many training cases the final validation predicts in-sample: enough to teach existence, few
enough that the pass (without test-time mirrors) costs no more than the validation pass."""
from types import SimpleNamespace

import pytest

from nnlandmark_h3de.training.final_validation import _training_keys_for_existence, in_sample_keys


def fake_trainer(tmp_path, n_train: int, axes, two_stage: bool, cap=None):
    train = [f"case_{i:03d}" for i in range(n_train)]
    if two_stage:
        (tmp_path / "global_stage.json").write_text("{}")
    trainer = SimpleNamespace(output_folder=str(tmp_path), inference_allowed_mirroring_axes=axes,
                              do_split=lambda: (train, ["v0", "v1", "v2"]))
    if cap is not None:
        trainer.existence_training_cases = cap
    return trainer


@pytest.mark.parametrize("axes, two_stage, expected", [
    ((0, 1, 2), False, 24),  # whole image: 3 validation cases x 8 mirrors each
    ((0, 1), False, 12),     # the left/right axis not mirrored: 4 mirrors
    (None, False, 3),        # no mirroring: as many as the validation cases
    ((0, 1, 2), True, 3),    # two stages: each in-sample case is registered, so one per validation case
])
def test_in_sample_count_follows_the_validation_pass(tmp_path, axes, two_stage, expected):
    keys = _training_keys_for_existence(fake_trainer(tmp_path, 40, axes, two_stage), 3)
    assert len(keys) == expected and len(set(keys)) == expected


def test_in_sample_count_is_capped_by_the_trainer_and_the_training_cases(tmp_path):
    assert len(_training_keys_for_existence(fake_trainer(tmp_path, 40, (0, 1, 2), False, cap=5), 3)) == 5
    assert _training_keys_for_existence(fake_trainer(tmp_path, 40, (0, 1, 2), False, cap=0), 3) == []
    assert len(_training_keys_for_existence(fake_trainer(tmp_path, 10, (0, 1, 2), False), 3)) == 10


def test_in_sample_keys_spread_over_the_sorted_cases():
    keys = [f"c{i:02d}" for i in range(20)][::-1]
    assert in_sample_keys(keys, 5) == ["c00", "c05", "c10", "c14", "c19"]
    assert in_sample_keys(keys, 0) == [] and in_sample_keys(keys, 50) == sorted(keys)
