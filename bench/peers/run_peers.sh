#!/usr/bin/env bash
# CPU peers on one checkpoint, each in its own venv under PEERS (default /work/peers):
#   bench/peers/run_peers.sh CHECKPOINT OUT_DIR
# vox-tts (PyPI vox-tts 0.19.5): f32 and q8 (`python -m vox build`), seconds per frame at 1 and 2
# threads, frames/s at 1/4/8 sessions (1 thread); one JSON line each in OUT_DIR/vox-*.json.
# Heavy (a full-size model each): run it under `flock /tmp/makima-heavy.lock` on a shared box.
# qwentts.cpp (realtimetts-qwen-native-cpu) is not run yet: its Q8_0 GGUFs need the repository's
# convert.py plus its C++ quantize tool, which the wheel does not ship.
set -eu
ckpt=${1:?usage: run_peers.sh CHECKPOINT OUT_DIR}
out=${2:?usage: run_peers.sh CHECKPOINT OUT_DIR}
peers=${PEERS:-/work/peers}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out" "$peers/tmod"
[ -x "$peers/vox/bin/python" ] || { python3 -m venv "$peers/vox" && "$peers/vox/bin/pip" install -q vox-tts==0.19.5; }
name=$(basename "$ckpt")
for spec in "f32 -" "f32 q8"; do
    set -- $spec
    quant=${2#-}
    tag=$1${quant:+-$quant}
    for t in 1 2; do
        sessions=""
        [ "$t" = 1 ] && sessions="--sessions 1,4,8"
        echo "== vox $tag threads $t $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
        "$peers/vox/bin/python" "$here/vox_peer.py" --checkpoint "$ckpt" --dtype "$1" ${quant:+--quant $quant} \
            --tmod "$peers/tmod/$name-$tag.tmod" --threads "$t" --repeats "${REPEATS:-3}" $sessions \
            | tail -n 1 | tee "$out/vox-$tag-t$t.json"
    done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
