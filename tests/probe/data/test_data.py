import pickle
import struct
import tarfile
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from probe.data import DeviceLoader, load_cifar_pickle, load_dataset, load_digits, load_image_tree
from probe.errors import ProbeError


def _write_cifar10_pickle(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(range(n)),
        }
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [0] * n})
    )
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]})
    )
    return folder


def test_cifar10_pickle_layout(tmp_path):
    _write_cifar10_pickle(tmp_path)
    ds = load_cifar_pickle(tmp_path, "cifar10")
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.classes[3] == "c3" and ds.augment


def test_cifar100_pickle_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((3, 3072), np.uint8)
    for split in ("train", "test"):
        (folder / split).write_bytes(pickle.dumps({b"data": data, b"fine_labels": [1, 2, 3]}))
    (folder / "meta").write_bytes(
        pickle.dumps({b"fine_label_names": [f"k{i}".encode() for i in range(100)]})
    )
    ds = load_cifar_pickle(tmp_path, "cifar100")
    assert ds.num_classes == 100 and list(ds.y_test) == [1, 2, 3]


def test_pickle_reader_refuses_arbitrary_objects(tmp_path):
    folder = _write_cifar10_pickle(tmp_path)
    (folder / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [ProbeError]})
    )
    with pytest.raises(ProbeError, match="Refusing to unpickle"):
        load_cifar_pickle(tmp_path, "cifar10")


def test_missing_pickle_folder_says_what_to_put_where(tmp_path):
    with pytest.raises(ProbeError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path, download=False)


def _write_tree(root, fmt="png"):
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((4, 4, 3), 40 * i + (cls == "dog") * 100, np.uint8)).save(
                    d / f"{i}.{fmt}"
                )


def test_image_tree_folder_and_cache(tmp_path):
    _write_tree(tmp_path / "tree")
    ds = load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert ds.x_train.shape == (6, 3, 4, 4) and ds.classes == ["cat", "dog"]
    assert sorted(ds.y_test.tolist()) == [0, 0, 1, 1]
    assert list((tmp_path / "cache").glob("*.npz"))
    again = load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert np.array_equal(again.x_train, ds.x_train)


def _flip_a_pixel(path):
    """Flip one byte of the cached training images' pixels (not of the .npy header)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("x_train.npy")
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + info.compress_size - 5
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


def _labels_out_of_range(path):
    with np.load(path) as z:
        arrays = dict(z)
    arrays["y_train"] = np.full_like(arrays["y_train"], 7)  # 2 classes
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(
    "damage",
    [
        _flip_a_pixel,
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        lambda p: p.write_bytes(b"not a zip file"),
        _labels_out_of_range,
    ],
    ids=["pixel", "truncated", "garbage", "labels"],
)
def test_a_damaged_cache_is_decoded_again_and_replaced(tmp_path, damage):
    _write_tree(tmp_path / "tree")
    fresh = load_image_tree(tmp_path / "tree")  # no cache at all
    load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("*.npz")
    damage(cache)
    with pytest.warns(UserWarning, match="dataset cache .* is damaged"):
        ds = load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(ds, name), getattr(fresh, name)), name
    with warnings.catch_warnings():  # replaced: read back without a word
        warnings.simplefilter("error")
        again = load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert np.array_equal(again.x_train, fresh.x_train)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.name]  # no temporaries


def test_a_cache_that_cannot_be_written_is_skipped_with_a_warning(tmp_path):
    _write_tree(tmp_path / "tree")
    (tmp_path / "cache").write_text("a file where the cache folder would go")
    with pytest.warns(UserWarning, match="Could not cache the decoded dataset"):
        ds = load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert ds.x_train.shape == (6, 3, 4, 4)


def test_image_tree_order_is_shuffled_and_independent_of_the_source(tmp_path):
    # A class-sorted split would make "the first N test images" a single class.
    for split, n in (("train", 20), ("test", 20)):
        for c, cls in enumerate(("a", "b", "c", "d")):
            (tmp_path / "tree" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((2, 2, 3), 40 * c + i, np.uint8)).save(
                    tmp_path / "tree" / split / cls / f"{i:02d}.png"
                )
    ds = load_image_tree(tmp_path / "tree")
    assert len(set(ds.y_test[:8].tolist())) >= 3
    assert sorted(ds.y_train.tolist()) == sorted([0, 1, 2, 3] * 20)
    # pixels still travel with their labels: image value 40*c + i belongs to class c
    assert np.array_equal(ds.x_train[:, 0, 0, 0] // 40, ds.y_train)
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # members in reverse order
        for f in sorted((tmp_path / "tree").rglob("*.png"), reverse=True):
            tar.add(f, arcname=str(f.relative_to(tmp_path)))
    packed = load_image_tree(archive)
    assert np.array_equal(packed.x_test, ds.x_test) and np.array_equal(packed.y_test, ds.y_test)


def test_image_tree_targz(tmp_path):
    _write_tree(tmp_path / "src" / "cifar-mini", fmt="jpg")
    archive = tmp_path / "mini.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-mini", arcname="cifar-mini")
    ds = load_dataset(str(archive), root=tmp_path)
    assert ds.x_train.shape == (6, 3, 4, 4) and ds.x_test.shape == (4, 3, 4, 4)


def _write_photos(root):
    """A tree of photos of several sizes and modes (RGB, grayscale), pixel values random."""
    rng = np.random.default_rng(1)
    shapes = {"train": [(37, 53, 3), (20, 30, 3), (16, 16)], "test": [(100, 80, 3), (9, 9)]}
    for split, dims in shapes.items():
        for i, d in enumerate(dims):
            (root / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, d, dtype=np.uint8)).save(
                root / split / f"c{i % 2}" / f"{i}.png"
            )


def test_photos_of_several_sizes_need_a_size_and_are_each_resized_to_it(tmp_path):
    _write_photos(tmp_path / "tree")
    with pytest.raises(ProbeError, match=r"different sizes(?s:.*)--input-size C,H,W"):
        load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache")
    ds = load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache", size=(12, 14))
    assert ds.x_train.shape == (3, 3, 12, 14) and ds.x_test.shape == (2, 3, 12, 14)
    # against PIL's bilinear resize (antialiased when shrinking), an independent implementation:
    # equal but for rounding
    for split, x in (("train", ds.x_train), ("test", ds.x_test)):
        want = sorted(
            np.asarray(Image.open(f).convert("RGB").resize((14, 12), Image.BILINEAR)).tolist()
            for f in (tmp_path / "tree" / split).rglob("*.png")
        )
        got = sorted(x.transpose(0, 2, 3, 1).tolist())
        assert np.abs(np.array(got, int) - np.array(want, int)).max() <= 1
    # the cache keeps each size apart, and never answers for the unresized tree
    other = load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache", size=(5, 6))
    assert other.x_train.shape == (3, 3, 5, 6)
    again = load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache", size=(12, 14))
    assert np.array_equal(again.x_train, ds.x_train)
    with pytest.raises(ProbeError, match="different sizes"):
        load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache")


def test_a_tree_of_one_size_is_kept_as_it_is_with_a_size(tmp_path):
    _write_tree(tmp_path / "tree")  # 4 x 4 images: resized per batch by the capture, not here
    plain = load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache")
    sized = load_image_tree(tmp_path / "tree", cache_dir=tmp_path / "cache", size=(8, 8))
    assert np.array_equal(plain.x_train, sized.x_train) and sized.image_shape == (3, 4, 4)


def test_empty_tree_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProbeError, match="train/<class>"):
        load_image_tree(tmp_path / "empty")


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(ProbeError, match="Did you mean 'digits'"):
        load_dataset("digit")


def test_digits_split_is_fixed():
    a, b = load_digits(), load_digits()
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert np.array_equal(a.y_test, b.y_test)


def test_loader_is_deterministic_for_a_seed_and_augments():
    x = np.random.default_rng(0).integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
    y = np.arange(20)

    def run(seed):
        loader = DeviceLoader(
            x, y, 8, mean=[0.5] * 3, std=[0.25] * 3, shuffle=True, augment=True, seed=seed
        )
        return [b[0] for b in loader]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


def test_loader_without_augmentation_normalises_exactly():
    x = np.full((2, 1, 2, 2), 255, np.uint8)
    ((batch, _, idx),) = list(DeviceLoader(x, np.zeros(2), 2, mean=[0.5], std=[0.5]))
    assert torch.allclose(batch, torch.ones_like(batch)) and idx.tolist() == [0, 1]


def test_the_digits_split_is_kept_and_read_back_without_scikit_learn(tmp_path):
    import subprocess
    import sys

    fresh = load_digits()  # no cache: made by scikit-learn
    script = (
        "import sys, numpy as np; from probe.data import load_dataset; "
        f"ds = load_dataset('digits', root={str(tmp_path)!r}); "
        "np.savez(sys.argv[1], x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, "
        "y_test=ds.y_test); print('sklearn' in sys.modules)"
    )
    said = []
    for i in range(2):
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"got{i}.npz")],
            capture_output=True,
            text=True,
            check=True,
        )
        said.append(out.stdout.strip())
        with np.load(tmp_path / f"got{i}.npz") as got:
            for name in ("x_train", "y_train", "x_test", "y_test"):
                assert np.array_equal(got[name], getattr(fresh, name)), name
    assert said == ["True", "False"]  # made once, then read back without importing it
    assert len(list((tmp_path / "cache").glob("digits-*.npz"))) == 1


def test_a_damaged_digits_cache_is_made_again(tmp_path):
    load_dataset("digits", root=tmp_path)
    (cache,) = (tmp_path / "cache").glob("digits-*.npz")
    _flip_a_pixel(cache)
    with pytest.warns(UserWarning, match="dataset cache .* is damaged"):
        ds = load_dataset("digits", root=tmp_path)
    assert np.array_equal(ds.x_train, load_digits().x_train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("digits", root=tmp_path)


@pytest.mark.parametrize("channels", [1, 3])
def test_images_take_one_layout_whatever_array_they_came_from(channels):
    """A one-channel array is contiguous with either stride of its channel axis, and that stride
    alone decided whether the convolutions ran channels-last (numpy's indexing gave one, a file
    read back the other): the numbers of one seed then differed between two runs."""
    rng = np.random.default_rng(0)
    standard = rng.integers(0, 256, (12, channels, 8, 8), dtype=np.uint8)
    other = np.moveaxis(np.ascontiguousarray(np.moveaxis(standard, 1, 3)), 3, 1)  # NHWC memory
    if channels == 1:  # the same bytes: only the channel axis's stride differs
        other = np.lib.stride_tricks.as_strided(standard, strides=(64, 1, 8, 1))
    assert other.strides != standard.strides and np.array_equal(other, standard)
    conv = torch.nn.Conv2d(channels, 4, 3, padding=1)
    outs = []
    for images in (standard, other):
        loader = DeviceLoader(images, np.zeros(12), 5, mean=[0.5] * channels, std=[0.2] * channels)
        batches = [x for x, _, _ in loader]
        want = (64, 1, 8, 1) if channels == 1 else (192, 64, 8, 1)
        assert all(x.stride()[1:] == want[1:] for x in batches)
        outs.append(torch.cat([conv(x) for x in batches]))
    assert torch.equal(*outs)  # bit for bit
