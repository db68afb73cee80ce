"""Image backbones through the whole extraction path (Ray actors -> Zarr): CNN feature maps and ViT tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import write_config
from unipt.extract.backbones import load_backbone
from unipt.extract.spec import BackboneLoadSpec
from unipt.pipeline import experiment
from unipt.pipeline.cache.opener import open_cache
from unipt.pipeline.config import load_config
from unipt.pipeline.errors import UniptError

pytestmark = pytest.mark.slow

MNIST = "bundled:mnist_5k"
# A seeded sample in which every digit of val/test also has training examples (loading refuses a class
# that only val/test hold; with content-grouped splits 24 was such a sample).
LIMIT = 30


def _image_config(tmp_path, backbone: str, **backbone_options):
    path = write_config(
        tmp_path / "images.yaml",
        MNIST,
        backbone,
        tmp_path,
        dataset={"source": MNIST, "id_column": None, "limit": LIMIT},
        backbone={"name_or_path": backbone, "batch_size": 8, **backbone_options},
        extract={"shard_size": 10, "chunk_rows": 64},
    )
    return experiment.prepare(load_config(path))


def test_efficientnet_stages_land_as_feature_maps(ray_session, tmp_path):
    prep = _image_config(tmp_path, "bundled:efficientnet-lite0", layers=[3, 4, 8])
    result = experiment.extract(prep, progress=False)
    reader = open_cache(result.path)
    assert reader.layers == [3, 4, 8] and reader.hidden_sizes == {3: 40, 4: 80, 8: 1280}
    assert reader.attrs["grids"] == {"3": [14, 14], "4": [7, 7], "8": [4, 4]}
    assert reader.attrs["backbone"]["input"] == "image" and reader.num_examples == LIMIT

    backbone = load_backbone(BackboneLoadSpec("bundled:efficientnet-lite0", device="cpu"))
    images = prep.dataset.table.column("image").to_pylist()
    # The cache holds, per image, exactly the stage outputs the hooks give (fp16), shaped [H, W, C].
    for start in (0, 10, 20):
        maps = backbone.feature_maps(images[start : start + 4], [3, 4, 8])
        for layer, batch in maps.items():
            for i in range(batch.shape[0]):
                want = batch[i].permute(1, 2, 0).to(torch.float16).numpy()
                np.testing.assert_allclose(
                    reader.read_example(start + i, layer).astype(np.float32),
                    want.astype(np.float32),
                    atol=2e-2,
                )
    assert experiment.extract(prep, progress=False).cache_hit  # the second request loads no backbone


def test_vit_tokens_land_as_sequences(ray_session, tmp_path, tiny_vit_dir):
    prep = _image_config(tmp_path, str(tiny_vit_dir))
    reader = open_cache(experiment.extract(prep, progress=False).path)
    assert reader.layers == [0, 1, 2] and reader.attrs["grids"] == {}
    assert reader.examples.column("length").to_pylist() == [17] * LIMIT  # 16 patches + CLS
    backbone = load_backbone(BackboneLoadSpec(str(tiny_vit_dir), device="cpu"))
    images = prep.dataset.table.column("image").to_pylist()
    encoded = backbone.encode(images[10:20], [0, 1, 2], 17, 8)  # the second shard, in one call like a worker
    for layer in (0, 2):
        rows = np.concatenate([reader.read_example(i, layer) for i in range(10, 20)])
        np.testing.assert_array_equal(rows, encoded.layers[layer])


def test_a_text_backbone_on_images_is_one_clear_error(ray_session, tmp_path, tiny_bert_dir):
    prep = _image_config(tmp_path, str(tiny_bert_dir))
    with pytest.raises(UniptError, match="reads texts but the dataset holds images"):
        experiment.extract(prep, progress=False)
    assert prep.cache_root.keys() == []
