#!/usr/bin/env bash
# One prepared GPU session (under 9 minutes on one H100): the throughput targets of the text stack on the
# Llama-2-7B shape, SD v1.5-shape images/s, and short DeepSpeed ZeRO-2 / DDP runs through the CLI (LoRA +
# bf16, 8-bit base + LoRA, the tiny SD with full-UNet training). Results land in $OUT (or runs/gpu_check).
#
# The GPU image lacks some of our dependencies: carry them as wheels in .whl/ (see the device notes), and a
# random-weight Llama folder (config.json + SmolLM2 tokenizer) in .gpu/smollm2-shape, since no hub is reachable.
set -u
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.:benchmarks PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, transformers, peft, lightning, diffusers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__, 'deepspeed', deepspeed.__version__)"

step() {  # name, timeout, command...; ONLY="a b" runs just those steps
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - start)) s"
    grep -v -E "it/s\]|s/it\]|Warning|warn" "$OUT/$name.log" | tail -n "${TAIL:-12}"
}

TAIL=40 step throughput 240 python3 benchmarks/throughput.py --shape llama2-7b --out "$OUT/throughput_cuda.json"
TAIL=30 step sd_throughput 80 python3 benchmarks/sd_throughput.py --shape sd15 --out "$OUT/sd_throughput_cuda.json"

LLAMA=.gpu/smollm2-shape/config.json
TEXT=(python3 -m ric.cli fit --config configs/quickstart_text.yaml --trainer.accelerator gpu --trainer.devices 1
      --trainer.max_steps 20 --trainer.val_check_interval 10 --trainer.precision bf16-mixed
      --model.init_args.model "$LLAMA" --model.init_args.max_new_tokens 32 --trainer.logger false
      --model.init_args.reward_names '[verbosity, sentiment]'
      --data.rewards '[{"class_path": "ric.text.rewards.Verbosity"}, {"class_path": "ric.text.rewards.Sentiment"}]')
step zero2_lora_bf16 75 "${TEXT[@]}" --trainer.strategy deepspeed_stage_2 --trainer.default_root_dir "$OUT/zero2"
# bitsandbytes quantizes weights as they load: save the random weights first
python3 - <<'PY'
import shutil
from transformers import AutoConfig, AutoModelForCausalLM
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu/smollm2-shape")).save_pretrained("/tmp/llama-random")
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f".gpu/smollm2-shape/{f}", "/tmp/llama-random")
PY
step zero2_8bit_lora 70 "${TEXT[@]}" --trainer.strategy deepspeed_stage_2 --model.init_args.quantization 8bit \
    --model.init_args.model /tmp/llama-random --trainer.default_root_dir "$OUT/zero2_8bit"
step sd_zero2 75 python3 -m ric.cli fit --config configs/quickstart_sd.yaml --trainer.accelerator gpu \
    --trainer.strategy deepspeed_stage_2 --trainer.precision bf16-mixed --trainer.max_steps 200 \
    --model.init_args.vae_fit_steps 200 --trainer.logger false --trainer.default_root_dir "$OUT/sd_zero2" \
    --data.output_dir "$OUT/sd_zero2"
# our generation with a static KV cache and compiled decoding (not yet measured; run alone with
# ONLY=throughput_static if the full script would pass the 10-minute limit of one device call)
TAIL=40 step throughput_static 300 python3 benchmarks/throughput.py --shape llama2-7b --static-cache --compile \
    --out "$OUT/throughput_cuda_static.json"
