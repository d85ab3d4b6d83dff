"""Model loading (diffusers layout, clear errors) and the prompt-embedding LRU cache."""

from __future__ import annotations

import shutil

import pytest
import torch
from ditstream.engine.config import ModelConfig
from ditstream.engine.errors import ModelLoadError
from ditstream.engine.loader import check_folder, load_components, resolve_dtype, resolve_source
from ditstream.engine.prompt_cache import PromptCache


def test_loads_real_classes_from_diffusers_layout(tiny_components):
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    c = tiny_components
    assert isinstance(c.transformer, SanaTransformer2DModel)
    assert isinstance(c.vae, AutoencoderDC)
    assert type(c.text_encoder).__name__ == "Gemma2Model"
    assert c.sigma_data == 0.5 and c.vae_scale_factor == 2 and c.latent_channels == 4
    assert c.complex_human_instruction is None  # ditstream.json turned it off
    assert not any(p.requires_grad for p in c.transformer.parameters())


def test_partial_folder_names_every_missing_part(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError) as err:
        check_folder(broken)
    assert "vae/" in err.value.message and "transformer/ weights" in err.value.message
    with pytest.raises(ModelLoadError):
        load_components(ModelConfig(model=str(tmp_path / "nope")))


def test_ditstream_json_sets_the_two_step_angle_and_rejects_a_bad_one(tmp_path, tiny_model_dir):
    import json
    import math

    from ditstream.engine import plan
    from ditstream.engine.config import StreamConfig

    assert load_components(ModelConfig(model=str(tiny_model_dir))).intermediate_angle == pytest.approx(1.3)
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    extra_path = model / "ditstream.json"
    extra = json.loads(extra_path.read_text()) if extra_path.is_file() else {}
    extra_path.write_text(json.dumps({**extra, "intermediate_angle": 0.8}))
    c = load_components(ModelConfig(model=str(model)))
    p = plan.make_plan(StreamConfig(prompt="x", mode="txt2img", steps=2, width=16, height=16), c, PromptCache(c))
    assert p.angles.tolist() == pytest.approx([math.pi / 2, 0.8])
    for bad in (2.0, 0, "1.0", True):
        extra_path.write_text(json.dumps({**extra, "intermediate_angle": bad}))
        with pytest.raises(ModelLoadError, match="intermediate_angle"):
            load_components(ModelConfig(model=str(model)))


def test_hub_id_offline_gives_a_clear_error():
    assert resolve_source("Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers") == \
        "Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers"
    with pytest.raises(ModelLoadError, match="could not load"):
        load_components(ModelConfig(model="nobody-here/no-such-model"))


def test_dtype_rules():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ModelLoadError):
        resolve_dtype("int3", cpu)


def test_prompt_cache_encodes_once_and_evicts_lru(tiny_components):
    cache = PromptCache(tiny_components, max_size=2)
    e1, m1 = cache.get("a red circle")
    e1b, _ = cache.get("a red circle")
    assert e1b is e1 and cache.hits == 1 and cache.misses == 1
    assert m1.shape == (1, 300) and int(m1.sum()) == 3
    cache.get("a blue square")
    cache.get("a red circle")  # refresh: now "a blue square" is the oldest
    cache.get("a green star")
    assert len(cache) == 2
    cache.get("a red circle")
    assert cache.misses == 3  # red circle stayed cached
    cache.get("a blue square")
    assert cache.misses == 4  # blue square had been evicted
