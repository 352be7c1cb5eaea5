"""The checkpoint presets ``make-random-checkpoint`` writes: one folder of config files each.

Torch-free, so the CLI can list the choices without loading the engine.
"""

# Preset → the size family whose generation_config.json, speech tokenizer and text vocabulary it
# shares (every variant of a size ships the same ones); each preset has its own config.json. Tiny
# presets mirror the release variants at test size: "tiny-custom-voice" takes instructions like
# 1.7B; "tiny-0.6b-custom-voice" (tts_model_size "0b6") does not, and its code predictor is as wide
# as its talker like 0.6B (``small_to_mtp_projection`` is then an Identity without weights); the
# other tiny talkers are wider than their predictor like 1.7B, "tiny-1.7b-base" wider still.
PRESETS = {
    "tiny": "tiny", "tiny-1.7b-base": "tiny", "tiny-custom-voice": "tiny", "tiny-0.6b-custom-voice": "tiny",
    "tiny-voice-design": "tiny",
    "0.6b-base": "0.6b-base", "0.6b-custom-voice": "0.6b-base",
    "1.7b-base": "0.6b-base", "1.7b-custom-voice": "0.6b-base", "1.7b-voice-design": "0.6b-base",
}
