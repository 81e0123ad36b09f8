"""FreshSyntheticDataset: new puzzles every epoch, deterministic in (seed, epoch, index), test puzzles excluded, and
the epoch followed through CurriculumCallback."""

import types

from transformers import TrainerState

from vedas_trainer.synthetic import FreshSyntheticDataset, build_synthetic_dataset, scene_hash
from vedas_trainer.trainer import CurriculumCallback


class FakeCollator:
    max_latent_stage = 4

    def set_stage(self, stage):
        self.stage = stage

    def set_epoch(self, epoch):
        self.epoch = epoch


def test_fresh_puzzles_every_epoch_and_reproducible():
    data = FreshSyntheticDataset(8, seed=0)
    first = [scene_hash(data[i]) for i in range(8)]
    assert len(set(first)) == 8
    assert [scene_hash(data[i]) for i in range(8)] == first  # the same read twice
    data.set_epoch(1)
    second = [scene_hash(data[i]) for i in range(8)]
    assert not set(first) & set(second)
    again = FreshSyntheticDataset(8, seed=0)
    again.set_epoch(1)
    assert [scene_hash(again[i]) for i in range(8)] == second  # another process / a resumed run reads the same
    sample = data[0]
    assert sample["answer"] and sample["steps"] and len(sample["images"]) == 1


def test_fresh_puzzles_avoid_the_excluded_ones():
    plain = FreshSyntheticDataset(4, seed=0)
    exclude = {scene_hash(plain[i]) for i in (0, 2)}
    redrawn = FreshSyntheticDataset(4, seed=0, exclude=exclude)
    hashes = [scene_hash(redrawn[i]) for i in range(4)]
    assert not set(hashes) & exclude  # excluded scenes (e.g. the test split's) are drawn again
    assert hashes[1] == scene_hash(plain[1]) and hashes[3] == scene_hash(plain[3])  # the others are unchanged
    test = build_synthetic_dataset(2, seed=0, split="test")
    assert all(scene_hash(FreshSyntheticDataset(2, exclude={scene_hash(t) for t in test})[i]) not in
               {scene_hash(t) for t in test} for i in range(2))


def test_curriculum_callback_sets_the_dataset_epoch():
    data = FreshSyntheticDataset(4, seed=0)
    loader = types.SimpleNamespace(dataset=data)
    callback = CurriculumCallback(FakeCollator(), epochs_per_stage=1, warmup_epochs=2)
    callback.on_train_begin(None, TrainerState(epoch=3.5), None, train_dataloader=loader)  # a resumed run
    assert data.epoch == 3
    callback.on_epoch_begin(None, TrainerState(epoch=5.0), None, train_dataloader=loader)
    assert data.epoch == 5
