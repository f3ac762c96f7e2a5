"""Data layer: canonical file readers, image tensors, subsets and k-means pseudo-labels."""
import gzip
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

import common
import plumbing
from conftest import one_line

FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No test touches the network or the user's cache."""
    def no_network(url, path, timeout=None):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(plumbing, "_urlretrieve", no_network)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write_idx(path, array):
    raw = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def make_idx_files(folder, gz=True, seed=0):
    """Canonical MNIST-style files in folder; returns {split: (images (N, 28, 28), labels)}."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix, n in (("train", "train", 7), ("val", "t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), images)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
        out[split] = images, labels
    return out


def write_tar(path, members):
    """A .tar.gz holding {member name: bytes}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def cifar_batch(rng, n, label_keys):
    batch = {b"batch_label": b"synthetic", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [b"img%d.png" % i for i in range(n)]}
    for key, num in label_keys.items():
        batch[key] = [int(v) for v in rng.integers(0, num, n)]
    return batch


def cifar10_batches(seed=0):
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: cifar_batch(rng, 3, {b"labels": 10}) for name in names}


def cifar100_batches(seed=0):
    rng = np.random.default_rng(seed)
    return {name: cifar_batch(rng, n, {b"fine_labels": 100, b"coarse_labels": 20})
            for name, n in (("train", 6), ("test", 4))}


def write_cifar(folder, archive, member_dir, batches):
    """The canonical CIFAR python archive: <member_dir>/<batch> pickles inside a .tar.gz."""
    os.makedirs(folder, exist_ok=True)
    members = {f"{member_dir}/{k}": pickle.dumps(v, protocol=2) for k, v in batches.items()}
    write_tar(os.path.join(folder, archive), members | {f"{member_dir}/readme.html": b"<html></html>"})


def hwc(data):
    """CIFAR rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32."""
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


# --- readers -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
@pytest.mark.parametrize("gz,subfolder", [(True, True), (False, False)])
def test_idx_reader_returns_exact_pixels_and_labels_from_data_dir(tmp_path, name, gz, subfolder):
    root = tmp_path / "data"
    expected = make_idx_files(str(root / name if subfolder else root), gz=gz)
    for split in ("train", "val"):
        images, labels = plumbing.load_images(name, split, root=root)
        assert images.dtype == np.uint8 and images.shape == (len(expected[split][0]), 28, 28, 1)
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images[..., 0], expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])


def test_cifar10_reader_returns_exact_pixels_in_hwc_order_and_labels(tmp_path):
    batches = cifar10_batches()
    batches["data_batch_2"][b"data"][0, :] = 0
    batches["data_batch_2"][b"data"][0, 2 * 1024 + 5 * 32 + 7] = 200  # blue, row 5, column 7
    write_cifar(str(tmp_path), "cifar-10-python.tar.gz", "cifar-10-batches-py", batches)
    images, labels = plumbing.load_images("cifar10", "train", root=tmp_path)
    assert images.shape == (15, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    train = [f"data_batch_{i}" for i in range(1, 6)]
    np.testing.assert_array_equal(images, np.concatenate([hwc(batches[b][b"data"]) for b in train]))
    np.testing.assert_array_equal(labels, np.concatenate([batches[b][b"labels"] for b in train]))
    assert images[3, 5, 7, 2] == 200 and images[3].sum() == 200
    val_images, val_labels = plumbing.load_images("cifar10", "val", root=tmp_path)
    np.testing.assert_array_equal(val_images, hwc(batches["test_batch"][b"data"]))
    np.testing.assert_array_equal(val_labels, batches["test_batch"][b"labels"])


def test_cifar100_gives_fine_labels_and_cifar100_coarse_the_20_coarse_labels(tmp_path):
    batches = cifar100_batches()
    write_cifar(str(tmp_path / "cifar100"), "cifar-100-python.tar.gz", "cifar-100-python", batches)
    for split, member in (("train", "train"), ("val", "test")):
        fine_images, fine = plumbing.load_images("cifar100", split, root=tmp_path)
        coarse_images, coarse = plumbing.load_images("cifar100-coarse", split, root=tmp_path)
        np.testing.assert_array_equal(fine_images, hwc(batches[member][b"data"]))
        np.testing.assert_array_equal(coarse_images, fine_images)
        np.testing.assert_array_equal(fine, batches[member][b"fine_labels"])
        np.testing.assert_array_equal(coarse, batches[member][b"coarse_labels"])
    assert plumbing.DATASETS["cifar100-coarse"]["num_classes"] == 20


def test_cifar_reader_accepts_the_extracted_folder(tmp_path):
    batches = cifar10_batches()
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    images, labels = plumbing.load_images("cifar10", "val", root=tmp_path / "data")
    np.testing.assert_array_equal(images, hwc(batches["test_batch"][b"data"]))
    np.testing.assert_array_equal(labels, batches["test_batch"][b"labels"])


@pytest.mark.skipif(not os.path.isdir(FASHION_SYSTEM_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_has_60000_train_and_10000_val_balanced_images():
    for split, n in (("train", 60000), ("val", 10000)):
        images, labels = plumbing.load_images("fashion-mnist", split)
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(labels), np.full(10, n // 10))


def test_second_load_comes_from_memory_and_is_read_only(tmp_path):
    make_idx_files(str(tmp_path / "mnist"))
    first = plumbing.load_images("mnist", "train", root=tmp_path)
    second = plumbing.load_images("mnist", "train", root=tmp_path)
    assert first[0] is second[0] and first[1] is second[1]
    with pytest.raises(ValueError):
        first[0][0, 0, 0, 0] = 1


# --- missing, corrupt and foreign files ----------------------------------------------------

def test_missing_data_without_network_says_which_files_where_and_which_package(tmp_path, monkeypatch):
    monkeypatch.setitem(plumbing.DATASETS["fashion-mnist"], "system_dirs", (str(tmp_path / "nowhere"),))
    with pytest.raises(common.UserError) as err:
        plumbing.load_images("fashion-mnist", "train")
    message = str(err.value)
    for needle in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "--data-dir",
                   "apt install dataset-fashion-mnist", str(tmp_path / "cache" / "edm-memorization"),
                   "network disabled in tests", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"):
        assert needle in message
    with pytest.raises(common.UserError, match=r"cifar-10-python\.tar\.gz.*https://www\.cs\.toronto\.edu"):
        plumbing.load_images("cifar10", "val")


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_data_dir_without_the_files_is_an_error_naming_what_was_looked_for(tmp_path, monkeypatch, folder):
    system = tmp_path / "system"
    make_idx_files(str(system))
    monkeypatch.setitem(plumbing.DATASETS["fashion-mnist"], "system_dirs", (str(system),))
    root = tmp_path / folder
    if folder == "empty":
        root.mkdir()
    with pytest.raises(common.UserError) as err:
        plumbing.load_images("fashion-mnist", "train", root=root)
    message = str(err.value)
    assert message.startswith(f"--data-dir {root} has no fashion-mnist train split"), message
    assert "train-images-idx3-ubyte.gz" in message and str(root / "fashion-mnist") in message
    assert plumbing.load_images("fashion-mnist", "train")[0].shape == (7, 28, 28, 1)  # without --data-dir: found


def test_loading_prints_the_files_read_once_per_folder(tmp_path, capsys):
    make_idx_files(str(tmp_path / "mnist"))
    plumbing.load_images("mnist", "train", root=tmp_path)
    plumbing.load_images("mnist", "val", root=tmp_path)
    one_line(capsys.readouterr().out, f"reading mnist from {tmp_path / 'mnist'}", "train-images-idx3-ubyte.gz",
             "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def serve(monkeypatch, blobs):
    """Make downloads return blobs[url]."""
    def fake(url, path, timeout=None):
        with open(path, "wb") as f:
            f.write(blobs[url])
    monkeypatch.setattr(plumbing, "_urlretrieve", fake)


def test_download_with_wrong_checksum_is_rejected_and_leaves_nothing(tmp_path, monkeypatch):
    info = plumbing.DATASETS["cifar10"]
    serve(monkeypatch, {info["urls"]["cifar-10-python.tar.gz"]: b"not the archive"})
    with pytest.raises(common.UserError, match="checksum mismatch"):
        plumbing.load_images("cifar10", "train")
    cache = tmp_path / "cache" / "edm-memorization" / "cifar10"
    assert list(cache.iterdir()) == []


def test_download_with_right_checksum_lands_in_cache_and_loads(tmp_path, monkeypatch):
    expected = make_idx_files(str(tmp_path / "upstream"))
    info = plumbing.DATASETS["mnist"]
    blobs = {info["urls"][f]: (tmp_path / "upstream" / f).read_bytes() for f in info["files"]}
    md5 = {f: hashlib.md5(blobs[info["urls"][f]]).hexdigest() for f in info["files"]}
    monkeypatch.setitem(info, "md5", md5)
    serve(monkeypatch, blobs)
    images, labels = plumbing.load_images("mnist", "val")
    np.testing.assert_array_equal(images[..., 0], expected["val"][0])
    np.testing.assert_array_equal(labels, expected["val"][1])
    cache = tmp_path / "cache" / "edm-memorization" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_truncated_or_foreign_idx_files_give_user_error(tmp_path):
    make_idx_files(str(tmp_path / "mnist"))
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    with pytest.raises(common.UserError, match="truncated"):
        plumbing.load_images("mnist", "val", root=tmp_path)
    path.write_bytes(gzip.compress(b"PK\x03\x04 something else entirely"))
    with pytest.raises(common.UserError, match="not an IDX file"):
        plumbing.load_images("mnist", "val", root=tmp_path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(common.UserError, match="cannot read"):
        plumbing.load_images("mnist", "val", root=tmp_path)


def test_data_file_without_read_permission_is_not_called_corrupt(tmp_path, monkeypatch):
    make_idx_files(str(tmp_path / "mnist"))

    def denied(path, mode="rb"):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(plumbing.gzip, "open", denied)
    with pytest.raises(common.UserError) as err:
        plumbing.load_images("mnist", "val", root=tmp_path)
    assert str(err.value).endswith("t10k-images-idx3-ubyte.gz: Permission denied"), err.value


class Payload:
    def __reduce__(self):
        return (os.mkdir, ("should-never-be-created",))


def test_cifar_batch_with_code_in_its_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tar(str(tmp_path / "cifar-10-python.tar.gz"),
              {"cifar-10-batches-py/test_batch": pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2)})
    with pytest.raises(common.UserError, match="not a CIFAR python batch"):
        plumbing.load_images("cifar10", "val", root=tmp_path)
    assert not (tmp_path / "should-never-be-created").exists()


def test_unknown_dataset_or_split_gives_user_error_listing_choices():
    with pytest.raises(common.UserError, match="fashion-mnist, mnist, cifar10, cifar100, cifar100-coarse"):
        plumbing.load_images("imagenet", "train")
    with pytest.raises(common.UserError, match="train or val"):
        plumbing.load_images("mnist", "test")


# --- image tensors -------------------------------------------------------------------------

def test_images_to_tensor_maps_to_minus_one_one_and_pads_28_with_background():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    images[0, 0, 0, 0], images[0, 1, 1, 0] = 0, 255
    x = plumbing.images_to_tensor(images)
    assert x.dtype == torch.float32 and x.shape == (5, 1, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert x[0, 0, 2, 2] == -1 and x[0, 0, 3, 3] == 1
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, :, border] == -1).all()
    np.testing.assert_allclose(x[:, 0, 2:30, 2:30].numpy(), images[..., 0] / 127.5 - 1, atol=1e-6)
    assert plumbing.images_to_tensor(images, 16).shape == (5, 1, 16, 16)
    rgb = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(plumbing.images_to_tensor(rgb).numpy(), rgb.transpose(0, 3, 1, 2) / 127.5 - 1,
                               atol=1e-6)


def test_area_averaging_on_known_patterns():
    checker = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)[None, :, :, None]
    assert torch.allclose(plumbing.images_to_tensor(checker, 16), torch.zeros(1, 1, 16, 16), atol=1e-6)
    white = np.full((1, 28, 28, 1), 255, np.uint8)  # padded 2 pixels of -1 around +1
    x16 = plumbing.images_to_tensor(white, 16)[0, 0]
    assert (x16[1:15, 1:15] == 1).all() and (x16[0] == -1).all() and (x16[:, 15] == -1).all()
    x8 = plumbing.images_to_tensor(white, 8)[0, 0]  # 4x4 blocks: corner 4/16 image, edge 8/16, inside 16/16
    assert x8[0, 0] == -0.5 and x8[7, 7] == -0.5 and x8[0, 3] == 0 and x8[4, 7] == 0
    assert (x8[1:7, 1:7] == 1).all()


def test_images_to_tensor_rejects_resolutions_that_do_not_divide_32_and_non_uint8():
    images = np.zeros((1, 28, 28, 1), np.uint8)
    for bad in (12, 0, 64):
        with pytest.raises(common.UserError, match="resolution"):
            plumbing.images_to_tensor(images, bad)
    with pytest.raises(common.UserError, match="uint8"):
        plumbing.images_to_tensor(images.astype(np.float32))


# --- subsets -------------------------------------------------------------------------------

def test_choose_subset_is_seeded_distinct_sorted_and_nested():
    a, b = plumbing.choose_subset(1000, 50, seed=3), plumbing.choose_subset(1000, 50, seed=3)
    assert a.dtype == np.int64 and a.shape == (50,)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 50 and (np.diff(a) > 0).all() and a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, plumbing.choose_subset(1000, 50, seed=4))
    assert set(a) <= set(plumbing.choose_subset(1000, 200, seed=3))
    np.testing.assert_array_equal(plumbing.choose_subset(7, 7, seed=0), np.arange(7))


def test_choose_subset_rejects_n_larger_than_the_split_or_below_one():
    with pytest.raises(common.UserError, match=r"n = 1001 .* 1000 images"):
        plumbing.choose_subset(1000, 1001, seed=0)
    with pytest.raises(common.UserError, match="positive"):
        plumbing.choose_subset(1000, 0, seed=0)


# --- k-means pseudo-labels -----------------------------------------------------------------

def blobs(n_per, seed):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0] * 6, [10.0] * 6, [0.0, 10.0] * 3, [-10.0] * 6])
    truth = torch.arange(4).repeat_interleave(n_per)
    x = centres[truth] + 0.5 * torch.randn(len(truth), 6, generator=gen)
    perm = torch.randperm(len(truth), generator=gen)
    return x[perm], truth[perm].numpy(), centres


def test_kmeans_separates_well_separated_blobs_deterministically():
    x, truth, centres = blobs(50, seed=0)
    labels, centroids = common.kmeans_labels(x, 4, seed=1)
    again, _ = common.kmeans_labels(x, 4, seed=1)
    np.testing.assert_array_equal(labels, again)
    assert labels.dtype == np.int64 and labels.shape == (200,)
    assert centroids.dtype == torch.float32 and centroids.shape == (4, 6)
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 4 and len({t for t, _ in pairs}) == 4 and len({c for _, c in pairs}) == 4
    for t, c in pairs:
        assert torch.allclose(centroids[c], centres[t], atol=0.3)


def test_assign_clusters_agrees_with_kmeans_on_training_points_and_labels_new_points_by_blob():
    x, truth, _ = blobs(50, seed=0)
    labels, centroids = common.kmeans_labels(x.view(200, 2, 3), 4, seed=0)
    np.testing.assert_array_equal(common.assign_clusters(x, centroids), labels)
    new, new_truth, _ = blobs(10, seed=5)
    mapping = dict(zip(truth.tolist(), labels.tolist()))
    np.testing.assert_array_equal(common.assign_clusters(new, centroids), [mapping[t] for t in new_truth])


def test_kmeans_seeding_finds_small_clusters_beside_a_large_one():
    gen = torch.Generator().manual_seed(0)
    _, _, centres = blobs(1, seed=0)
    truth = torch.tensor([0] * 400 + [1] * 5 + [2] * 5 + [3] * 5)
    x = centres[truth] + 0.5 * torch.randn(len(truth), 6, generator=gen)
    for seed in range(5):
        labels, _ = common.kmeans_labels(x, 4, seed=seed)
        assert len(set(zip(truth.tolist(), labels.tolist()))) == 4 and len(set(labels.tolist())) == 4


def test_kmeans_with_more_clusters_than_distinct_points_stays_finite():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]).repeat(4, 1)
    labels, centroids = common.kmeans_labels(x, 5, seed=0)
    assert torch.isfinite(centroids).all() and labels.min() >= 0 and labels.max() < 5
    assert len(set(zip(map(tuple, x.tolist()), labels.tolist()))) == 3  # equal points, equal label
    with pytest.raises(common.UserError, match="k must be"):
        common.kmeans_labels(x, 13)


def test_kmeans_in_classifier_features_finds_the_classes_where_pixel_kmeans_finds_the_background(tmp_path,
                                                                                                   monkeypatch):
    # known structure: the class puts a bright bar at its own place; a nuisance, the background's brightness (one
    # of three levels), moves far more pixels, so that pixel k-means clusters by background, not by class
    rng = np.random.default_rng(0)
    for split, count in (("train", 600), ("t10k", 120)):
        labels, background = np.arange(count) % 3, rng.integers(0, 3, count)
        images = (background[:, None, None] * 70 + rng.integers(0, 20, (count, 28, 28))).astype(np.int64)
        for c in range(3):
            images[labels == c, 4 + 7 * c:9 + 7 * c, 6:22] = 255
        write_idx(str(tmp_path / f"{split}-images-idx3-ubyte.gz"), images)
        write_idx(str(tmp_path / f"{split}-labels-idx1-ubyte.gz"), labels)
    classes = plumbing.load_images("fashion-mnist", "train", str(tmp_path))[1]
    train = plumbing.train_classifier  # as many steps on these 600 images as on a large split
    monkeypatch.setattr(plumbing, "train_classifier", lambda *args, **kw: train(*args, **kw, epochs=20))

    def purity(cluster_space):  # share of the subset in its cluster's most common class
        source = plumbing.TrainingSource.drawn("fashion-mnist", 300, 0, "kmeans", 3, 16, str(tmp_path), cluster_space)
        counts = np.zeros((3, 3))
        np.add.at(counts, (source.labels, classes[source.subset]), 1)
        return counts.max(1).sum() / len(source.subset), source
    pixels, _ = purity("pixels")
    features, source = purity("classifier")
    assert features > 0.95 and pixels < 0.6, (features, pixels)
    assert source.centroids.shape == (3, 128) and source.cluster_space == "classifier"
    # validation images get the cluster of the nearest centroid in the same feature space: their class's cluster
    val_images, val_classes = plumbing.load_images("fashion-mnist", "val", str(tmp_path))
    val_labels = source.validation_labels(val_classes, plumbing.images_to_tensor(val_images, 16))
    counts = np.zeros((3, 3))
    np.add.at(counts, (val_labels, val_classes), 1)
    assert counts.max(1).sum() / len(val_classes) > 0.95
    assert "kmeans3-classifier" in plumbing.subset_name("fashion-mnist", 300, 0, "kmeans", 3, 16, "classifier")
