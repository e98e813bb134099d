#!/usr/bin/env bash
# Rebuild .whl/fa4/ (git-ignored): flash-attn-4 and its CuTe-DSL stack for the GPU image (CPython 3.12,
# manylinux x86_64, torch 2.11+cu130), unpacked into one tree, packed as tar.xz and cut into parts that each
# fit one device call.
#
# Why parts: a device call carries the working tree plus `carry`, 64 MiB in all. This checkout's tree is
# ~41 MiB (the testbed weights are 38 MiB), and the wheel set is ~264 MB unpacked (the CUTLASS DSL compiler,
# _cutlass_ir.cu13...so, alone is 193 MB) and 62 MiB as xz: 3 parts of 21 MiB here. Each part holds what is
# left of the budget (printed below, with the part count), and the parts go in consecutive calls on ONE warm
# machine (it is given back 30 s after a call ends: send the next call at once). The wheels' own .pth is not read from a
# folder on PYTHONPATH, so nvidia_cutlass_dsl/dsl_packages goes on PYTHONPATH by hand.
#
# Device commands, for N parts (the script prints them with N filled in):
#   calls 1 .. N-1, carry [".whl/fa4/part-K"] (K = 1 .. N-1), each right after the one before:
#     mkdir -p /tmp/fa4 && cp .whl/fa4/part-K/* /tmp/fa4/ && ls -l /tmp/fa4
#   call N, carry [".whl/fa4/part-N"], timeout 600:
#     cp .whl/fa4/part-N/* /tmp/fa4/ && (cd /tmp/fa4 && sha256sum -c --quiet SHA256SUMS) || { echo "parts
#     missing: the machine was not kept warm; start again from part 1"; exit 1; }
#     mkdir -p /tmp/site /tmp/pkg && cat /tmp/fa4/fa4.tar.xz.* | xz -d | tar -x -C /tmp/site &&
#     ln -sfn "$PWD" /tmp/pkg/fastattn &&
#     export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/pkg PYTHONUNBUFFERED=1 &&
#     cd /tmp && python3 -c "import flash_attn.cute, cutlass; print('fa4 ok')" &&
#     python3 -m fastattn.bench.fa4_check --out $OUT/fa4-check-h200.json 2>&1 | tee $OUT/fa4-check.log
# (run from /tmp: the repository root's own folders, bench/ parallel/ caching/ ..., would shadow top-level
# modules of the same names)
#
# Usage: bench/prepare_fa4_wheels.sh            (downloads into .whl/fa4-src, writes .whl/fa4/part-*)
#        FA4_PART_MIB=20 bench/prepare_fa4_wheels.sh   (force the part size)
#        FA4_EXTRA="diffusers==0.42.1" FA4_MARGIN_KIB=512 bench/prepare_fa4_wheels.sh
#            (more pure-Python wheels in the same tree, e.g. diffusers for the e2e benches: one call fewer than
#            carrying them beside the parts; a smaller margin for files added before the call)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$ROOT/.whl/fa4-src
OUT=$ROOT/.whl/fa4
PY=${PYTHON:-python3}
WHEELS=(
    "flash-attn-4==4.0.0b36"
    "nvidia-cutlass-dsl==4.8.1"
    "nvidia-cutlass-dsl-libs-base==4.8.1"
    "nvidia-cutlass-dsl-libs-core==4.8.1"
    "nvidia-cutlass-dsl-libs-cu13==4.8.1"
    "apache-tvm-ffi==0.1.15.post2"
    "torch-c-dlpack-ext==0.1.5"
    "quack-kernels==0.6.5"
)
# einops, typing-extensions, cuda-bindings and protobuf (their other needs) are in the GPU image already.
read -r -a EXTRA <<< "${FA4_EXTRA:-}"
WHEELS+=("${EXTRA[@]}")

git -C "$ROOT" check-ignore -q .whl/fa4 || { echo "$ROOT/.whl is not git-ignored: refusing to write wheels there"; exit 1; }

mkdir -p "$SRC"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$SRC" "${WHEELS[@]}"
count=$(ls "$SRC"/*.whl | wc -l)
[ "$count" -eq "${#WHEELS[@]}" ] || { echo "expected ${#WHEELS[@]} wheels in $SRC, found $count (one version each)"; exit 1; }

# One tree, as pip --target would lay it out (a wheel's files at the top; the .pth stays unread).
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/site"
for w in "$SRC"/*.whl; do
    if command -v unzip > /dev/null; then
        unzip -q -o "$w" -d "$STAGE/site"  # keeps the shared objects' modes
    else
        "$PY" -m zipfile -e "$w" "$STAGE/site"
    fi
done

# The budget: 64 MiB per call, less what the working tree sends (tracked + untracked-not-ignored files).
tree_bytes=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
if [ -d "$ROOT/shared" ]; then
    tree_bytes=$((tree_bytes + $(du -sb "$ROOT/shared" | cut -f1)))
fi
if [ -n "${FA4_PART_MIB:-}" ]; then
    part_bytes=$((FA4_PART_MIB * 1024 * 1024))
else
    # a margin (2 MiB unless FA4_MARGIN_KIB says) for files other helpers add before the call; at most 60 MiB
    part_bytes=$((64 * 1024 * 1024 - tree_bytes - ${FA4_MARGIN_KIB:-2048} * 1024))
    [ "$part_bytes" -gt $((60 * 1024 * 1024)) ] && part_bytes=$((60 * 1024 * 1024))
fi
[ "$part_bytes" -gt $((4 * 1024 * 1024)) ] || { echo "working tree is $tree_bytes bytes: no room for wheels"; exit 1; }

# xz with the x86 branch filter (the bulk is x86-64 shared objects); deterministic tar (sorted, no mtimes).
echo "packing (xz -9e, single thread: ~15 min on 2 busy cores) ..."
tar -C "$STAGE/site" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - . \
    | xz -T1 --x86 --lzma2=preset=9e > "$STAGE/fa4.tar.xz"

rm -rf "$OUT"
mkdir -p "$OUT"
(cd "$STAGE" && split -b "$part_bytes" -d -a 2 fa4.tar.xz fa4.tar.xz.)
n=0
for chunk in "$STAGE"/fa4.tar.xz.[0-9][0-9]; do
    n=$((n + 1))
    mkdir -p "$OUT/part-$n"
    mv "$chunk" "$OUT/part-$n/"
done
(cd "$OUT" && sha256sum part-*/fa4.tar.xz.* | sed 's| part-[0-9]*/| |') > "$STAGE/SHA256SUMS"
cp "$STAGE/SHA256SUMS" "$OUT/part-$n/"
printf '%s\n' "${WHEELS[@]}" > "$OUT/part-$n/WHEELS.txt"

mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo
echo "working tree: $(mib "$tree_bytes"); part size: $(mib "$part_bytes"); $n parts in $OUT:"
du -sh "$OUT"/part-*
echo
echo "Device commands (one warm machine; send each right after the one before):"
for k in $(seq 1 $((n - 1))); do
    echo "  call $k, carry [\".whl/fa4/part-$k\"]:"
    echo "    mkdir -p /tmp/fa4 && cp .whl/fa4/part-$k/* /tmp/fa4/ && ls -l /tmp/fa4"
done
cat <<EOF
  call $n, carry [".whl/fa4/part-$n"], timeout_s 600:
    mkdir -p /tmp/fa4 && cp .whl/fa4/part-$n/* /tmp/fa4/ && (cd /tmp/fa4 && sha256sum -c --quiet SHA256SUMS) || { echo "parts missing: the machine was not kept warm; start again from part 1"; exit 1; }; mkdir -p /tmp/site /tmp/pkg && cat /tmp/fa4/fa4.tar.xz.* | xz -d | tar -x -C /tmp/site && ln -sfn "\$PWD" /tmp/pkg/fastattn && export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/pkg PYTHONUNBUFFERED=1 && cd /tmp && python3 -c "import flash_attn.cute, cutlass; print('fa4 ok')" && python3 -m fastattn.bench.fa4_check --out \$OUT/fa4-check-h200.json 2>&1 | tee \$OUT/fa4-check.log
EOF
