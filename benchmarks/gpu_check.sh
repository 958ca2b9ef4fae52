#!/usr/bin/env bash
# One prepared GPU session (about 9 minutes on one H100; run it with timeout_s 590): by default what the last
# session left unmeasured: the SFT throughput of the text stack on the Llama-2-7B shape with a kernel profile
# of each variant (full rows, adapters on every projection, then on the authors' q / v only; compiled
# variants first), then the speed overlay under ZeRO-2 through the CLI, given time for its sweep's compiled
# decoding. Other steps (the SFT step's anatomy with CUDA's kernels, spread lengths with flex attention,
# 8-bit + LoRA under DDP / ZeRO-2, SD v1.5-shape images/s, ZeRO-2 with LoRA + bf16, the tiny SD under
# ZeRO-2, rollout decoding static vs continuous: ONLY=generation) run when ONLY names them.
# Results land in $OUT (or runs/gpu_check).
#
# The GPU image lacks some of our dependencies: carry them as wheels in .whl/, and a random-weight Llama
# folder (config.json + SmolLM2 tokenizer) in .gpu/smollm2-shape, since no hub is reachable; both are made
# here by benchmarks/gpu_carry.sh.
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, transformers, peft, lightning, diffusers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__, 'deepspeed', deepspeed.__version__)"

# the default: what the last GPU session left unmeasured (the anatomy and 8-bit under DDP / ZeRO-2 ran before)
STEPS=${ONLY:-"throughput_full throughput_authors zero2_speed_overlay"}  # others: ONLY="anatomy ddp_8bit_lora ..."
step() {  # name, timeout, command...; runs only the steps named in STEPS
    local name=$1 limit=$2
    shift 2
    if [[ " $STEPS " != *" $name "* ]]; then return; fi
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1  # -k: Lightning catches SIGTERM and carries on
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - start)) s"
    grep -v -E "it/s\]|s/it\]|Warning|warn" "$OUT/$name.log" | tail -n "${TAIL:-12}"
}

LLAMA=.gpu/smollm2-shape/config.json
TEXT=(python3 -m ric.cli fit --config configs/quickstart_text.yaml --trainer.accelerator gpu --trainer.devices 1
      --trainer.max_steps 20 --trainer.val_check_interval 10 --trainer.precision bf16-mixed
      --model.init_args.model "$LLAMA" --model.init_args.max_new_tokens 32 --trainer.logger false
      --model.init_args.reward_names '[verbosity, sentiment]' --data.test_fraction 0.02
      --data.rewards '[{"class_path": "ric.text.rewards.Verbosity"}, {"class_path": "ric.text.rewards.Sentiment"}]')
# bitsandbytes quantizes weights as they load: save the random weights first
if [[ " $STEPS " == *"8bit"* ]]; then python3 - <<'PY'
import shutil
from transformers import AutoConfig, AutoModelForCausalLM
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu/smollm2-shape")).save_pretrained("/tmp/llama-random")
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f".gpu/smollm2-shape/{f}", "/tmp/llama-random")
PY
fi
# 8-bit base + LoRA, through the CLI: 20 steps, then the preference sweep (generation with int8 weights; int8
# decoding is slow, so the sweep uses 2% of the prompts: with 15% both runs took over 200 s)
step ddp_8bit_lora 80 "${TEXT[@]}" --trainer.strategy ddp --model.init_args.quantization 8bit \
    --model.init_args.model /tmp/llama-random --trainer.default_root_dir /tmp/gpu_runs/ddp_8bit
step zero2_8bit_lora 80 "${TEXT[@]}" --trainer.strategy deepspeed_stage_2 --model.init_args.quantization 8bit \
    --model.init_args.model /tmp/llama-random --trainer.default_root_dir /tmp/gpu_runs/zero2_8bit
step zero2_lora_bf16 75 "${TEXT[@]}" --trainer.strategy deepspeed_stage_2 --trainer.default_root_dir /tmp/gpu_runs/zero2
# the Llama-2-7B shape: SFT switch sets beside the plain HF + peft step, each with a kernel profile; first on
# full 8 x 512 rows (the tokens the reference HF numbers count), then on spread lengths (what packing and flex
# attention are for). The generation targets were met on an earlier GPU (GEN=1 measures them again). The
# JSON is rewritten after each variant, so a cut run still leaves what it measured.
TP=(python3 -m benchmarks.throughput --shape "${SHAPE:-llama2-7b}" --tokenizer bytes --profile --gen-variants merged,merged+static)
TAIL=40 step throughput_full "${FULL_LIMIT:-160}" "${TP[@]}" --sections sft --lengths full \
    --sft-variants "${FULL_VARIANTS:-compile,eager,liger+compile}" \
    --out "$OUT/throughput_full_cuda.json"
# the same rows with the authors' adapters (q_proj, v_proj only: peft's default, which their code keeps)
TAIL=30 step throughput_authors "${AUTHORS_LIMIT:-100}" "${TP[@]}" --sections sft --lengths full --lora-targets authors \
    --sft-variants "${AUTHORS_VARIANTS:-compile,eager}" --out "$OUT/throughput_authors_cuda.json"
# what the eager steps ask of the card, traced op by op with CUDA's own kernels (bandwidth measured there)
TAIL=40 step anatomy 90 "${TP[@]}" --sections anatomy --lengths full --sft-variants eager,eager+peft-forward \
    --out "$OUT/anatomy_cuda.json"
TAIL=40 step throughput "${THROUGHPUT_LIMIT:-150}" "${TP[@]}" --sections "${GEN:+generation,}sft" \
    --sft-variants "${SFT_VARIANTS:-compile,flex,flex+wide,compile+flex+wide}" --out "$OUT/throughput_cuda.json"
# the speed overlay under ZeRO-2: regional compile in training, merged adapter + compiled static decoding in the sweep
step zero2_speed_overlay "${OVERLAY_LIMIT:-240}" "${TEXT[@]}" --trainer.strategy deepspeed_stage_2 --config configs/speed/bf16_compiled.yaml \
    --trainer.default_root_dir /tmp/gpu_runs/zero2_fast
# rollout decoding: static batches vs the continuous-batching engine on answers of hh-rlhf-like lengths
TAIL=20 step generation 150 python3 -m benchmarks.gpu_generation --config "$LLAMA" --out "$OUT/generation_cuda.json"
TAIL=30 step sd_throughput 80 python3 -m benchmarks.sd_throughput --shape sd15 --out "$OUT/sd_throughput_cuda.json"
step sd_zero2 75 python3 -m ric.cli fit --config configs/quickstart_sd.yaml --trainer.accelerator gpu \
    --trainer.strategy deepspeed_stage_2 --trainer.precision bf16-mixed --trainer.max_steps 200 \
    --model.init_args.vae_fit_steps 200 --trainer.logger false --trainer.default_root_dir "$OUT/sd_zero2" \
    --data.output_dir "$OUT/sd_zero2"
