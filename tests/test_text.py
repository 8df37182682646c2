"""Text data for the language models: sources and split, tokenizer, token cache, windows, masking."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from unroll.errors import UnrollError
from unroll.train import text
from unroll.train.text import (EOT, MASK, TOKENIZER_FILE, TokenWindows, cached_ids, load_tokenizer, mask_tokens,
                               open_text, open_tokens, save_tokenizer, train_tokenizer, unigram_entropy)

SAMPLE = "def f(x):\n    return x * 2  # café ÿ €😀\n\tprint('<|endoftext|>', \"[MASK]\")\n"


def corpus(root: Path, files: int = 12) -> Path:
    """Text files in nested folders, a binary file, a Latin-1 file, and a hidden folder."""
    for k in range(files):
        sub = root / f"pkg{k % 3}" / ("deep" if k % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{k}.py").write_text(f"# module {k}\n" + SAMPLE * (5 + k) + f"value_{k} = {k * 7}\n", encoding="utf-8")
    (root / "pkg0" / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (root / "pkg1" / "latin.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tokenizer(small):
    return train_tokenizer(open_text(small).train, 300)


# --- sources -------------------------------------------------------------------------------------

def test_directory_lists_text_files_skips_and_counts_the_others(small):
    source = open_text(small)
    rels = sorted(f.rel for f in source.train + source.val)
    assert rels == sorted(f"pkg{k % 3}/{'deep/' if k % 2 else ''}mod{k}.py" for k in range(12))
    assert source.skipped == 2  # blob.bin and latin.txt; .git is hidden, not skipped
    assert source.name == small.name
    assert "2 skipped as not UTF-8 text" in source.describe()


def test_split_is_stable_disjoint_and_holds_out_whole_files(small, tmp_path):
    a, b = open_text(small), open_text(small)
    assert [f.rel for f in a.val] == [f.rel for f in b.val]
    assert a.val and a.train
    assert not {f.rel for f in a.train} & {f.rel for f in a.val}
    assert all(f.span is None for f in a.train + a.val)
    # the same relative paths elsewhere are held out the same way, with another file added
    other = corpus(tmp_path / "copy")
    (other / "extra.py").write_text("x = 1\n")
    assert set(f.rel for f in a.val) <= set(f.rel for f in open_text(other).val) | {"extra.py"}


def test_held_out_fraction_is_about_five_percent():
    fractions = [text.held_out_fraction(f"pkg/mod{k}.py") for k in range(4000)]
    share = sum(f < 0.05 for f in fractions) / len(fractions)
    assert 0.04 < share < 0.06


def test_single_file_is_cut_at_a_line(tmp_path):
    lines = [f"line {k} ünïcode\n" for k in range(100)]
    path = tmp_path / "one.txt"
    path.write_text("".join(lines), encoding="utf-8")
    source = open_text(path)
    (train,), (val,) = source.train, source.val
    assert train.read() + val.read() == "".join(lines)
    assert val.read().startswith("line ") and 3 <= val.read().count("\n") <= 7


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such file or directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no files here"),
    (lambda p: (p / "hidden" / ".x").mkdir(parents=True) or p / "hidden", "no files here"),
])
def test_missing_or_empty_source_is_an_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(UnrollError, match=message) as e:
        open_text(path)
    assert e.value.where == str(path)


def test_only_binary_files_is_an_error_that_counts_them(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe broken")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "d.txt").write_bytes("ok\0".encode())
    with pytest.raises(UnrollError, match="all 3 files were skipped as not UTF-8 text") as e:
        open_text(tmp_path)
    assert e.value.where == str(tmp_path)


def test_default_corpus_is_the_standard_library_without_installed_packages():
    import sysconfig
    import sys

    source = open_text(None)
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = [f.rel for f in source.train + source.val]
    assert source.name == f"python{sys.version_info[0]}.{sys.version_info[1]}-stdlib"
    assert source.root == str(root)
    assert len(rels) > 500 and all(r.endswith(".py") for r in rels)
    assert "os.py" in rels and "json/decoder.py" in rels
    assert not any(part in ("site-packages", "dist-packages") for r in rels for part in r.split("/"))
    assert [f.rel for f in source.train] == sorted(f.rel for f in source.train)
    assert 0.03 < len(source.val) / len(rels) < 0.07
    assert [f.rel for f in open_text(None).val] == [f.rel for f in source.val]


# --- tokenizer -----------------------------------------------------------------------------------

def test_round_trip_and_special_ids(tokenizer):
    assert tokenizer.token_to_id(EOT) == 0 and tokenizer.token_to_id(MASK) == 1
    assert tokenizer.get_vocab_size() == 300
    for sample in (SAMPLE, "  leading spaces\r\n\x00\x7f", "😀" * 3, ""):
        ids = tokenizer.encode(sample).ids
        assert tokenizer.decode(ids) == sample
    # text that spells a special token is text: never the separator id
    assert 0 not in tokenizer.encode(EOT).ids and 1 not in tokenizer.encode(MASK).ids
    # merges were learnt: the sample is shorter in tokens than in bytes
    assert len(tokenizer.encode(SAMPLE).ids) < len(SAMPLE.encode()) * 0.7


def test_tokenizer_learns_only_from_training_files(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    for k in range(20):
        (root / f"f{k}.txt").write_text(f"common words here {k}\n" * 3)
    val = open_text(root).val
    for f in val:  # a word only in the held-out files, repeated enough to be merged if seen
        Path(f.path).write_text("zyzzyvaqux " * 500)
    tok = train_tokenizer(open_text(root).train, 400)
    assert not any("zyzz" in token for token in tok.get_vocab())


def test_training_text_is_capped(small):
    files = open_text(small).train
    taken = list(text.sample_text(files, 1000))
    assert sum(len(t.encode()) for t in taken) <= 1000
    assert sum(len(t.encode()) for t in taken) > 900
    assert taken == list(text.sample_text(files, 1000))


def test_saved_tokenizer_loads_and_encodes_the_same(tokenizer, tmp_path):
    path = save_tokenizer(tokenizer, tmp_path / "run")
    assert path == tmp_path / "run" / TOKENIZER_FILE
    loaded = load_tokenizer(path, 300)
    assert loaded.encode(SAMPLE).ids == tokenizer.encode(SAMPLE).ids
    assert loaded.encode(EOT).ids == tokenizer.encode(EOT).ids  # specials in text stay text after loading
    assert load_tokenizer(tmp_path / "run").get_vocab_size() == 300  # a folder means its tokenizer.json


def test_tokenizer_larger_than_vocab_size_is_an_error(tokenizer, tmp_path):
    path = save_tokenizer(tokenizer, tmp_path)
    with pytest.raises(UnrollError, match=r"300 tokens.*vocab_size of 299"):
        load_tokenizer(path, 299)


def test_vocab_size_below_bytes_is_an_error(small):
    with pytest.raises(UnrollError, match="at least 258"):
        train_tokenizer(open_text(small).train, 257)


@pytest.mark.parametrize("content, message", [
    (None, "no such tokenizer file"),
    ('{"not": "a tokenizer"}', "not a tokenizer JSON"),
    ("garbage{", "not a tokenizer JSON"),
])
def test_bad_tokenizer_file_is_an_error(tmp_path, content, message):
    path = tmp_path / "tok.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UnrollError, match=message) as e:
        load_tokenizer(path, 1000)
    assert e.value.where == str(path)


def test_tokenizer_without_end_of_text_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tok.json"
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(path))
    with pytest.raises(UnrollError, match=r"no <\|endoftext\|> token"):
        load_tokenizer(path, 1000)


# --- token cache ---------------------------------------------------------------------------------

def test_stream_is_files_separated_by_end_of_text(small, tokenizer, tmp_path):
    files = open_text(small).train[:3]
    ids = cached_ids(files, tokenizer, tmp_path)
    assert ids.dtype == np.uint16
    expected = []
    for f in files:
        expected += tokenizer.encode(Path(f.path).read_text(encoding="utf-8")).ids + [0]
    assert ids.tolist() == expected
    # an edited file is a new cache entry, not the old stream
    victim = Path(files[1].path)
    original = victim.read_text(encoding="utf-8")
    try:
        victim.write_text(original + "edited = True\n", encoding="utf-8")
        edited = cached_ids(open_text(small).train[:3], tokenizer, tmp_path)
        assert len(edited) > len(ids) and tokenizer.decode(edited.tolist()).count("edited = True") == 1
    finally:
        victim.write_text(original, encoding="utf-8")


def test_wide_vocabularies_are_stored_as_uint32():
    assert text.id_dtype(65_536) == np.uint16
    assert text.id_dtype(65_537) == np.uint32


def test_second_run_reads_the_cache(small, tmp_path, monkeypatch):
    calls = {"encode": 0, "train": 0}
    encode, train = text._encode, text._train

    def counting_encode(*args):
        calls["encode"] += 1
        return encode(*args)

    def counting_train(*args):
        calls["train"] += 1
        return train(*args)

    monkeypatch.setattr(text, "_encode", counting_encode)
    monkeypatch.setattr(text, "_train", counting_train)
    first = open_tokens(small, 300, 16, cache=tmp_path)
    assert calls["train"] == 1 and calls["encode"] >= 2
    seen = dict(calls)
    second = open_tokens(small, 300, 16, cache=tmp_path)
    assert calls == seen
    assert isinstance(second.train.ids, np.memmap)
    assert np.array_equal(first.train.ids, second.train.ids) and np.array_equal(first.val.ids, second.val.ids)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    # a changed file is tokenized again
    victim = Path(open_text(small).train[0].path)
    original = victim.read_text()
    try:
        victim.write_text(original + "more = 1\n")
        open_tokens(small, 300, 16, cache=tmp_path)
        assert calls["encode"] > seen["encode"]
    finally:
        victim.write_text(original)


def test_cache_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UNROLL_CACHE", str(tmp_path))
    assert text.default_cache() == tmp_path / "tokens"
    monkeypatch.delenv("UNROLL_CACHE")
    assert text.default_cache() == Path.home() / ".cache" / "unroll" / "tokens"


def test_given_tokenizer_is_used_and_checked(small, tokenizer, tmp_path):
    path = save_tokenizer(tokenizer, tmp_path / "run")
    splits = open_tokens(small, 300, 8, cache=tmp_path / "cache", tokenizer=path)
    assert splits.tokenizer.to_str() == tokenizer.to_str()
    with pytest.raises(UnrollError, match="vocab_size of 290"):
        open_tokens(small, 290, 8, cache=tmp_path / "cache", tokenizer=path)


def test_context_longer_than_held_out_text_is_an_error(small, tmp_path):
    with pytest.raises(UnrollError, match="less than one window"):
        open_tokens(small, 300, 100_000, cache=tmp_path)


# --- windows -------------------------------------------------------------------------------------

def test_windows_are_shifted_and_do_not_overlap(tmp_path):
    ids = np.arange(50, dtype=np.uint16)
    np.save(tmp_path / "ids.npy", ids)
    windows = TokenWindows(np.load(tmp_path / "ids.npy", mmap_mode="r"), 7)
    assert len(windows) == 7  # (50 - 1) // 7
    x, y = windows[2]
    assert x.dtype == y.dtype == torch.int64
    assert x.tolist() == list(range(14, 21)) and y.tolist() == list(range(15, 22))
    assert windows[(3, 6)][1].tolist() == list(range(43, 50))  # (epoch, index) keys; the last target is the last id
    with pytest.raises(IndexError):
        windows[7]
    assert len(TokenWindows(np.arange(8), 7)) == 1 and len(TokenWindows(np.arange(7), 7)) == 0


def test_windows_pickle_without_their_data(tmp_path):
    ids = np.arange(1_000_000, dtype=np.uint32) % 60_000
    np.save(tmp_path / "ids.npy", ids)
    windows = TokenWindows(tmp_path / "ids.npy", 64)
    windows[0]  # mapped now: the mapping must still not travel
    blob = pickle.dumps(windows)
    assert len(blob) < 2_000
    copy = pickle.loads(blob)
    assert len(copy) == len(windows)
    assert torch.equal(copy[123][0], torch.from_numpy(ids[123 * 64:124 * 64].astype(np.int64)))


def test_windows_of_a_memmap_slice_pickle_to_the_right_offset(tmp_path):
    ids = np.arange(300_000, dtype=np.uint32)
    np.save(tmp_path / "ids.npy", ids)
    part = np.load(tmp_path / "ids.npy", mmap_mode="r")[70_001:200_000]
    copy = pickle.loads(pickle.dumps(TokenWindows(part, 10)))
    assert copy[0][0].tolist() == list(range(70_001, 70_011))
    assert len(copy) == (len(part) - 1) // 10


def test_in_memory_stream_pickles_with_its_data():
    windows = pickle.loads(pickle.dumps(TokenWindows(np.arange(30, dtype=np.uint16), 4)))
    assert windows[1][1].tolist() == [5, 6, 7, 8]


@pytest.mark.parametrize("context_kind", ["fork", "spawn"])
def test_loader_with_worker_processes(tmp_path, context_kind):
    ids = (np.arange(10_001) % 1000).astype(np.uint16)
    np.save(tmp_path / "ids.npy", ids)
    windows = TokenWindows(tmp_path / "ids.npy", 100)
    loader = DataLoader(windows, batch_size=8, num_workers=2, multiprocessing_context=context_kind)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == y.shape == (100, 100)
    assert torch.equal(x.flatten(), torch.from_numpy(ids[:10_000].astype(np.int64)))
    assert torch.equal(y.flatten(), torch.from_numpy(ids[1:].astype(np.int64)))


def test_windows_fit_the_training_loader(tmp_path):
    from unroll.train.loader import batches, train_loader

    windows = TokenWindows(np.arange(1001, dtype=np.uint16), 10)
    loader, keys = train_loader(windows, 4, rank=0, world=1, seed=3, workers=0, pin_memory=False)
    keys.set_epoch(1)
    seen = [x for x, _ in batches(loader)]
    starts = sorted(int(row[0]) for x in seen for row in x)
    assert starts == list(range(0, 1000, 10))


# --- masking and baseline ------------------------------------------------------------------------

def test_masking_follows_berts_rule():
    vocab, mask_id = 1000, 1
    ids = torch.randint(2, vocab, (400, 500), generator=torch.Generator().manual_seed(5))  # 200k tokens, none == mask_id
    inputs, targets = mask_tokens(ids, vocab, mask_id, torch.Generator().manual_seed(0))
    chosen = targets != -100
    n = chosen.sum().item()
    assert abs(n / ids.numel() - 0.15) < 0.005
    assert torch.equal(targets[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs[chosen] == mask_id)
    kept = (inputs[chosen] == ids[chosen])
    random = ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(kept.sum().item() / n - 0.1) < 0.01 + 1 / vocab  # a random id may equal the original
    assert abs(random.sum().item() / n - 0.1) < 0.01
    drawn = inputs[chosen][random]
    assert drawn.min() >= 0 and drawn.max() < vocab
    tenths = torch.bincount(drawn // 100, minlength=10).double() / len(drawn)
    assert (tenths - 0.1).abs().max() < 0.02  # about 3,000 draws: each tenth within ~4 sigma


def test_masking_depends_on_the_generator_only():
    ids = torch.arange(10_000) % 50
    a = mask_tokens(ids, 50, 49, torch.Generator().manual_seed(1))
    torch.rand(100)  # the global stream is not used
    b = mask_tokens(ids, 50, 49, torch.Generator().manual_seed(1))
    c = mask_tokens(ids, 50, 49, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_unigram_entropy_by_hand():
    # frequencies 1/2, 1/4, 1/4 of ids 0, 3, 5: H = ln 2 / 2 + 2 * ln 4 / 4 = 1.5 ln 2
    ids = np.array([0, 0, 3, 5, 0, 3, 5, 0], dtype=np.uint16)
    assert math.isclose(unigram_entropy(ids, 8), 1.5 * math.log(2), rel_tol=1e-12)
    assert math.isclose(unigram_entropy(ids, 8, chunk=3), 1.5 * math.log(2), rel_tol=1e-12)
    assert unigram_entropy(np.full(10, 4, dtype=np.uint16), 8) == 0.0
    with pytest.raises(ValueError):
        unigram_entropy(ids, 5)


@pytest.mark.slow
def test_standard_library_end_to_end(tmp_path):
    splits = open_tokens(None, 512, 256, cache=tmp_path)
    assert splits.tokenizer.get_vocab_size() == 512
    assert len(splits.train) > 10_000 and len(splits.val) > 100
    h = unigram_entropy(splits.val.ids, 512)
    assert 4.0 < h < math.log(512)
