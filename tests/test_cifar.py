"""The CIFAR binary reader, against tiny fake distributions written here in the real layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from unroll.errors import UnrollError
from unroll.train.cifar import CIFAR_KINDS, CifarBinary

FOLDERS = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary"}
CLASS_COUNT = {"cifar10": 10, "cifar100": 100}
TRAIN_FILES = {"cifar10": [f"data_batch_{i}.bin" for i in range(1, 6)], "cifar100": ["train.bin"]}
TEST_FILES = {"cifar10": ["test_batch.bin"], "cifar100": ["test.bin"]}
NAMES_FILE = {"cifar10": "batches.meta.txt", "cifar100": "fine_label_names.txt"}
RECORD = {"cifar10": 3073, "cifar100": 3074}


def write_cifar(root: Path, kind: str, images: np.ndarray, labels: np.ndarray, train_count: int,
                classes: list[str] | None) -> Path:
    """Write ``images`` (N, 3, 32, 32) uint8 and ``labels`` (N,) as the binary distribution of
    ``kind`` under ``root``: the first ``train_count`` records are the training split (over five
    files for CIFAR-10, so at least five: the reader refuses an empty file), the rest the test split.
    ``classes`` None writes no names file. Returns the extracted folder."""
    assert train_count >= len(TRAIN_FILES[kind]) and len(labels) > train_count, "every file needs a record"
    folder = root / FOLDERS[kind]
    folder.mkdir(parents=True)
    images, labels = np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.uint8)

    def records(index: np.ndarray) -> bytes:
        out = bytearray()
        for i in index:
            if kind == "cifar100":
                out.append((int(labels[i]) * 7 + 3) % 20)  # a coarse label the reader must skip
            out.append(int(labels[i]))
            out += images[i].tobytes(order="C")  # C order of (3, 32, 32): R plane, G, B, rows within each
        return bytes(out)

    train = np.arange(train_count)
    for name, part in zip(TRAIN_FILES[kind], np.array_split(train, len(TRAIN_FILES[kind]))):
        (folder / name).write_bytes(records(part))
    (folder / TEST_FILES[kind][0]).write_bytes(records(np.arange(train_count, len(labels))))
    if classes is not None:
        (folder / NAMES_FILE[kind]).write_text("\n".join(classes) + "\n\n")  # trailing blank line, as distributed
    return folder


def fake(n: int, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, CLASS_COUNT[kind], size=n).astype(np.uint8)
    return images, labels


def names(kind: str) -> list[str]:
    return [f"{kind}-class-{i}" for i in range(CLASS_COUNT[kind])]


@pytest.fixture(params=CIFAR_KINDS)
def kind(request) -> str:
    return request.param


def test_the_kinds_are_exported():
    assert CIFAR_KINDS == ("cifar10", "cifar100")


def test_records_read_back_exactly_in_plane_and_row_order(tmp_path, kind):
    images = np.zeros((13, 3, 32, 32), dtype=np.uint8)
    images[4, 1, 2, 5] = 200  # green plane, row 2, column 5
    images[4, 0, 5, 2] = 17  # the transposed spot in red: a column-major reader swaps the two
    images[4, 2, 31, 0] = 99  # blue, last row
    images[:, 0, 0, 0] = np.arange(13)  # each record's first red pixel is its index
    labels = np.array([i % CLASS_COUNT[kind] for i in range(13)], dtype=np.uint8)
    labels[4] = CLASS_COUNT[kind] - 1
    write_cifar(tmp_path, kind, images, labels, train_count=10, classes=names(kind))
    train = CifarBinary(tmp_path, kind, train=True)
    image, label = train[4]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert isinstance(label, int) and label == CLASS_COUNT[kind] - 1
    assert image[1, 2, 5] == 200 and image[0, 5, 2] == 17 and image[2, 31, 0] == 99
    assert int(image.sum()) == 200 + 17 + 99 + 4
    for i in range(10):
        got, lab = train[i]
        assert np.array_equal(got.numpy(), images[i]) and lab == labels[i]
    test = CifarBinary(tmp_path, kind, train=False)
    for i in range(3):
        got, lab = test[i]
        assert np.array_equal(got.numpy(), images[10 + i]) and lab == labels[10 + i]
    assert train.targets == labels[:10].tolist() and test.targets == labels[10:].tolist()


def test_random_records_round_trip_across_the_five_training_files(tmp_path, kind):
    images, labels = fake(37, kind)
    write_cifar(tmp_path, kind, images, labels, train_count=29, classes=names(kind))
    train = CifarBinary(tmp_path, kind, train=True)
    assert len(train) == 29 and len(CifarBinary(tmp_path, kind, train=False)) == 8
    got = np.stack([train[i][0].numpy() for i in range(len(train))])
    assert np.array_equal(got, images[:29])
    assert [train[i][1] for i in range(len(train))] == labels[:29].tolist()
    assert np.array_equal(train[-1][0].numpy(), images[28])
    with pytest.raises(IndexError):
        train[29]


def test_both_root_forms_and_a_str_root(tmp_path, kind):
    images, labels = fake(12, kind)
    folder = write_cifar(tmp_path, kind, images, labels, train_count=7, classes=names(kind))
    for root in (tmp_path, folder, str(folder), str(tmp_path)):
        test = CifarBinary(root, kind, train=False)
        assert len(test) == 5 and np.array_equal(test[2][0].numpy(), images[9])


def test_classes_come_from_the_names_file_or_are_numbered(tmp_path, kind):
    images, labels = fake(6, kind)
    write_cifar(tmp_path / "named", kind, images, labels, train_count=5, classes=names(kind))
    write_cifar(tmp_path / "unnamed", kind, images, labels, train_count=5, classes=None)
    assert CifarBinary(tmp_path / "named", kind, train=True).classes == names(kind)
    assert CifarBinary(tmp_path / "unnamed", kind, train=False).classes == [str(i) for i in range(CLASS_COUNT[kind])]


def test_cifar100_uses_the_fine_label_not_the_coarse_one(tmp_path):
    images, _ = fake(5, "cifar100")
    labels = np.array([99, 50, 21, 0, 1], dtype=np.uint8)  # coarse labels written are (7l+3)%20: all differ
    write_cifar(tmp_path, "cifar100", images, labels, train_count=4, classes=None)
    train = CifarBinary(tmp_path, "cifar100", train=True)
    assert train.targets == [99, 50, 21, 0] and [train[i][1] for i in range(4)] == [99, 50, 21, 0]


def test_pixels_are_read_when_asked_for_not_at_construction(tmp_path, kind):
    images, labels = fake(10, kind)
    folder = write_cifar(tmp_path, kind, images, labels, train_count=6, classes=None)
    test = CifarBinary(tmp_path, kind, train=False)  # records 6..9, all in one file
    test[0]
    # change record 2's pixels on disk after construction: a reader that decoded them up front
    # returns the old ones
    new = np.full((3, 32, 32), 7, dtype=np.uint8)
    new[1, 2, 5] = 250
    with open(folder / TEST_FILES[kind][0], "r+b") as f:
        f.seek(2 * RECORD[kind] + RECORD[kind] - 3072)
        f.write(new.tobytes())
    assert np.array_equal(test[2][0].numpy(), new)
    assert np.array_equal(test[1][0].numpy(), images[7])


def test_construction_touches_no_pixel_bytes(tmp_path, kind, monkeypatch):
    images, labels = fake(20, kind)
    write_cifar(tmp_path, kind, images, labels, train_count=15, classes=None)
    # every read of the files at construction goes through what is counted here: bytes copied
    # out of a file or a map, except the label column
    copied = []
    real_fromfile, real_array = np.fromfile, np.array

    def fromfile(*args, **kwargs):
        copied.append("fromfile")
        return real_fromfile(*args, **kwargs)

    def array(obj, *args, **kwargs):
        if isinstance(obj, np.memmap) and obj.size >= 3072:
            copied.append(obj.shape)
        return real_array(obj, *args, **kwargs)

    monkeypatch.setattr(np, "fromfile", fromfile)
    monkeypatch.setattr(np, "array", array)
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: copied.append(self.name) or real_read_bytes(self))
    ds = CifarBinary(tmp_path, kind, train=True)
    assert copied == []
    ds[3]
    assert len(copied) == 1  # the counting does see an item's pixels being read


def test_pickling_carries_no_pixels(tmp_path, kind):
    images, labels = fake(60, kind)
    write_cifar(tmp_path, kind, images, labels, train_count=50, classes=names(kind))
    ds = CifarBinary(tmp_path, kind, train=True)
    ds[0]  # the maps are open now
    assert len(pickle.dumps(ds)) < 3072 * 2 + 100 * 40  # 50 images would be 153,600 bytes
    clone = pickle.loads(pickle.dumps(ds))  # our own object, not CIFAR data
    assert np.array_equal(clone[49][0].numpy(), images[49]) and clone.classes == names(kind)


def _through_loader(tmp_path: Path, kind: str, **loader) -> None:
    images, labels = fake(23, kind)
    write_cifar(tmp_path, kind, images, labels, train_count=18, classes=None)
    ds = CifarBinary(tmp_path, kind, train=True)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, **loader))
    assert [len(b[1]) for b in batches] == [4, 4, 4, 4, 2]
    assert batches[0][0].shape == (4, 3, 32, 32) and batches[0][0].dtype == torch.uint8
    assert np.array_equal(torch.cat([b[0] for b in batches]).numpy(), images[:18])
    assert torch.cat([b[1] for b in batches]).tolist() == labels[:18].tolist()


def test_a_dataloader_with_forked_workers(tmp_path, kind):
    _through_loader(tmp_path, kind, multiprocessing_context="fork")


@pytest.mark.slow
def test_a_dataloader_with_spawned_workers(tmp_path):
    _through_loader(tmp_path, "cifar10", multiprocessing_context="spawn")


def test_transforms_v2_accept_the_images(tmp_path):
    images, labels = fake(6, "cifar10")
    write_cifar(tmp_path, "cifar10", images, labels, train_count=5, classes=None)
    image, _ = CifarBinary(tmp_path, "cifar10", train=True)[0]
    out = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.ToDtype(torch.float32, scale=True)])(image)
    assert isinstance(out, tv_tensors.Image)
    assert torch.allclose(out, torch.from_numpy(images[0][:, :, ::-1].copy()).float() / 255)


# errors


def _error(root, kind: str, train: bool = True) -> UnrollError:
    with pytest.raises(UnrollError) as e:
        CifarBinary(root, kind, train=train)
    return e.value


def test_a_missing_root(tmp_path):
    e = _error(tmp_path / "nowhere", "cifar10")
    assert e.where == str(tmp_path / "nowhere") and "cifar-10-batches-bin" in e.message


def test_a_root_that_is_a_file(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(b"\0" * 3073)
    e = _error(tmp_path / "data_batch_1.bin", "cifar10")
    assert "found a file" in e.message and "data_batch_1.bin" in str(e)


def test_missing_files_are_listed_with_where_they_were_expected(tmp_path):
    images, labels = fake(12, "cifar10")
    folder = write_cifar(tmp_path, "cifar10", images, labels, train_count=10, classes=None)
    (folder / "data_batch_3.bin").unlink()
    e = _error(tmp_path, "cifar10")
    assert e.where == str(folder)
    assert "missing data_batch_3.bin" in e.message
    assert "data_batch_1.bin .. data_batch_5.bin and test_batch.bin" in e.message
    assert "cifar-10-binary.tar.gz" in e.message and f"in {folder};" in e.message
    assert "found data_batch_1.bin, data_batch_2.bin, data_batch_4.bin" in e.message


def test_an_empty_folder(tmp_path, kind):
    e = _error(tmp_path, kind, train=False)
    expected = {"cifar10": "test_batch.bin", "cifar100": "test.bin"}[kind]
    assert expected in e.message and "an empty folder" in e.message


@pytest.mark.parametrize("size", [3073 * 3 - 1, 3073 * 3 + 1, 0])
def test_a_file_of_the_wrong_size(tmp_path, size):
    images, labels = fake(12, "cifar10")
    folder = write_cifar(tmp_path, "cifar10", images, labels, train_count=10, classes=None)
    (folder / "data_batch_2.bin").write_bytes(b"\0" * size)
    e = _error(folder, "cifar10")
    assert e.where == str(folder / "data_batch_2.bin")
    assert "data_batch_2.bin" in e.message and f"{size:,} bytes" in e.message and "3,073 bytes" in e.message


def test_cifar100_records_in_a_cifar10_file_are_named(tmp_path):
    images, labels = fake(12, "cifar10")
    folder = write_cifar(tmp_path, "cifar10", images, labels, train_count=10, classes=None)
    (folder / "test_batch.bin").write_bytes(b"\0" * 3074 * 2)
    e = _error(folder, "cifar10", train=False)
    assert "test_batch.bin" in str(e) and "3,074-byte" in e.message and "3,073 bytes" in e.message


@pytest.mark.parametrize("kind", CIFAR_KINDS)
def test_a_label_out_of_range(tmp_path, kind):
    images, labels = fake(12, kind)
    labels[8] = CLASS_COUNT[kind]
    folder = write_cifar(tmp_path, kind, images, labels, train_count=10, classes=None)
    e = _error(tmp_path, kind)
    # cifar10: records 0..9 are spread two per file, so record 8 is record 0 of data_batch_5.bin
    file, record = {"cifar10": ("data_batch_5.bin", 0), "cifar100": ("train.bin", 8)}[kind]
    assert e.where == str(folder / file) and file in e.message
    assert f"record {record} " in e.message and f"label {CLASS_COUNT[kind]};" in e.message
    assert f"0..{CLASS_COUNT[kind] - 1}" in e.message
    assert len(CifarBinary(tmp_path, kind, train=False)) == 2  # the other split is fine


@pytest.mark.parametrize("count", [9, 11])
def test_a_names_file_with_the_wrong_number_of_names(tmp_path, count):
    images, labels = fake(6, "cifar10")
    folder = write_cifar(tmp_path, "cifar10", images, labels, train_count=5, classes=None)
    (folder / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(count)) + "\n\n\n")
    e = _error(tmp_path, "cifar10")
    assert e.where == str(folder / "batches.meta.txt")
    assert "batches.meta.txt" in e.message and f"has {count} names" in e.message and "expected 10" in e.message


def test_a_cifar10_reader_at_a_cifar100_folder(tmp_path):
    images, labels = fake(5, "cifar100")
    folder = write_cifar(tmp_path, "cifar100", images, labels, train_count=3, classes=None)
    for root in (tmp_path, folder):
        e = _error(root, "cifar10")
        assert "CIFAR-100 binary distribution" in e.message and "'cifar100'" in e.message
        assert "data_batch_1.bin" in e.message or "cifar-10-binary.tar.gz" in e.message


def test_a_cifar100_reader_at_a_cifar10_folder(tmp_path):
    images, labels = fake(7, "cifar10")
    folder = write_cifar(tmp_path, "cifar10", images, labels, train_count=5, classes=None)
    e = _error(folder, "cifar100")
    assert "CIFAR-10 binary distribution" in e.message and "'cifar10'" in e.message


@pytest.mark.parametrize("kind", CIFAR_KINDS)
@pytest.mark.parametrize("inside", [True, False])
def test_the_python_distribution_is_recognised(tmp_path, kind, inside):
    py_folder, py_files = {"cifar10": ("cifar-10-batches-py", ["data_batch_1", "data_batch_2", "test_batch",
                                                                 "batches.meta", "readme.html"]),
                           "cifar100": ("cifar-100-python", ["train", "test", "meta", "file.txt~"])}[kind]
    folder = tmp_path / py_folder
    folder.mkdir()
    for name in py_files:
        (folder / name).write_bytes(b"\x80\x02}q\x00.")  # a pickle: must never be loaded
    e = _error(folder if inside else tmp_path, kind)
    assert "python (pickled) distribution" in e.message
    archive = {"cifar10": "cifar-10-binary.tar.gz", "cifar100": "cifar-100-binary.tar.gz"}[kind]
    assert f"download the binary version, {archive}" in e.message


def test_an_unknown_kind(tmp_path):
    e = _error(tmp_path, "cifar1000")
    assert e.field == "kind" and "cifar10, cifar100" in e.message
