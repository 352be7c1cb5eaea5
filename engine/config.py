"""Configuration: one dataclass per network, parsed from the checkpoint's own files.

Every value that the checkpoint ships (``config.json``, ``generation_config.json``,
``speech_tokenizer/config.json``) is read from it; the official code's constructor defaults are
wrong for the released models (spec §8), so a missing required field is an error here, not a
silent default. The only defaults below are architecture constants that the real files leave
out (the speaker encoder's ECAPA-TDNN layout, the Mimi SEANet layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.sampling import SamplingParams


class ConfigError(ValueError):
    """A checkpoint config file is missing, unreadable or lacks a required value."""


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: required field {key!r} is missing")
    return d[key]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path} not found") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


@dataclass(frozen=True)
class TransformerConfig:
    """A Qwen3 decoder stack (the talker and the code predictor share this block)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> TransformerConfig:
        return cls(
            hidden_size=_require(d, "hidden_size", where),
            num_layers=_require(d, "num_hidden_layers", where),
            num_heads=_require(d, "num_attention_heads", where),
            num_kv_heads=_require(d, "num_key_value_heads", where),
            head_dim=_require(d, "head_dim", where),
            intermediate_size=_require(d, "intermediate_size", where),
            rms_norm_eps=float(_require(d, "rms_norm_eps", where)),
            rope_theta=float(_require(d, "rope_theta", where)),
            max_position_embeddings=_require(d, "max_position_embeddings", where),
            vocab_size=_require(d, "vocab_size", where),
        )


@dataclass(frozen=True)
class CodecSpecialIds:
    """Control rows of the talker's codec embedding (ids above the codebook)."""

    pad: int
    bos: int
    eos: int
    think: int
    nothink: int
    think_bos: int
    think_eos: int


@dataclass(frozen=True)
class TalkerConfig:
    transformer: TransformerConfig
    text_vocab_size: int
    text_hidden_size: int
    num_code_groups: int
    codec: CodecSpecialIds
    language_ids: dict[str, int]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TalkerConfig:
        where = "config.json talker_config"
        rope_scaling = d.get("rope_scaling") or {}
        # Interleaved M-RoPE with three identical position streams reduces exactly to 1-D RoPE
        # (spec §1.1); anything else would need a real M-RoPE implementation.
        if rope_scaling.get("rope_type", "default") != "default":
            raise ConfigError(f"{where}: unsupported rope_scaling {rope_scaling}")
        return cls(
            transformer=TransformerConfig.from_dict(d, where),
            text_vocab_size=_require(d, "text_vocab_size", where),
            text_hidden_size=_require(d, "text_hidden_size", where),
            num_code_groups=_require(d, "num_code_groups", where),
            codec=CodecSpecialIds(
                pad=_require(d, "codec_pad_id", where),
                bos=_require(d, "codec_bos_id", where),
                eos=_require(d, "codec_eos_token_id", where),
                think=_require(d, "codec_think_id", where),
                nothink=_require(d, "codec_nothink_id", where),
                think_bos=_require(d, "codec_think_bos_id", where),
                think_eos=_require(d, "codec_think_eos_id", where),
            ),
            language_ids={k.lower(): v for k, v in _require(d, "codec_language_id", where).items()},
        )


@dataclass(frozen=True)
class CodePredictorConfig:
    transformer: TransformerConfig
    num_code_groups: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodePredictorConfig:
        where = "config.json code_predictor_config"
        return cls(
            transformer=TransformerConfig.from_dict(d, where),
            num_code_groups=_require(d, "num_code_groups", where),
        )


@dataclass(frozen=True)
class SpeakerEncoderConfig:
    """ECAPA-TDNN x-vector encoder. The real config.json only carries enc_dim and sample_rate;
    the rest is the fixed ECAPA layout (spec §1.4), overridable for tiny test checkpoints."""

    enc_dim: int
    sample_rate: int
    mel_dim: int = 128
    enc_channels: tuple[int, ...] = (512, 512, 512, 512, 1536)
    enc_kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    enc_dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 128
    enc_res2net_scale: int = 8
    enc_se_channels: int = 128

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeakerEncoderConfig:
        where = "config.json speaker_encoder_config"
        extra = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()
                 if k in cls.__dataclass_fields__ and k not in ("enc_dim", "sample_rate")}
        return cls(enc_dim=_require(d, "enc_dim", where), sample_rate=_require(d, "sample_rate", where),
                   **extra)


def _fill_from_raw(obj: Any, where: str, renames: dict[str, str] | None = None) -> None:
    """Set every non-init field of a frozen dataclass from ``obj.raw`` (lists become tuples)."""
    renames = renames or {}
    for f in fields(obj):
        if f.init:
            continue
        value = _require(obj.raw, renames.get(f.name, f.name), where)
        object.__setattr__(obj, f.name, tuple(value) if isinstance(value, list) else value)


def _check(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: unsupported {what}")


@dataclass(frozen=True)
class CodecEncoderConfig:
    """Mimi encoder (audio → codes), the ``encoder_config`` block of speech_tokenizer/config.json.

    Built from the raw block (``CodecEncoderConfig(raw)``); every field below is read from it
    and required. Fields carry the file's own names, except ``frame_rate`` (``_frame_rate``).
    Mimi fields that only matter for training or for the Mimi decoder (not shipped) are ignored.
    """

    raw: dict[str, Any] = field(repr=False, compare=False)
    sampling_rate: int = field(init=False)
    audio_channels: int = field(init=False)
    frame_rate: float = field(init=False)
    # SEANet conv encoder
    num_filters: int = field(init=False)
    kernel_size: int = field(init=False)
    residual_kernel_size: int = field(init=False)
    last_kernel_size: int = field(init=False)
    num_residual_layers: int = field(init=False)
    dilation_growth_rate: int = field(init=False)
    compress: int = field(init=False)
    upsampling_ratios: tuple[int, ...] = field(init=False)  # applied in reverse order when encoding
    pad_mode: str = field(init=False)
    use_causal_conv: bool = field(init=False)
    use_conv_shortcut: bool = field(init=False)
    # transformer
    hidden_size: int = field(init=False)
    num_hidden_layers: int = field(init=False)
    num_attention_heads: int = field(init=False)
    num_key_value_heads: int = field(init=False)
    head_dim: int = field(init=False)
    intermediate_size: int = field(init=False)
    hidden_act: str = field(init=False)
    norm_eps: float = field(init=False)
    rope_theta: float = field(init=False)
    sliding_window: int = field(init=False)  # NOT applied by the reference (spec §5.2)
    # split residual vector quantizer
    num_quantizers: int = field(init=False)
    num_semantic_quantizers: int = field(init=False)
    codebook_size: int = field(init=False)
    codebook_dim: int = field(init=False)
    vector_quantization_hidden_dimension: int = field(init=False)

    def __post_init__(self) -> None:
        where = "speech_tokenizer/config.json encoder_config"
        _fill_from_raw(self, where, {"frame_rate": "_frame_rate"})
        _check(self.audio_channels == 1, where, f"audio_channels {self.audio_channels}")
        _check(self.use_causal_conv, where, "non-causal convolutions")
        _check(self.pad_mode == "constant", where, f"pad_mode {self.pad_mode!r}")
        _check(not self.use_conv_shortcut, where, "use_conv_shortcut")
        _check(self.hidden_act == "gelu", where, f"hidden_act {self.hidden_act!r}")
        _check(self.codebook_dim == self.vector_quantization_hidden_dimension, where,
               "codebook_dim != vector_quantization_hidden_dimension")


@dataclass(frozen=True)
class CodecDecoderConfig:
    """Causal codec decoder (codes → 24 kHz waveform), ``decoder_config`` block.

    Built from the raw block (``CodecDecoderConfig(raw)``); every field is required: the
    official constructor defaults are wrong for the release (spec §8) and ``codebook_dim`` /
    ``head_dim`` have none. The decoder's codebooks are ``codebook_dim // 2`` wide.
    """

    raw: dict[str, Any] = field(repr=False, compare=False)
    codebook_size: int = field(init=False)
    codebook_dim: int = field(init=False)
    num_quantizers: int = field(init=False)
    latent_dim: int = field(init=False)
    decoder_dim: int = field(init=False)
    hidden_size: int = field(init=False)
    intermediate_size: int = field(init=False)
    num_hidden_layers: int = field(init=False)
    num_attention_heads: int = field(init=False)
    num_key_value_heads: int = field(init=False)
    head_dim: int = field(init=False)
    hidden_act: str = field(init=False)
    attention_bias: bool = field(init=False)
    rms_norm_eps: float = field(init=False)
    rope_theta: float = field(init=False)
    sliding_window: int = field(init=False)
    upsampling_ratios: tuple[int, ...] = field(init=False)  # ConvTranspose+ConvNeXt stages
    upsample_rates: tuple[int, ...] = field(init=False)  # vocoder blocks

    def __post_init__(self) -> None:
        where = "speech_tokenizer/config.json decoder_config"
        _fill_from_raw(self, where)
        _check(self.hidden_act == "silu", where, f"hidden_act {self.hidden_act!r}")
        _check(not self.attention_bias, where, "attention_bias")
        _check(self.codebook_dim % 2 == 0, where, f"odd codebook_dim {self.codebook_dim}")


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    encoder: CodecEncoderConfig
    decoder: CodecDecoderConfig
    num_quantizers: int  # codes per frame that the talker uses (encoder_valid_num_quantizers)
    sample_rate: int
    samples_per_frame: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeechTokenizerConfig:
        where = "speech_tokenizer/config.json"
        if d.get("model_type") != "qwen3_tts_tokenizer_12hz":
            raise ConfigError(f"{where}: model_type {d.get('model_type')!r} is not qwen3_tts_tokenizer_12hz")
        up = _require(d, "decode_upsample_rate", where)
        if up != _require(d, "encode_downsample_rate", where):
            raise ConfigError(f"{where}: encode and decode rates differ")
        return cls(
            encoder=CodecEncoderConfig(_require(d, "encoder_config", where)),
            decoder=CodecDecoderConfig(_require(d, "decoder_config", where)),
            num_quantizers=_require(d, "encoder_valid_num_quantizers", where),
            sample_rate=_require(d, "output_sample_rate", where),
            samples_per_frame=up,
        )


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json: the sampling a request gets unless it asks otherwise, and the frame cap."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 8192

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationDefaults:
        names = {"subtalker_dosample": "subtalker_do_sample"}
        kwargs = {names.get(k, k): v for k, v in d.items()}
        known = set(SamplingParams.__dataclass_fields__) - {"seed"}  # a seed is a request's, never a default
        return cls(sampling=SamplingParams(**{k: v for k, v in kwargs.items() if k in known}),
                   max_new_tokens=kwargs.get("max_new_tokens", cls.max_new_tokens))


@dataclass(frozen=True)
class TextSpecialIds:
    im_start: int
    im_end: int
    assistant: int
    tts_pad: int
    tts_bos: int
    tts_eos: int


@dataclass(frozen=True)
class ModelConfig:
    """Everything a Qwen3-TTS-12Hz Base checkpoint directory says about itself."""

    talker: TalkerConfig
    code_predictor: CodePredictorConfig
    speaker_encoder: SpeakerEncoderConfig
    speech_tokenizer: SpeechTokenizerConfig
    generation: GenerationDefaults
    text_ids: TextSpecialIds
    model_size: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        root = Path(path)
        d = _read_json(root / "config.json")
        where = "config.json"
        if d.get("model_type") != "qwen3_tts":
            raise ConfigError(f"{where}: model_type {d.get('model_type')!r} is not qwen3_tts")
        if d.get("tokenizer_type") != "qwen3_tts_tokenizer_12hz":
            raise ConfigError(f"{where}: only 12 Hz checkpoints are supported, got {d.get('tokenizer_type')!r}")
        if d.get("tts_model_type", "base") != "base":
            raise ConfigError(f"{where}: only Base (voice-cloning) checkpoints are supported, "
                              f"got tts_model_type {d.get('tts_model_type')!r}")
        talker_d = _require(d, "talker_config", where)
        gen_path = root / "generation_config.json"
        return cls(
            talker=TalkerConfig.from_dict(talker_d),
            code_predictor=CodePredictorConfig.from_dict(_require(talker_d, "code_predictor_config", where)),
            speaker_encoder=SpeakerEncoderConfig.from_dict(_require(d, "speaker_encoder_config", where)),
            speech_tokenizer=SpeechTokenizerConfig.from_dict(_read_json(root / "speech_tokenizer" / "config.json")),
            generation=GenerationDefaults.from_dict(_read_json(gen_path)) if gen_path.exists()
            else GenerationDefaults(),
            text_ids=TextSpecialIds(
                im_start=_require(d, "im_start_token_id", where),
                im_end=_require(d, "im_end_token_id", where),
                assistant=_require(d, "assistant_token_id", where),
                tts_pad=_require(d, "tts_pad_token_id", where),
                tts_bos=_require(d, "tts_bos_token_id", where),
                tts_eos=_require(d, "tts_eos_token_id", where),
            ),
            model_size=d.get("tts_model_size", ""),
            raw=d,
        )


@dataclass(frozen=True)
class EngineConfig:
    """How the serving engine runs a model: one dataclass for every knob, with the reasons."""

    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU (bf16 matmul is ~50x slower there), bfloat16 on CUDA
    # torch intra-op threads on CPU. One thread already streams weights at full memory bandwidth
    # here, while two make every small op wait at a barrier for a core that the event loop, the
    # codec or another process holds: measured on the 2-core box, a batch-1 predictor frame took
    # 0.36 s with 1 thread and 1.4 s with 2 while one other process was busy.
    cpu_threads: int | None = 1  # None: leave torch's default
    block_size: int = 16  # KV positions per block; small blocks waste little on short TTS turns
    num_kv_blocks: int | None = None  # None: from kv_cache_gb
    # Memory for the talker's paged KV pool when num_kv_blocks is None. None: 1 GB on CPU (~18k
    # positions in fp32, plenty for the few sessions a CPU serves); on CUDA half the free memory after
    # loading, at most 16 GB (~145k positions in bf16: 128 sessions of a minute of audio each).
    kv_cache_gb: float | None = None
    max_running: int = 64  # sessions decoded together in one step
    # Token budget per step: decodes first (one row each, at most max_running), then prefill chunks. Why
    # 512: a talker forward reads every weight once, and in bf16 each row adds 1 FLOP per weight byte, so
    # up to the GPU's ridge point (~200-300 FLOP/byte on an H100/H200) extra rows are almost free; 512 rows
    # keeps a step with a prefill chunk within ~2x a decode-only step, so running streams never wait on a
    # long prompt, while a typical prompt (60-300 rows) still goes in in one step.
    max_batched_tokens: int = 512
    # Chunk schedule in frames (80 ms each): small first chunks for time to first audio, larger ones
    # later so that per-chunk overhead stays low; the last entry repeats. A stream whose listener would
    # run dry before its next full chunk gets what is ready early (engine/codec_stream.py).
    chunk_frames: tuple[int, ...] = (1, 2, 4, 8, 12)
    # Send early when a listener would otherwise run dry (see engine/codec_stream.py). Off: chunk
    # boundaries follow the schedule alone, so two runs of a request chunk (and round) identically.
    deadline_flush: bool = True
    output_queue_chunks: int = 32  # per-request bound; a full queue pauses only that request
    frames_per_text_token: int = 12  # runaway guard: cap = min_frame_cap + this x text tokens
    min_frame_cap: int = 40
    max_sequence_len: int = 8192  # prompt + frames a request may occupy in the KV cache
    # Decode rows run through the fixed-shape function of their batch bucket (engine/cuda_graphs.py), on
    # CUDA replayed from CUDA graphs; off, the same functions run at the exact row count, uncaptured: for
    # debugging or to measure what the graphs buy (counted as decode_rows{path=eager}).
    cuda_graphs: bool = True
