"""Qwen3-TTS-Tokenizer-12Hz: the codec that turns reference audio into codes (encoder) and
generated codes into audio (decoder). Its checkpoint is ``speech_tokenizer/model.safetensors``
(fp32, keys ``encoder.*`` and ``decoder.*``, spec §3.2); it runs in fp32.

One frame = 16 codes = 1920 samples at 24 kHz (80 ms).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import SpeechTokenizerConfig
from engine.models.codec_decoder import CHUNK_SIZE, LEFT_CONTEXT, CodecDecoder
from engine.models.codec_encoder import CodecEncoder


class SpeechTokenizer(nn.Module):
    def __init__(self, cfg: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_quantizers = cfg.num_quantizers
        self.samples_per_frame = cfg.samples_per_frame
        self.encoder = CodecEncoder(cfg.encoder, cfg.num_quantizers)
        self.decoder = CodecDecoder(cfg.decoder)
        for name, part in (("encoder", self.encoder), ("decoder", self.decoder)):
            if part.samples_per_frame != cfg.samples_per_frame:
                raise ValueError(f"speech tokenizer {name} works in frames of {part.samples_per_frame} "
                                 f"samples, the config says {cfg.samples_per_frame}")
        if self.decoder.num_quantizers != cfg.num_quantizers:
            raise ValueError(f"decoder takes {self.decoder.num_quantizers} codes per frame, "
                             f"encoder_valid_num_quantizers is {cfg.num_quantizers}")

    @property
    def device(self) -> torch.device:
        return self.decoder.pre_conv.conv.weight.device

    def num_frames(self, num_samples: int) -> int:
        return -(-num_samples // self.samples_per_frame)

    # --- encode -------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [n] float at 24 kHz (mono, [-1, 1]) → codes [ceil(n / 1920), 16] int64."""
        if audio.dim() != 1:
            raise ValueError(f"expected mono audio [n], got shape {tuple(audio.shape)}")
        if audio.numel() == 0:
            return torch.zeros(0, self.num_quantizers, dtype=torch.long, device=self.device)
        return self.encoder(audio.to(self.device, torch.float32)[None])[0].transpose(0, 1).contiguous()

    @torch.inference_mode()
    def encode_batch(self, audios: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several clips in one pass, as the official batched encode does it: right-pad with
        zeros to the longest, encode, keep ``ceil(n_i / 1920)`` frames of row i.

        Rows shorter than the longest can differ from ``encode(row)`` in their last frame:
        past the end of a clip the batch holds conv outputs of the zero padding, where a lone
        encode pads every conv's input with zeros (or edge copies) instead. This is also how
        the official code behaves; use :meth:`encode` per clip when that matters.
        """
        if not audios:
            return []
        longest = max(a.numel() for a in audios)
        if longest == 0:
            return [self.encode(a) for a in audios]
        batch = torch.zeros(len(audios), longest, device=self.device)
        for i, a in enumerate(audios):
            batch[i, : a.numel()] = a.to(self.device, torch.float32)
        codes = self.encoder(batch).transpose(1, 2)
        return [codes[i, : self.num_frames(a.numel())] for i, a in enumerate(audios)]

    # --- decode -------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, chunk_size: int = CHUNK_SIZE,
               left_context: int = LEFT_CONTEXT) -> torch.Tensor:
        """codes [T, 16] → audio [1920·T] float32 in [-1, 1], equal to the official ``decode``.

        The official decode always works in chunks of 300 frames with 25 frames of re-decoded
        left context (see ``CodecDecoder.chunked_decode``); the defaults reproduce it.
        """
        return self.decode_batch([codes], chunk_size, left_context)[0]

    @torch.inference_mode()
    def decode_batch(self, codes: list[torch.Tensor], chunk_size: int = CHUNK_SIZE,
                     left_context: int = LEFT_CONTEXT) -> list[torch.Tensor]:
        """Several code sequences [T_i, 16] in one pass → audio [1920·T_i] each.

        Rows are right-padded with code 0 (the official pads with −1 and clamps to 0); the
        decoder is causal and chunks start at the same frames in every row, so each row equals
        its own :meth:`decode`.
        """
        for c in codes:
            if c.dim() != 2 or c.shape[1] != self.num_quantizers:
                raise ValueError(f"expected codes [T, {self.num_quantizers}], got shape {tuple(c.shape)}")
        longest = max((c.shape[0] for c in codes), default=0)
        if longest == 0:
            return [torch.zeros(0, device=self.device) for _ in codes]
        batch = torch.zeros(len(codes), self.num_quantizers, longest, dtype=torch.long, device=self.device)
        for i, c in enumerate(codes):
            batch[i, :, : c.shape[0]] = c.to(self.device).transpose(0, 1)
        audio = self.decoder.chunked_decode(batch, chunk_size, left_context)[:, 0]
        return [audio[i, : c.shape[0] * self.samples_per_frame] for i, c in enumerate(codes)]
