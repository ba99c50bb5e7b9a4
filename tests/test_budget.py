"""fer.train.budget: what `epochs` amounts to on a given data set."""

import numpy as np
import pytest

from fer.train.budget import describe_budget, stage_budget
from fer.train.config import TrialConfig


@pytest.mark.parametrize("n, passes", [(377, 8), (3014, 1), (28709, 1), (2999, 2)])
def test_epoch_images_repeats_small_splits(n, passes):
    labels = np.arange(n) % 7
    budget = stage_budget(TrialConfig(epochs=10, epoch_images=3000, batch_size=128), labels)
    assert budget.passes == passes
    assert budget.images_per_epoch == max(n, 3000)
    assert budget.steps == 10 * -(-max(n, 3000) // 128)


def test_a_cap_shrinks_the_pass_and_no_epoch_images_is_one_pass():
    labels = np.repeat([0, 1], [900, 100])
    capped = stage_budget(TrialConfig(class_cap=200, epoch_images=1000), labels)  # 300 images a pass
    assert (capped.passes, capped.images_per_epoch) == (4, 1000)
    assert stage_budget(TrialConfig(epoch_images=0), labels).passes == 1


def test_describe_names_the_repeats_and_the_student():
    from fer.data import Dataset, Split

    labels = np.arange(377) % 7
    images = np.zeros((377, 2, 2, 1), dtype=np.uint8)
    data = Dataset(list("abcdefg"), {"train": Split(images, labels), "unlabeled": Split(images, None)}, "t")
    text = describe_budget(TrialConfig(epochs=10, student_epochs=4, epoch_images=3000, student_mode="offline"), data)
    assert "teacher: 10 epochs x 3000 images, the 377-image split 8.0x = 240 optimizer steps" in text
    assert "student: 4 epochs of at least 3000 images (labelled + kept pseudo-labels" in text
    online = describe_budget(TrialConfig(epochs=10, student_epochs=4, epoch_images=3000), data)  # flexmatch
    assert ("student: 4 epochs of at least 3000 images (the labelled split, repeated up to "
            "epoch_images), each step with 1 pool image(s) per labelled one in two views (flexmatch)") in online
    picks = describe_budget(TrialConfig(epochs=10, student_epochs=4, epoch_images=3000, pool_picks=True), data)
    assert "student: 4 epochs of at least 3000 images (labelled + the teacher's picks, repeated up to " in picks
    assert "control: 4 more epochs of the student's recipe on the labelled split alone" in text
    assert "learning rate" not in online  # stage 2 at lr, as the teacher
    gentle = describe_budget(TrialConfig(epochs=10, student_epochs=4, student_lr_scale=0.3), data)
    assert "in two views (flexmatch), peak learning rate 0.3 x lr" in gentle
    assert "control" not in describe_budget(TrialConfig(epochs=10, student_epochs=4, pool_control=False), data)
    no_pool = Dataset(list("abcdefg"), {"train": Split(images, labels)}, "t")
    assert "student" not in describe_budget(TrialConfig(student_epochs=4), no_pool)


def test_epoch_images_is_validated():
    from fer.train.config import apply_overrides

    with pytest.raises(ValueError, match=r"--set: epoch_images=-5 is outside the allowed range"):
        apply_overrides(TrialConfig(), {"epoch_images": -5}, source="--set")
    with pytest.raises(ValueError, match=r"--set: stem='tiny' is not allowed. Choose one of: standard, small"):
        apply_overrides(TrialConfig(), {"stem": "tiny"}, source="--set")
