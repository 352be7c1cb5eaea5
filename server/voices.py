"""The voice registry: voices on disk (one folder per voice with a manifest.json), their voice
prompts computed once at upload, and an in-memory LRU cache with TTL of prepared prompts.

Voice ids are checked against ``protocol.VOICE_ID`` before anything else; only an id that matches it
(no dots, no slashes) ever names a folder. Inline voices (reference audio sent with a session's
start) share the cache, keyed by a hash.

Several replicas may share one voices directory (deploy/README.md), so the disk is the truth: every
lookup re-reads the voice's manifest (a miss may be a voice another replica created; a hit may have
been deleted there), creation is one atomic rename that fails if the id exists, and a delete that
finds the folder gone is VOICE_NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import logging
import re
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from engine.api import EngineError, TTSEngine
from engine.audio import SAMPLE_RATE, AudioError, load_audio_24k
from engine.voice import VoicePrompt
from server import protocol as P
from server.refaudio import check_decoded_size

log = logging.getLogger("makima.server.voices")

MANIFEST, PROMPT_FILE = "manifest.json", "prompt.safetensors"


@dataclass
class VoiceInfo:
    voice_id: str
    speaker: str  # display name as given at upload
    language: str
    ref_audio_file: str | None  # file name inside the voice folder
    transcript: str | None
    x_vector_only: bool
    duration_s: float
    created_at: float

    def public(self) -> dict:
        d = asdict(self)
        d.pop("ref_audio_file")
        return d


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", name.strip().lower()).strip("-_")[:64]


class PromptCache:
    """LRU with a TTL: hot voices stay in memory, cold ones are reloaded from disk when used."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self.size, self.ttl_s = size, ttl_s
        self._items: OrderedDict[str, tuple[VoicePrompt, float]] = OrderedDict()

    def get(self, key: str) -> VoicePrompt | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, prompt: VoicePrompt) -> None:
        self._items[key] = (prompt, time.monotonic() + self.ttl_s)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def drop(self, key: str) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


async def make_prompt(engine: TTSEngine, audio: bytes, ref_text: str | None, x_vector_only: bool,
                      max_seconds: float) -> tuple[VoicePrompt, np.ndarray]:
    """Decode reference audio (off the event loop) and ask the engine for its voice prompt; returns
    the prompt and the decoded clip (24 kHz mono, at most max_seconds), which is what gets stored."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, check_decoded_size, audio, max_seconds)
    try:
        wave: np.ndarray = await loop.run_in_executor(None, load_audio_24k, audio, max_seconds)
    except AudioError as e:
        raise P.ProtocolError(P.AUDIO_ERROR_CODES.get(e.code, P.INVALID_AUDIO), str(e)) from e
    try:
        prompt = await engine.make_voice(wave, ref_text, x_vector_only)
    except EngineError as e:
        raise P.ProtocolError(P.ENGINE_ERROR_CODES.get(e.code, P.SYNTHESIS_ERROR), str(e)) from e
    except AudioError as e:  # audio that decodes but cannot be a voice (a float WAV at 1e20: NaN x-vector)
        raise P.ProtocolError(P.AUDIO_ERROR_CODES.get(e.code, P.INVALID_AUDIO), str(e)) from e
    except ValueError as e:  # the engine's own input checks (e.g. ICL without a transcript)
        raise P.ProtocolError(P.INVALID_MESSAGE, str(e)) from e
    return prompt, wave


def wav_bytes(wave: np.ndarray) -> bytes:
    """The stored reference clip: 16-bit WAV at 24 kHz mono, 48 KB a second, whatever was uploaded."""
    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class VoiceRegistry:
    def __init__(self, root: Path | None, cache_size: int = 64, ttl_s: float = 3600.0, max_voices: int = 0,
                 max_bytes: int = 0) -> None:
        self.root = root
        self.max_voices, self.max_bytes = max_voices, max_bytes  # 0: no limit
        self.cache = PromptCache(cache_size, ttl_s)
        self._infos: dict[str, VoiceInfo] = {}  # the last seen state of each voice on disk
        self._memory: dict[str, VoicePrompt] = {}  # registered voices when there is no root
        self._lock = asyncio.Lock()

    def _read(self, folder: Path) -> VoiceInfo | None:
        """A voice folder's manifest, or None if it is not (or no longer) a whole voice."""
        try:
            info = VoiceInfo(**json.loads((folder / MANIFEST).read_text()))
            if info.voice_id != folder.name or not P.VOICE_ID.match(info.voice_id) \
                    or not (folder / PROMPT_FILE).is_file():
                raise ValueError("bad voice id or missing prompt file")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("skipping voice folder %s: %s", folder.name, e)
            return None
        return info

    def _scan(self) -> dict[str, VoiceInfo]:
        assert self.root is not None
        infos = {}
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (info := self._read(d)) is not None:
                infos[info.voice_id] = info
        return infos

    def load(self) -> int:
        """Read every manifest under root; a broken voice folder is logged and skipped."""
        if self.root is None:
            return 0
        self.root.mkdir(parents=True, exist_ok=True)
        self._infos = self._scan()
        log.info("loaded %d voice(s) from %s", len(self._infos), self.root)
        return len(self._infos)

    async def refresh(self) -> None:
        """Re-read the whole directory (off the event loop): voices other replicas created or deleted."""
        if self.root is not None:
            self._infos = await asyncio.get_running_loop().run_in_executor(None, self._scan)

    def list(self) -> list[VoiceInfo]:
        return sorted(self._infos.values(), key=lambda v: v.voice_id)

    def info(self, voice_id: str) -> VoiceInfo | None:
        """The voice as it is on disk now. One small manifest read: cheap enough for the event loop."""
        if self.root is None or not P.VOICE_ID.match(voice_id):
            return self._infos.get(voice_id) if self.root is None else None
        info = self._read(self.root / voice_id)
        if info is None:
            self._infos.pop(voice_id, None)
        else:
            self._infos[voice_id] = info
        return info

    @staticmethod
    def _cache_key(info: VoiceInfo) -> str:
        # With the creation time: a voice deleted and re-created elsewhere under the same id is a new voice.
        return f"voice:{info.voice_id}:{info.created_at!r}"

    async def prompt(self, voice_id: str) -> VoicePrompt:
        info = self.info(voice_id)
        if info is None:
            raise P.ProtocolError(P.VOICE_NOT_FOUND, f"no voice named {voice_id!r}")
        if voice_id in self._memory:
            return self._memory[voice_id]
        key = self._cache_key(info)
        prompt = self.cache.get(key)
        if prompt is None:
            assert self.root is not None
            try:
                prompt = await asyncio.get_running_loop().run_in_executor(None, VoicePrompt.load,
                                                                          self.root / voice_id / PROMPT_FILE)
            except FileNotFoundError as e:  # deleted by another replica since the manifest was read
                raise P.ProtocolError(P.VOICE_NOT_FOUND, f"no voice named {voice_id!r}") from e
            self.cache.put(key, prompt)
        return prompt

    async def inline_prompt(self, engine: TTSEngine, audio: bytes, ref_text: str | None, x_vector_only: bool,
                            max_seconds: float) -> VoicePrompt:
        key = "inline:" + hashlib.sha256(audio + b"\0" + (ref_text or "").encode() + bytes([x_vector_only])).hexdigest()
        prompt = self.cache.get(key)
        if prompt is None:
            prompt, _ = await make_prompt(engine, audio, ref_text, x_vector_only, max_seconds)
            self.cache.put(key, prompt)
        return prompt

    async def create(self, engine: TTSEngine, voice_id: str, speaker: str, audio: bytes, transcript: str | None,
                     x_vector_only: bool, language: str, max_seconds: float) -> VoiceInfo:
        if not P.VOICE_ID.match(voice_id):
            raise P.ProtocolError(P.INVALID_VOICE_ID, "voice ids are 1-64 of [a-z0-9_-], not starting with - or _")
        if self.info(voice_id) is not None:
            raise P.ProtocolError(P.VOICE_EXISTS, f"voice {voice_id!r} exists; delete it first")
        loop = asyncio.get_running_loop()
        await self._check_quota(0)  # before the engine spends time on a voice that could not be kept
        prompt, wave = await make_prompt(engine, audio, transcript, x_vector_only, max_seconds)
        info = VoiceInfo(voice_id=voice_id, speaker=speaker, language=language, ref_audio_file="reference.wav",
                         transcript=None if x_vector_only else transcript, x_vector_only=x_vector_only,
                         duration_s=round(len(wave) / SAMPLE_RATE, 3), created_at=time.time())
        async with self._lock:
            if voice_id in self._infos:  # another upload of the same id won the race
                raise P.ProtocolError(P.VOICE_EXISTS, f"voice {voice_id!r} exists; delete it first")
            if self.root is None:
                await self._check_quota(0)
                self._memory[voice_id] = prompt
            else:
                clip = await loop.run_in_executor(None, wav_bytes, wave)
                await self._check_quota(len(clip))
                if not await loop.run_in_executor(None, self._write, info, clip, prompt):
                    raise P.ProtocolError(P.VOICE_EXISTS, f"voice {voice_id!r} exists; delete it first")
                self.cache.put(self._cache_key(info), prompt)
            self._infos[voice_id] = info
        return info

    async def _check_quota(self, new_bytes: int) -> None:
        """QUOTA_EXCEEDED if one more voice of ``new_bytes`` would pass max_voices or max_bytes. Counted
        on disk, so replicas sharing the directory share the quota (each may overshoot it by the
        uploads it has in flight at that moment)."""
        if self.root is None:
            count, used = len(self._memory), 0
        else:
            count, used = await asyncio.get_running_loop().run_in_executor(None, self._usage)
        if self.max_voices and count >= self.max_voices:
            raise P.ProtocolError(P.QUOTA_EXCEEDED, f"the server holds its limit of {self.max_voices} voices; "
                                                    "delete one first")
        if self.max_bytes and used + new_bytes > self.max_bytes:
            raise P.ProtocolError(P.QUOTA_EXCEEDED, f"the voices directory is at its limit of {self.max_bytes} "
                                                    "bytes; delete a voice first")

    def _usage(self) -> tuple[int, int]:
        """Voices on disk and the bytes all their folders hold (hidden in-progress folders included)."""
        assert self.root is not None
        count = used = 0
        for d in self.root.iterdir():
            try:
                if d.is_dir():
                    used += sum(f.stat().st_size for f in d.iterdir())
                    count += not d.name.startswith(".")
            except FileNotFoundError:  # a folder being renamed or removed right now
                continue
        return count, used

    def _write(self, info: VoiceInfo, clip: bytes, prompt: VoicePrompt) -> bool:
        """Build the folder under a hidden name, then rename it into place: a crash never leaves half a
        voice, and the rename is the one atomic step that decides, across processes sharing the
        directory, who created the id. False: the id exists (another replica made it)."""
        assert self.root is not None
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            (tmp / (info.ref_audio_file or "reference.wav")).write_bytes(clip)
            prompt.save(tmp / PROMPT_FILE)
            (tmp / MANIFEST).write_text(json.dumps(asdict(info), indent=2, ensure_ascii=False) + "\n")
            try:
                tmp.rename(self.root / info.voice_id)  # refuses a non-empty target: ENOTEMPTY or EEXIST
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return False
            return True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    async def delete(self, voice_id: str) -> None:
        async with self._lock:
            info = self.info(voice_id)
            if info is None:
                raise P.ProtocolError(P.VOICE_NOT_FOUND, f"no voice named {voice_id!r}")
            del self._infos[voice_id]
            self._memory.pop(voice_id, None)
            self.cache.drop(self._cache_key(info))
            if self.root is not None:
                folder = self.root / voice_id
                trash = folder.with_name(f".trash-{uuid.uuid4().hex}")
                try:
                    folder.rename(trash)  # gone from the listing at once, even if removal is slow
                except FileNotFoundError as e:  # another replica deleted it first
                    raise P.ProtocolError(P.VOICE_NOT_FOUND, f"no voice named {voice_id!r}") from e
                await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, trash, True)
