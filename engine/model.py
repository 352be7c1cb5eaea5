"""A loaded checkpoint: config, text tokenizer, the networks, and the operations built on them
(voice prompts, one-shot synthesis). Everything above the engine talks to this object."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.api import ModelInfo
from engine.audio import AudioError
from engine.checkpoint import build_on_meta, load_strict, resolve_model
from engine.config import ModelConfig
from engine.generate import GenerationResult, Trace, default_max_frames, generate_codes
from engine.models.qwen3_tts import Qwen3TTS
from engine.models.speech_tokenizer import SpeechTokenizer
from engine.precision import WeightPlan, plan_weights
from engine.prompt import UnsupportedByModel, build_prompt, offer
from engine.sampling import SamplingParams
from engine.text import TextTokenizer
from engine.voice import VoicePrompt


def default_dtype(device: torch.device) -> torch.dtype:
    # The compute (activation) dtype. On CPU it stays fp32 whatever the weights are: bf16 and int8
    # weights are a matter of the projections alone (engine/precision.py), and the norms, attention
    # and KV cache keep fp32's numbers at a cost that is small next to the weights' bytes.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Synthesis:
    audio: np.ndarray  # float32 mono at ``sample_rate``
    sample_rate: int
    codes: torch.Tensor  # [frames, 16], generated frames only
    stop_reason: str
    generation: GenerationResult
    decode_seconds: float


class TTSModel:
    def __init__(self, path: Path, cfg: ModelConfig, tokenizer: TextTokenizer, tts: Qwen3TTS,
                 speech_tokenizer: SpeechTokenizer, device: torch.device, dtype: torch.dtype,
                 weight_plan: WeightPlan) -> None:
        self.path, self.cfg, self.tokenizer = path, cfg, tokenizer
        self.tts, self.speech_tokenizer = tts, speech_tokenizer
        self.device, self.dtype = device, dtype
        self.weight_plan = weight_plan  # the projections' weight format and why

    @classmethod
    def load(cls, model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             weights: str | None = None) -> TTSModel:
        """``dtype``: the compute dtype (default: fp32 on CPU, bf16 on CUDA). ``weights``: the talker's
        projection weights, fp32 / bf16 / int8, or None / "auto" to let engine/precision.py choose
        from the CPU (an explicit ``dtype`` alone then means weights in that dtype)."""
        path = resolve_model(str(model))
        device = torch.device(device)
        weight_plan = plan_weights(device, dtype, weights)
        dtype = dtype or default_dtype(device)
        if device.type == "cuda":
            # cuDNN runs fp32 convolutions in TF32 unless told not to: the codec and speaker encoder
            # then drift ~4e-4 from the fp32 reference (seen on an H200), and a streamed chunk no longer
            # equals the full decode. Both nets are small next to the talker; exact fp32 costs little.
            torch.backends.cudnn.allow_tf32 = False
        cfg = ModelConfig.from_dir(path)
        tokenizer = TextTokenizer.from_dir(path)
        tts = load_strict(build_on_meta(lambda: Qwen3TTS(cfg)), path / "model.safetensors", device, dtype)
        tts.talker.fuse_weights_(weight_plan.weights)
        # int8 / bf16 weights are the talker's projections only. The codec runs in fp32 everywhere:
        # it is small, and its output is the product.
        speech_tokenizer = load_strict(build_on_meta(lambda: SpeechTokenizer(cfg.speech_tokenizer)),
                                       path / "speech_tokenizer" / "model.safetensors", device, torch.float32)
        return cls(path, cfg, tokenizer, tts, speech_tokenizer, device, dtype, weight_plan)

    @property
    def sample_rate(self) -> int:
        return self.cfg.speech_tokenizer.sample_rate

    @property
    def info(self) -> ModelInfo:
        cfg = self.cfg
        return ModelInfo(model_type=cfg.model_type, model_size=cfg.model_size, speakers=cfg.speakers,
                         takes_instructions=cfg.takes_instructions, clones_voices=self.tts.speaker_encoder is not None)

    def warm_up_voice(self) -> dict[str, object]:
        """The voice fields of a ``Request`` this model serves whatever its variant (a silent x-vector,
        its first speaker, or nothing), for warm-ups and benchmarks."""
        if self.cfg.model_type == "base":
            return {"voice": VoicePrompt(speaker_embedding=torch.zeros(self.cfg.talker.transformer.hidden_size))}
        if self.cfg.model_type == "custom_voice":
            return {"speaker": self.cfg.speakers[0]}
        return {}

    @torch.inference_mode()
    def voice_prompt(self, audio_24k: np.ndarray, ref_text: str | None = None,
                     x_vector_only: bool = False) -> VoicePrompt:
        """Speaker embedding (+ reference codes and transcript ids for ICL) from 24 kHz mono audio."""
        if self.tts.speaker_encoder is None:
            raise UnsupportedByModel("UNSUPPORTED_BY_MODEL", f"cannot clone a voice: {offer(self.cfg)}")
        if not x_vector_only and not ref_text:
            raise ValueError("ICL voice cloning needs the reference transcript (or use x-vector-only mode)")
        wave = torch.from_numpy(np.ascontiguousarray(audio_24k, dtype=np.float32)).to(self.device)
        speaker = self.tts.speaker_encoder.embed(wave).float()  # mel from fp32 audio, as official
        if not torch.isfinite(speaker).all():
            raise AudioError("INVALID_AUDIO", "the reference audio gives a non-finite speaker embedding "
                                              "(samples far outside [-1, 1]?)")
        if x_vector_only:
            return VoicePrompt(speaker_embedding=speaker)
        codes = self.speech_tokenizer.encode(wave)
        return VoicePrompt(speaker_embedding=speaker, ref_codes=codes.cpu(),
                           ref_text_ids=self.tokenizer.ref_ids(ref_text))

    def sampling(self, greedy: bool = False, **overrides: object) -> SamplingParams:
        params = self.cfg.generation.sampling.with_overrides(**overrides)
        params.validate()
        return params.greedy() if greedy else params

    def sampling_from_options(self, greedy: bool = False, seed: int | None = None, temperature: float | None = None,
                              top_k: int | None = None, top_p: float | None = None,
                              repetition_penalty: float | None = None) -> SamplingParams:
        """The user-facing options of `synthesize` (flags or a JSONL line) over the checkpoint's defaults."""
        params = self.cfg.generation.sampling.with_user_options(greedy, seed, temperature, top_k, top_p,
                                                               repetition_penalty)
        params.validate()
        return params

    def max_frames_for(self, text_ids: list[int]) -> int:
        return default_max_frames(len(text_ids), self.cfg.generation.max_new_tokens)

    @torch.inference_mode()
    def synthesize(self, text: str, voice: VoicePrompt | None, language: str = "auto",
                   sampling: SamplingParams | None = None, max_frames: int | None = None,
                   non_streaming_text: bool = False, trace: Trace | None = None, speaker: str | None = None,
                   instruct: str | None = None, on_frame: Callable[[int], None] | None = None) -> Synthesis:
        """One utterance through the reference path: prompt → codes → waveform (``on_frame(n)``
        after each of the n frames generated, for progress)."""
        text_ids = self.tokenizer.target_ids(text)
        prompt = build_prompt(self.tts.talker, self.cfg, self.tokenizer.role_ids(), text_ids, voice, language,
                              non_streaming_text, speaker, self.tokenizer.instruct_ids(instruct))
        result = generate_codes(self.tts.talker, prompt, sampling or self.sampling(),
                                max_frames or self.max_frames_for(text_ids), trace, on_frame)
        t0 = time.perf_counter()
        audio = self.decode(result.codes, voice)
        return Synthesis(audio=audio, sample_rate=self.sample_rate, codes=result.codes,
                         stop_reason=result.stop_reason, generation=result, decode_seconds=time.perf_counter() - t0)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, voice: VoicePrompt | None = None) -> np.ndarray:
        """Waveform of generated codes. ICL decodes reference + generated codes together (the
        reference is the decoder's left context) and cuts the reference part, as the official
        code does: ``int(T_ref / T_total * n_samples)`` samples."""
        if codes.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        if voice is None or not voice.is_icl:
            return self.speech_tokenizer.decode(codes.to(self.device)).float().cpu().numpy()
        full = torch.cat([voice.ref_codes.to(codes), codes]).to(self.device)
        wave = self.speech_tokenizer.decode(full).float().cpu().numpy()
        cut = int(voice.ref_codes.shape[0] / full.shape[0] * wave.shape[0])
        return wave[cut:]
