"""Augmented views (``extract.views``): the VSE-infinity augmentations, their identities and cache keys,
extraction of K views on real backbones, and which view the loader reads in which epoch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import KEY, build_cache, make_sentiment_rows, write_config, write_csv
from unipt.extract.augment import (
    augment_image,
    augment_images,
    crop_box,
    noise_encoding,
    noise_tokens,
    view_rng,
)
from unipt.extract.backbones import load_backbone
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline import experiment
from unipt.pipeline.cache.identity import BackboneIdentity, cache_key, cache_key_fields, space_key
from unipt.pipeline.cache.layout import LayerSpec, StoreLayout
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.cache.root import CacheRoot
from unipt.pipeline.cache.space import write_view
from unipt.pipeline.cache.writer import CacheBuilder, write_shard
from unipt.pipeline.config import BackboneConfig, ExtractConfig, TrainConfig, load_config
from unipt.pipeline.data.augment import augmented_hashes, view_for_epoch, view_hash
from unipt.pipeline.data.images import image_array
from unipt.pipeline.errors import UniptError
from unipt.train.loader import CacheBatches

IDENTITY = BackboneIdentity("m", None, "w" * 64, "c" * 64, "t" * 64, "/m")

# --- the augmentations ----------------------------------------------------------------------------------


def test_view_zero_is_the_input_and_other_views_are_named_by_input_recipe_seed_and_number():
    h = "ab" * 32
    assert view_hash(h, 0, seed=0) == h == view_hash(h, 0, seed=7)
    names = {view_hash(h, k, seed) for k in (1, 2, 3) for seed in (0, 1)}
    assert len(names) == 6 and h not in names
    assert view_hash(h, 2, 1) == view_hash(h, 2, 1)  # deterministic
    # Val and test examples are never augmented: their further views name view 0.
    extra = augmented_hashes(["a", "b", "c"], ["train", "val", "test"], views=3, seed=0)
    assert [column[1:] for column in extra] == [["b", "c"], ["b", "c"]]
    assert extra[0][0] != extra[1][0] != "a"
    assert [view_for_epoch(e, seed=1, views=4) for e in range(6)] == [1, 2, 3, 0, 1, 2]


def test_token_noise_touches_a_fifth_of_word_pieces_masked_replaced_deleted_50_10_40():
    rng = np.random.default_rng(0)
    special = {0, 101, 102, 103}
    ids = [101, *rng.integers(1000, 30000, 200_000).tolist(), 102]
    out = noise_tokens(ids, view_rng("12" * 32), special, mask_id=103, vocab_size=30522)
    assert out[0] == 101 and out[-1] == 102  # [CLS] and [SEP] are never touched
    inner, before = np.array(out[1:-1]), np.array(ids[1:-1])
    masked, deleted = (inner == 103).mean(), (inner == -1).mean()
    replaced = ((inner != before) & (inner != 103) & (inner != -1)).mean()
    total = masked + deleted + replaced
    assert total == pytest.approx(0.2, abs=0.005)
    # A replacement may draw the token it replaces (1 in ~30k): the mix is measured, not exact.
    assert masked / total == pytest.approx(0.5, abs=0.01)
    assert replaced / total == pytest.approx(0.1, abs=0.01)
    assert deleted / total == pytest.approx(0.4, abs=0.01)
    assert not set(inner[(inner != before) & (inner >= 0)].tolist()) & (special - {103})
    assert out == noise_tokens(ids, view_rng("12" * 32), special, 103, 30522)  # seeded
    assert out != noise_tokens(ids, view_rng("13" * 32), special, 103, 30522)


def test_noise_encoding_deletes_a_token_from_every_list_and_leaves_unviewed_texts_alone():
    encoded = {
        "input_ids": [[101, *range(1000, 1040), 102], [101, 2000, 102]],
        "attention_mask": [[1] * 42, [1] * 3],
        "token_type_ids": [[0, *range(1, 41), 0], [0] * 3],
    }
    out = noise_encoding(encoded, ["34" * 32, None], {0, 101, 102, 103}, mask_id=103, vocab_size=30522)
    assert out["input_ids"][1] == [101, 2000, 102] and out["token_type_ids"][1] == [0, 0, 0]
    ids, types = out["input_ids"][0], out["token_type_ids"][0]
    assert len(ids) == len(types) == len(out["attention_mask"][0]) < 42  # this seed deletes some
    noised = noise_tokens(encoded["input_ids"][0], view_rng("34" * 32), {0, 101, 102, 103}, 103, 30522)
    assert ids == [token for token in noised if token >= 0]
    # Token types were 0, 1..40, 0: what is left of them are the kept positions, in order.
    assert types == [0] + [p for p, token in enumerate(noised) if token >= 0 and 0 < p < 41] + [0]
    with pytest.raises(UniptError, match="no mask token"):
        noise_encoding(encoded, ["34" * 32, None], {0}, mask_id=None, vocab_size=10)


def test_random_resized_crop_covers_60_to_100_percent_at_3_4_to_4_3_and_flips_half():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = crop_box(224, 224, rng)
        assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224
        areas.append(h * w / 224**2)
        ratios.append(w / h)
    assert 0.59 <= min(areas) < 0.62 and max(areas) <= 1.0 and 0.7 < np.mean(areas) < 0.8
    assert min(ratios) >= 0.74 and max(ratios) <= 1.34

    pixels = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    flips = 0
    for i in range(400):
        crop = augment_image(pixels, view_rng(f"{i:064x}"))
        np.testing.assert_array_equal(crop, augment_image(pixels, view_rng(f"{i:064x}")))  # seeded
        top, left, h, w = crop_box(28, 28, view_rng(f"{i:064x}"))
        window = pixels[top : top + h, left : left + w]
        if np.array_equal(crop, window[:, ::-1]) and not np.array_equal(crop, window):
            flips += 1
        else:
            np.testing.assert_array_equal(crop, window)
    assert 160 < flips < 240
    images = augment_images([pixels, pixels], ["56" * 32, None])
    assert images[1] is pixels and image_array(images[0]).shape[2] == 3


# --- cache keys -----------------------------------------------------------------------------------------


def test_one_view_keeps_todays_keys_and_k_views_get_their_own_key_in_the_same_space():
    backbone = BackboneConfig(name_or_path="m", layers=[0, 1])
    today = cache_key_fields("f" * 64, IDENTITY, backbone, ExtractConfig())
    assert "views" not in today
    assert cache_key_fields("f" * 64, IDENTITY, backbone, ExtractConfig(views=1, view_seed=9)) == today
    four = cache_key_fields("f" * 64, IDENTITY, backbone, ExtractConfig(views=4))
    other_seed = cache_key_fields("f" * 64, IDENTITY, backbone, ExtractConfig(views=4, view_seed=1))
    assert len({cache_key(today), cache_key(four), cache_key(other_seed)}) == 3
    assert cache_key(four) != cache_key(
        cache_key_fields("f" * 64, IDENTITY, backbone, ExtractConfig(views=2))
    )
    assert space_key(four) == space_key(today) == space_key(other_seed)  # the views are inputs of one space
    with pytest.raises(ValueError):
        ExtractConfig(views=0)


# --- the loader -----------------------------------------------------------------------------------------

SPACE = "5a" * 16
SEGMENT, SEGMENT_2 = "01" * 16, "02" * 16
VIEW_KEY = "ee" * 16


def _view_with_views(tmp_path, views: int = 3):
    """A view of 10 train + 4 val examples with ``views`` views, over one segment whose rows say which
    input they are: every row of input j is filled with j + 1. Returns the reader, hashes per view and
    each input's value."""
    root = CacheRoot(tmp_path)
    splits = ["train"] * 10 + ["val"] * 4
    hashes = [f"{i:064x}" for i in range(len(splits))]
    extra = augmented_hashes(hashes, splits, views, seed=0)
    inputs = list(dict.fromkeys(hashes + [h for column in extra for h in column]))
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, len(inputs)).tolist()
    # Two segments (as after an extraction of K views on top of K=1): inputs in order, cut in two.
    half = len(inputs) // 2
    readers = {}
    for seg, members in ((SEGMENT, range(half)), (SEGMENT_2, range(half, len(inputs)))):
        part = [lengths[j] for j in members]
        layout = StoreLayout(
            layers=(LayerSpec(0, 4),), num_examples=len(part), max_length=8, shard_size=5, chunk_rows=8
        )
        builder = CacheBuilder(root, seg, final=root.segment_location(SPACE, seg))
        builder.create(layout, {"kind": "segment", "space_key": SPACE, "key_fields": {}})
        rows = [np.full((lengths[j], 4), j + 1, dtype=np.float16) for j in members]
        for shard in layout.shards():
            cut = slice(shard.example_start, shard.example_stop)
            write_shard(builder.location, layout, shard, {0: np.concatenate(rows[cut])}, part[cut])
        builder.commit(layout, pa.table({"input_hash": [inputs[j] for j in members]}), {})
        readers[seg] = open_cache(root.segment_location(SPACE, seg))
    examples = pa.table(
        {"example_id": [f"e{i:02d}" for i in range(len(splits))], "label": [i % 2 for i in range(14)],
         "split": splits}
    )  # fmt: skip
    where = {
        h: (SEGMENT if j < half else SEGMENT_2, j if j < half else j - half) for j, h in enumerate(inputs)
    }
    attrs = {"key_fields": {"dataset_fingerprint": "v"}, "label_names": ["a", "b"]}
    write_view(root, VIEW_KEY, attrs, examples, hashes, where, readers, views=extra)
    for reader in readers.values():
        reader.lease.release()
    value = {h: j + 1 for j, h in enumerate(inputs)}
    return open_cache(root.location(VIEW_KEY)), [hashes, *extra], value, lengths


def _rows_seen(batches, epoch: int) -> dict[int, tuple[float, int]]:
    """example index -> (the value its rows hold, its token count) over one epoch."""
    seen = {}
    for batch in batches.epoch(epoch):
        for b, index in enumerate(batch.indices):
            n = int(batch.mask[b].sum())
            values = batch.hidden[0][b, :n].unique()
            assert len(values) == 1 and (batch.hidden[0][b, n:] == 0).all()
            seen[int(index)] = (float(values[0]), n)
    return seen


def test_training_reads_view_epoch_plus_seed_mod_k_and_val_test_read_view_zero(tmp_path):
    reader, per_view, value, lengths = _view_with_views(tmp_path, views=3)
    assert reader.num_views == 3
    config = TrainConfig(batch_size=4, block_examples=4, reader_threads=1)
    for seed in (0, 2):
        train = CacheBatches.for_split(reader, "train", config, seed, shuffle=True)
        val = CacheBatches.for_split(reader, "val", config, seed, shuffle=False)
        for epoch in range(4):
            view = (epoch + seed) % 3
            assert train.view_of_epoch(epoch) == view
            want = {i: (value[per_view[view][i]], lengths[value[per_view[view][i]] - 1]) for i in range(10)}
            assert _rows_seen(train, epoch) == want
            assert _rows_seen(val, epoch) == {
                i: (value[per_view[0][i]], lengths[value[per_view[0][i]] - 1]) for i in range(10, 14)
            }
    # Views really differ for train examples, and not at all for val ones.
    assert len({per_view[k][0] for k in range(3)}) == 3 and len({per_view[k][12] for k in range(3)}) == 1
    # Without shuffling (evaluation, prediction) training's split is read as it is: view 0.
    plain = CacheBatches(reader, "train", [0], batch_size=4)
    assert plain.num_views == 1 and all(
        v == value[per_view[0][i]] for i, (v, _) in _rows_seen(plain, 3).items()
    )
    with pytest.raises(UniptError, match="stores 3 view"):
        reader.view(3)
    reader.lease.release()


def test_compaction_keeps_every_view_and_hdf5_export_says_it_holds_view_zero_only(tmp_path, capfd):
    from unipt.pipeline.cache.hdf5 import export_hdf5
    from unipt.pipeline.cache.opener import open_cache
    from unipt.pipeline.cache.space import compact

    reader, per_view, value, lengths = _view_with_views(tmp_path, views=3)
    before = {k: [reader.view(k).read_example(i, 0).tolist() for i in range(14)] for k in range(3)}
    assert len(reader.segments) == 2
    reader.lease.release()
    root = CacheRoot(tmp_path)
    compact(root, SPACE, progress=False)
    merged = open_cache(root.location(VIEW_KEY))
    assert len(merged.segments) == 1 and merged.num_views == 3
    assert {k: [merged.view(k).read_example(i, 0).tolist() for i in range(14)] for k in range(3)} == before
    assert before[1][0] != before[0][0] and before[1][12] == before[0][12]

    out = export_hdf5(merged, tmp_path / "x.h5")
    merged.lease.release()
    assert (
        "HDF5 export holds view 0 only; the 2 augmented view(s) stay in the cache" in capfd.readouterr().err
    )
    exported = open_cache(out)
    assert exported.num_views == 1 and [exported.read_example(i, 0).tolist() for i in range(14)] == before[0]
    exported.close()


def test_a_cache_without_views_has_one_and_refuses_another(tmp_path):
    root = CacheRoot(tmp_path)
    build_cache(root, [3, 5, 2], {0: 4})
    reader = open_cache(root.location(KEY))
    assert reader.num_views == 1 and reader.view(0) is reader
    with pytest.raises(UniptError, match="no augmented view 1"):
        reader.view(1)
    reader.lease.release()


# --- extraction on real backbones -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_versions(tmp_path_factory, tiny_bert_dir):
    folder = tmp_path_factory.mktemp("views")
    source = write_csv(folder / "data.csv", make_sentiment_rows(60))

    def prep(views: int):
        path = write_config(folder / f"k{views}.yaml", str(source), str(tiny_bert_dir), folder,
                            extract={"shard_size": 32, "chunk_rows": 64, "views": views})  # fmt: skip
        return experiment.prepare(load_config(path))

    return prep


@pytest.mark.e2e  # extracts and trains
@pytest.mark.slow
def test_k3_text_views_after_k1_reuse_view_zero_and_hold_the_noised_encodings(
    ray_session, text_versions, tiny_bert_dir, capfd
):
    one = text_versions(1)
    experiment.extract(one, progress=False).release()
    three = text_versions(3)
    assert three.key != one.key
    capfd.readouterr()
    result = experiment.extract(three, progress=False)
    result.release()
    train = three.dataset.split_counts()["train"]
    unique = len(set(three.dataset.table.column("text").to_pylist()))
    assert f"cache: {unique} of {unique + 2 * train} inputs (of 3 views) reused; extracting {2 * train}" in (
        capfd.readouterr().err
    )
    root = three.cache_root
    assert len(root.segments(root.spaces()[0])) == 2  # view 0's segment, and one with views 1 and 2
    k1, k3 = open_cache(root.location(one.key)), open_cache(root.location(three.key))
    assert k3.num_views == 3 and k1.num_views == 1
    for layer in k3.layers:  # view 0 is the K=1 version's rows, read from the very same segment
        np.testing.assert_array_equal(k3.offsets_for(layer), k1.offsets_for(layer))
        total = int(k1.offsets_for(layer)[-1, 1])
        np.testing.assert_array_equal(k3.read_rows(layer, 0, total), k1.read_rows(layer, 0, total))

    texts = three.dataset.table.column("text").to_pylist()
    splits = three.dataset.table.column("split").to_pylist()
    hashes = k3.examples.column("input_hash").to_pylist()
    backbone = load_backbone(BackboneLoadSpec(str(tiny_bert_dir), device="cpu"))
    changed = 0
    for view in (1, 2):
        reader = k3.view(view)
        names = [view_hash(h, view, 0) if s == "train" else h for h, s in zip(hashes, splits, strict=True)]
        assert reader.examples.column(f"input_hash_{view}").to_pylist() == names
        encoded = backbone.encode(texts, [2], 32, 16, "float16", token_noise=[
            n if s == "train" else None for n, s in zip(names, splits, strict=True)])  # fmt: skip
        starts = np.concatenate([[0], np.cumsum(encoded.lengths)])
        for i in range(len(texts)):
            want = encoded.layers[2][starts[i] : starts[i + 1]]
            np.testing.assert_allclose(reader.read_example(i, 2), want, atol=2e-3, rtol=2e-3)
            if splits[i] != "train":
                np.testing.assert_array_equal(reader.read_example(i, 2), k3.read_example(i, 2))
            elif encoded.lengths[i] != k3.offsets_for(2)[i, 1] - k3.offsets_for(2)[i, 0]:
                changed += 1
    assert changed > 0  # some train texts lost tokens
    k1.lease.release()
    k3.lease.release()
    # A rerun is a hit; training through the views runs (epoch e reads view (e + seed) mod 3).
    assert experiment.extract(three, progress=False).cache_hit
    train_config = three.config.train.model_copy(update={"epochs": 3})
    trained = experiment.train(replace(three, config=three.config.model_copy(update={"train": train_config})),
                               progress=False)  # fmt: skip
    metrics = trained.metrics
    assert 0 <= metrics["test_acc"] <= 1


@pytest.mark.slow
def test_k2_efficientnet_views_are_the_backbone_on_the_augmented_images(ray_session, tmp_path):
    mnist = "bundled:mnist_5k"
    path = write_config(
        tmp_path / "images.yaml", mnist, "bundled:efficientnet-lite0", tmp_path,
        dataset={"source": mnist, "id_column": None, "limit": 30},
        backbone={"name_or_path": "bundled:efficientnet-lite0", "batch_size": 8, "layers": [3, 8]},
        extract={"shard_size": 10, "chunk_rows": 64, "views": 2},
    )  # fmt: skip
    prep = experiment.prepare(load_config(path))
    result = experiment.extract(prep, progress=False)
    reader = open_cache(result.path)
    assert reader.num_views == 2
    view = reader.view(1)
    images = prep.dataset.table.column("image").to_pylist()
    splits = prep.dataset.table.column("split").to_pylist()
    hashes = reader.examples.column("input_hash").to_pylist()
    backbone = load_backbone(BackboneLoadSpec("bundled:efficientnet-lite0", device="cpu"))
    train = [i for i, s in enumerate(splits) if s == "train"][:4]
    augmented = augment_images([images[i] for i in train], [view_hash(hashes[i], 1, 0) for i in train])
    maps = backbone.feature_maps(augmented, [3, 8])
    for j, i in enumerate(train):
        for layer in (3, 8):
            want = maps[layer][j].permute(1, 2, 0).numpy()
            got = view.read_example(i, layer).astype(np.float32)
            np.testing.assert_allclose(got, want, atol=2e-2, rtol=1e-2)
            assert not np.allclose(got, reader.read_example(i, layer).astype(np.float32), atol=2e-2)
    held_out = next(i for i, s in enumerate(splits) if s != "train")
    np.testing.assert_array_equal(view.read_example(held_out, 8), reader.read_example(held_out, 8))
    reader.lease.release()
    result.release()
