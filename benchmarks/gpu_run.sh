#!/usr/bin/env bash
# Reproduce the GPU results on one CUDA device, one step at a time (each meant to fit in 10 minutes on an H100):
#   bash benchmarks/gpu_run.sh RESULTS_DIR [STEP...]
# Steps, in the order that settles the most per minute (all of them when none is named):
#   tests     the CUDA and Triton kernel tests (test_cuda, test_triton, test_memory)
#   fused     every backend against the float64 reference on cuda (test_fused)
#   headline  the headline case with every peer: peaks after warm-up, full-size gradient errors
#   peaked    gradient filtering beside CCE's default filter, on trained-looking logits
#   tiles     the recompute schedule's tile shapes, with a profile of the default one; then, at H=3584,
#             the package's tile width of whole 128-column blocks beside the one it had before
#   odd       an odd vocabulary (128257, as resized for an added token) beside the aligned 128256
#   sweep     the sweep and the peers' largest-fit search, for 300 s
#   trainer   the demo, then one process of the CLI under FSDP2
# Files are named after the device (h100_headline.json, ...). Needs the peers installed
# (pip install -e '.[bench,train]'), or their wheels in $WHEELS on a machine without network.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { sed -n 2,15p "$0"; exit 2; }
out=$(mkdir -p "$1" && cd "$1" && pwd)
shift
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(tests fused headline peaked tiles odd sweep trainer)

if [[ -n "${WHEELS:-}" ]]; then  # pure-Python peers beside a preinstalled torch, triton and transformers
    site=/tmp/nca_kernels_site
    [[ -d $site ]] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
ls nca_kernels/_C*.so >/dev/null 2>&1 || python3 setup.py -q build_ext --inplace >"$out/build_ext.log" 2>&1
tag=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
nvidia-smi >"$out/${tag}_nvidia_smi.txt" 2>&1 || true
bench=(python3 benchmarks/run.py --device cuda)

run_step() {
    case $1 in
        tests | fused)  # the kernel tests, then every backend against the float64 reference
            local files=(tests/test_cuda.py tests/test_triton.py tests/test_memory.py)
            [[ $1 == fused ]] && files=(tests/test_fused.py)
            python3 -m pytest -q -p no:cacheprovider --durations 15 "${files[@]}" --junitxml "$out/${tag}_$1.xml" \
                >"$out/${tag}_$1.log" 2>&1
            local rc=$?; tail -n 30 "$out/${tag}_$1.log"; return $rc ;;
        headline)
            "${bench[@]}" --headline --no-fit --skip "ours[torch" \
                --out "$out/${tag}_headline.json" --md "$out/${tag}_headline.md" ;;
        peaked)
            "${bench[@]}" --headline --no-fit --logits peaked --only naive "ours[triton" "ours[cuda" cce \
                --out "$out/${tag}_headline_peaked.json" --md "$out/${tag}_headline_peaked.md" ;;
        tiles)
            python3 benchmarks/tile_sweep.py --profile --out "$out/${tag}_tile_sweep.json" --md "$out/${tag}_tile_sweep.md" \
                && python3 benchmarks/tile_sweep.py --case 4,4,1024,3584,152064 --rows 877 --cols 14336 14359 \
                    --out "$out/${tag}_tile_align.json" --md "$out/${tag}_tile_align.md" ;;
        odd)
            "${bench[@]}" --headline --no-fit --vocab 128256 128257 --only "ours[triton" "ours[cuda" \
                --out "$out/${tag}_odd_vocab.json" --md "$out/${tag}_odd_vocab.md" ;;
        sweep)
            "${bench[@]}" --time-budget 300 --skip "ours[torch" \
                --out "$out/${tag}_sweep.json" --plot "$out/${tag}_sweep.png" --md "$out/${tag}_sweep.md" ;;
        trainer)
            local demo=$out/${tag}_demo log=$out/${tag}_trainer.log
            python3 -m nca_kernels.train --demo --output_dir "$demo" >"$log" 2>&1 \
                && torchrun --standalone --nproc_per_node 1 -m nca_kernels.train --model_name_or_path "$demo/reference" \
                    --dataset "$demo/data.jsonl" --output_dir /tmp/nca_kernels_fsdp --max_steps 4 --fsdp full_shard \
                    --fsdp_config '{"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}' >>"$log" 2>&1
            local rc=$?; rm -rf "$demo/reference" "$demo/nca"; tail -n 20 "$log"; return $rc ;;
        *) echo "unknown step: $1" >&2; return 2 ;;
    esac
}

failed=()
for step in "${steps[@]}"; do
    echo "== $step ($(date -u +%H:%M:%S) UTC)"
    run_step "$step" || failed+=("$step")
done
[[ ${#failed[@]} -eq 0 ]] || { echo "failed: ${failed[*]}" >&2; exit 1; }
