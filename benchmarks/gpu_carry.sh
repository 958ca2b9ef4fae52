#!/usr/bin/env bash
# Prepares, on this machine, what benchmarks/gpu_check.sh carries to a lent GPU machine (x86-64, Python 3.12,
# torch / transformers / peft / lightning installed, no hub): wheels of our other dependencies in .whl/, and
# SmolLM2-135M's config and tokenizer in .gpu/smollm2-shape (the text checks' random-weight Llama). Both
# folders are git-ignored and together stay under the 64 MiB a call may carry. Then, on the device:
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=590)
# The pinned versions ran there last, beside the image's torch 2.11 and transformers 5.17; newer ones may
# need a newer torch than the image has.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude)  # also right in a worktree, where .git is a file
mkdir -p "$(dirname "$exclude")"
for folder in /.whl/ /.gpu/; do
    grep -qsx "$folder" "$exclude" || echo "$folder" >>"$exclude"
done
mkdir -p .whl .gpu/smollm2-shape
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .whl jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0 platformdirs==4.14.8 \
    moocore==0.3.2 cffi==2.1.1 diffusers==0.42.1 importlib_metadata==10.2.0 lazy_importer==0.1.0 \
    bitsandbytes==0.50.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 \
    hjson==3.1.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 vaderSentiment==3.3.2 liger-kernel==0.8.5
# DeepSpeed publishes only a source distribution: build its pure-Python wheel here (its ops compile there, at
# run time, when a strategy needs them)
ls .whl/deepspeed-*.whl >/dev/null 2>&1 || "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
"$PY" - <<'PY'
from transformers import AutoConfig

from ric.text.models import load_tokenizer, resolve

folder = ".gpu/smollm2-shape"
source, gguf = resolve("smollm2")  # the offline GGUF file
AutoConfig.from_pretrained(source, gguf_file=gguf).save_pretrained(folder)
load_tokenizer("smollm2").save_pretrained(folder)
PY
du -sh .whl .gpu
