"""Model construction details that the trainer relies on."""
from accelbench.cases import PRESETS
from accelbench.train.model import fix_generation_config


def _tiny():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration._from_config(PRESETS["tiny"].llava_config(image_token_id=1023))


def test_sampling_settings_without_do_sample_are_made_consistent(tmp_path):
    model = _tiny()
    model.generation_config.temperature, model.generation_config.top_p = 0.9, 0.6  # as Vicuna ships them
    adjustments = fix_generation_config(model)
    assert model.generation_config.do_sample is True
    assert len(adjustments) == 1 and adjustments[0].what == "generation_config.do_sample"
    assert "temperature" in adjustments[0].why and "top_p" in adjustments[0].why
    model.save_pretrained(tmp_path)  # saving must not fail
    assert (tmp_path / "generation_config.json").exists()


def test_default_generation_config_is_left_alone():
    model = _tiny()
    assert fix_generation_config(model) == [] and not model.generation_config.do_sample
