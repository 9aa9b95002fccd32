import numpy as np

from cnnkit.data import ImageStream
from conftest import write_bad_files, write_odd_good_files


def test_stream_decodes_batches_and_drops_unreadable_files_once(tmp_path):
    good = write_odd_good_files(tmp_path / "good")
    bad = write_bad_files(tmp_path / "bad")
    paths = [tmp_path / "good" / n for n in good] + [tmp_path / "bad" / n for n in bad]
    stream = ImageStream(paths, image_size=16)
    seen = []
    for _ in range(2):  # a second pass must not report failures twice
        for images, indices in stream.dataset(batch_size=4):
            assert images.dtype.name == "uint8" and images.shape[1:] == (16, 16, 3)
            seen.extend(indices.numpy().tolist())
    assert sorted(set(seen)) == list(range(len(good)))
    assert sorted(f.path.name for f in stream.failures) == sorted(bad)


def test_labels_follow_their_images(class_tree):
    paths = sorted(class_tree.rglob("*.png"))
    labels = [0 if p.parent.name == "cat" else 1 for p in paths]
    stream = ImageStream(paths, image_size=8)
    got_images, got_labels = [], []
    for images, batch_labels in stream.dataset(batch_size=3, labels=labels):
        got_images.append(images.numpy())
        got_labels.extend(batch_labels.numpy().tolist())
    images = np.concatenate(got_images)
    assert sorted(got_labels) == sorted(labels)
    # cat images are dark (class colour 0), dog images bright (class colour 70).
    means = images.reshape(len(images), -1).mean(axis=1)
    assert all((m < 60) == (label == 0) for m, label in zip(means, got_labels))
