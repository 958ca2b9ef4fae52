"""Regenerates ric/text/assets/quickstart.jsonl: responses to our own prompts, bootstrapped from
SmolLM2-135M-Instruct. Hidden style instructions (not kept in the data) make the responses vary in length
and difficulty, so the offline rewards have something to condition on. Run once; the result is shipped."""

import json
import sys
from pathlib import Path

import torch

from ric.text.models import load_causal_lm

ASSETS = Path(__file__).resolve().parents[1] / "ric" / "text" / "assets"
#: (hidden instruction, token budget): the budget makes lengths vary even where the model ignores the style
STYLES = [
    ("Reply in one short sentence using only simple, everyday words.", 24),
    ("Reply in two short, simple sentences that a child could read.", 48),
    ("Reply in a few sentences.", 64),
    (
        "Give a long, thorough answer in formal academic language, with advanced technical terminology "
        "and long, complex sentences.",
        112,
    ),
]


def trim(text: str) -> str:
    """Cut a response that ran out of budget back to its last complete sentence."""
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"))
    if text.endswith((".", "!", "?")) or cut < 20:
        return text
    return text[: cut + 1]


def main(out: Path = ASSETS / "quickstart.jsonl", batch_size: int = 16) -> None:
    torch.manual_seed(0)
    model, tok = load_causal_lm("smollm2")
    tok.padding_side = "left"
    prompts = [p for p in (ASSETS / "quickstart_prompts.txt").read_text().splitlines() if p.strip()]
    jobs = [(p, s, budget) for s, budget in STYLES for p in prompts]
    rows = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        texts = [
            tok.apply_chat_template(
                [{"role": "system", "content": s}, {"role": "user", "content": p}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for p, s, _ in chunk
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out_ids = model.generate(
                **enc,
                max_new_tokens=max(b for _, _, b in chunk),
                do_sample=True,
                temperature=0.7,
                top_p=0.9,
                pad_token_id=tok.pad_token_id,
            )
        for (p, _, _), ids in zip(chunk, out_ids[:, enc.input_ids.shape[1] :]):
            response = trim(tok.decode(ids, skip_special_tokens=True).strip())
            if response:
                rows.append({"prompt": p, "response": response})
        print(f"{min(start + batch_size, len(jobs))}/{len(jobs)}", file=sys.stderr, flush=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
