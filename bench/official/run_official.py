"""Times the official qwen-tts 0.1.1 on a checkpoint. Runs ONLY inside the oracle venv, as a
subprocess of bench/compare_official.py; nothing in the product imports it.

Greedy x-vector synthesis of one text at two frame caps; the per-frame time is the difference
divided by the frame difference, so prefill and start-up cancel out.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from qwen_tts import Qwen3TTSModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--frames", type=int, nargs=2, default=[2, 12])
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tts = Qwen3TTSModel.from_pretrained(args.checkpoint, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    ref = (0.1 * np.sin(np.arange(48000) * 2 * np.pi * 150 / 24000)).astype(np.float32)
    prompt = tts.create_voice_clone_prompt(ref_audio=(ref, 24000), x_vector_only_mode=True)
    ids = tts._tokenize_texts([tts._build_assistant_text(args.text)])
    runs = {}
    for n in args.frames:
        t0 = time.perf_counter()
        codes, _ = tts.model.generate(input_ids=ids, voice_clone_prompt=tts._prompt_items_to_voice_clone_prompt(prompt),
                                      languages=["Auto"], do_sample=False, subtalker_dosample=False,
                                      max_new_tokens=n + 1)
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tts.model.speech_tokenizer.decode([{"audio_codes": codes[0]}])
        runs[n] = {"frames": int(codes[0].shape[0]), "generate_s": gen_s, "decode_s": time.perf_counter() - t0}
    a, b = (runs[n] for n in args.frames)
    print(json.dumps({
        "load_s": load_s, "runs": runs,
        "s_per_frame": (b["generate_s"] - a["generate_s"]) / (b["frames"] - a["frames"]),
        "decode_s_per_frame": b["decode_s"] / b["frames"], "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
