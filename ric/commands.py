"""The commands a user runs on a trained model: ``ric export``, ``ric generate``, ``ric chat``, ``ric calibrate``.

Each checks its inputs against the model's metadata (reward names, the reward space) before any weights
load: a bad preference, path or prompts file is a one-line error naming the value, with exit code 2, and
nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ric.interfaces import ConditionalPolicy, Steered
from ric.loading import ModelInfo, load_from_info, policy_class, read_model_info
from ric.mapping import METHODS, validate_preference
from ric.rewards import score_all
from ric.space import GUIDANCE_REFERENCES, check_desired, check_preference


class UsageError(ValueError):
    """Bad input to a command: reported in one line, exit code 2."""


def parse_vector(text: str, what: str) -> list[float]:
    """``"0.2,0.8"`` or ``"0.2 0.8"`` -> ``[0.2, 0.8]``."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise UsageError(f"{what} {text!r} is empty")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a list of numbers (write it as 0.2,0.8)") from None


def read_prompts(path: str) -> list[str]:
    """Prompts of a JSONL file, one ``{"prompt": ...}`` per line."""
    from ric.data import read_jsonl

    try:
        rows = read_jsonl(path)
    except FileNotFoundError:
        raise UsageError(f"prompts file not found: {path}") from None
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not rows:
        raise UsageError(f'prompts file {path} holds no prompts (one {{"prompt": ...}} per line)')
    prompts = []
    for k, row in enumerate(rows, 1):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{path}: line {k} has no non-empty string 'prompt': {json.dumps(row)[:80]}")
        prompts.append(prompt)
    return prompts


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags that were given (the model's own settings apply to the others)."""
    out: dict[str, Any] = {}
    for flag in ("max_new_tokens", "temperature", "top_p", "guidance", "guidance_reference", "num_inference_steps",
                 "guidance_scale"):  # fmt: skip
        value = getattr(args, flag, None)
        if value is not None:
            out[flag] = value
    if getattr(args, "greedy", False):
        out["do_sample"] = False
    return out


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (default: the model's own settings)")
    group.add_argument("--max-new-tokens", type=int, help="text: tokens to generate")
    group.add_argument("--temperature", type=float, help="text: sampling temperature")
    group.add_argument("--top-p", type=float, help="text: nucleus sampling mass")
    group.add_argument("--greedy", action="store_true", help="text: greedy decoding")
    group.add_argument("--guidance", type=float,
                       help="reward guidance over the markers, g in l + g (l - l_ref) (0 = none)")  # fmt: skip
    group.add_argument("--guidance-reference", choices=GUIDANCE_REFERENCES,
                       help="what reward guidance steers away from (default neutral)")  # fmt: skip
    group.add_argument("--num-inference-steps", type=int, help="images: DDIM steps")
    group.add_argument("--guidance-scale", type=float, help="images: classifier-free guidance scale")


def model_info(args: argparse.Namespace) -> ModelInfo:
    """The model's metadata (a checkpoint opened without running code unless ``--trust-checkpoint``)."""
    return read_model_info(args.model, trust=getattr(args, "trust_checkpoint", False))


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="open a .ckpt that holds more than tensors and plain data (it can run code: only "
                        "for files you trust)")  # fmt: skip


def load_checked(args: argparse.Namespace, info: ModelInfo) -> ConditionalPolicy:
    return load_from_info(info, device=getattr(args, "device", None))


def format_values(names: Sequence[str], values: Sequence[float] | None) -> str:
    if values is None:
        return "none (no reward markers)"
    return ", ".join(f"{n} {v:+.2f}" for n, v in zip(names, values))


# ---- export -------------------------------------------------------------------------------------
def check_new_folder(out: Path) -> None:
    """An export's destination: absent or an empty folder, so no user's files are overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not an empty folder: choose a new one")


def export_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_new_folder(out)
    info = model_info(args)
    policy = load_checked(args, info)
    policy.export(out, merge=not args.no_merge)
    from ric.serve.server import find_front

    front = find_front(info)
    if front is not None and front.parent != out:  # the run's sweep front: the served page shows it
        shutil.copyfile(front, out / "front.csv")
    print(f"exported {info.path} to {out.resolve()} (ric.json, README.md{', front.csv' if front else ''})")
    print(steer_hint(out, len(info.reward_names)), flush=True)
    return 0


def steer_hint(model: Path, num_rewards: int) -> str:
    """The command that steers ``model`` (what a fit or an export prints last), written as the user can run it
    from here: the environment's own ``ric`` when it is not on the path."""
    script = Path(sys.executable).with_name("ric")
    command = shlex.quote(_relative(script)) if script.is_file() else "ric"
    preference = ",".join(["1"] + ["0"] * (num_rewards - 1))
    return f'steer it: {command} generate {shlex.quote(_relative(model))} --preference {preference} --prompt "..."'


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---- generate -----------------------------------------------------------------------------------
def steering_inputs(args: argparse.Namespace, info: ModelInfo) -> tuple[list[float] | None, list[float] | None]:
    """``(preference, desired rewards)`` from the flags, checked against the model's rewards."""
    names = info.reward_names
    preference = desired = None
    if args.preference:
        preference = check_preference(parse_vector(args.preference, "preference"), names).tolist()
    if args.desired_rewards:
        desired = check_desired(parse_vector(args.desired_rewards, "desired rewards"), names).tolist()
    if preference is None and desired is None and info.conditioned:
        raise UsageError(f"give --preference (weights on {info.reward_names}, summing to 1) or --desired-rewards")
    if preference is not None and info.reward_space is None:
        raise UsageError(f"{info.path} holds no reward space to map a preference: give --desired-rewards instead")
    return preference, desired


def generate_command(args: argparse.Namespace) -> int:
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    prompts = read_prompts(args.prompts) if args.prompts else list(args.prompt)
    for k, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise UsageError(f"prompt {k} is empty")
    info = model_info(args)
    preference, desired = steering_inputs(args, info)
    settings = policy_class(info.class_path).check_sampling(sampling_settings(args), "sampling flags")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"the folder of --out {args.out} does not exist")
    rewards = rebuild_rewards(info) if args.score else None
    policy = load_checked(args, info)
    try:
        for prompt in prompts:
            policy.check_prompt(prompt)
    except ValueError as err:
        raise UsageError(str(err)) from None
    names = info.reward_names
    results = policy.steer(
        prompts, preference, desired_rewards=desired, method=args.method, num_samples=args.num_samples,
        seed=args.seed, **settings,
    )  # fmt: skip
    if rewards is not None:
        add_scores(results, rewards, policy)
    w = f" for w = ({', '.join(f'{v:.2f}' for v in preference)})" if preference is not None else ""
    method = args.method or (policy.reward_space.method if policy.reward_space else "-")
    guided = f", reward guidance g = {settings['guidance']:g}" if settings.get("guidance") else ""
    print(f"desired rewards{w} [{method} mapping{guided}]: {format_values(names, results[0].desired_rewards)}")
    space = policy.reward_space
    if space is not None and space.calibration is not None and results[0].written_rewards is not None:
        print(f"{space.calibration.describe()}; written into the prompt: "
              f"{format_values(names, results[0].written_rewards)}")  # fmt: skip
    image_dir = Path(args.image_dir)
    stored = policy.store_samples(
        [r.sample for r in results], image_dir, [f"sample{k:04d}" for k in range(len(results))]
    )
    for k, (result, shown) in enumerate(zip(results, stored)):
        print(f"\n[{k + 1}/{len(results)}] {result.prompt}")
        print(shown)
        if result.obtained_rewards is not None:
            print(f"  obtained: {format_values(names, list(result.obtained_rewards.values()))}")
    if results[0].obtained_rewards is not None and len(results) > 1:
        mean = np.mean([list(r.obtained_rewards.values()) for r in results], axis=0)
        print(f"\nmean obtained over {len(results)} samples: {format_values(names, mean)}")
    if args.out:
        write_results(args.out, results, stored)
        print(f"wrote {len(results)} lines to {args.out}")
    return 0


def rebuild_rewards(info: ModelInfo) -> list[Any]:
    space = info.reward_space
    if space is None:
        raise UsageError(f"--score needs the model's reward space, and {info.path} has none")
    try:
        return space.build_rewards()
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"--score cannot rebuild the rewards: {err}") from None


def add_scores(results: list[Steered], rewards: Sequence[Any], policy: ConditionalPolicy) -> None:
    """Each result's obtained rewards, in the reward space's normalized units."""
    raw = score_all(rewards, [r.prompt for r in results], [r.sample for r in results])
    z = policy.reward_space.normalize(raw)
    for result, row in zip(results, z):
        result.obtained_rewards = dict(zip(policy.reward_space.reward_names, row.tolist()))


def write_results(path: str, results: Sequence[Steered], stored: Sequence[Any]) -> None:
    lines = []
    for result, response in zip(results, stored):
        row = {
            "prompt": result.prompt,
            "preference": result.preference,
            "desired_rewards": result.desired_rewards,
            "response": response,
        }
        if result.obtained_rewards is not None:
            row["obtained_rewards"] = result.obtained_rewards
        lines.append(json.dumps(row, ensure_ascii=False))
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---- chat ---------------------------------------------------------------------------------------
CHAT_HELP = """commands:
  /w 0.3 0.7          set the preference (weights on the rewards, summing to 1)
  /rewards 1.0 -0.5   set the desired rewards directly (normalized units)
  /method linear      the preference mapping (linear, p_norm, p_inf, solver)
  /help               this text
  /quit               leave (or Ctrl-D)
every other line is a prompt; each is answered on its own (RiC prompts are single-turn)."""


def chat_command(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    info = model_info(args)
    preference, desired = None, None
    if args.preference:
        preference = check_preference(parse_vector(args.preference, "preference"), info.reward_names).tolist()
    elif info.conditioned and info.reward_space is not None:
        preference = [1.0 / len(info.reward_names)] * len(info.reward_names)
    settings = policy_class(info.class_path).check_sampling(sampling_settings(args), "sampling flags")
    policy = load_checked(args, info)
    names = info.reward_names
    method = args.method
    interactive = stdin.isatty()

    def say(text: str) -> None:
        print(text, file=stdout, flush=True)

    say(f"ric chat: {info.path} (rewards {names}); /help for commands")
    if preference is not None:
        say(f"preference w = {preference}")
    turn = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                command, _, rest = line.partition(" ")
                if command in ("/quit", "/exit"):
                    return 0
                if command == "/help":
                    say(CHAT_HELP)
                elif command == "/w":
                    preference, desired = check_preference(parse_vector(rest, "preference"), names).tolist(), None
                    say(f"preference w = {preference}")
                elif command == "/rewards":
                    desired, preference = check_desired(parse_vector(rest, "desired rewards"), names).tolist(), None
                    say(f"desired rewards: {format_values(names, desired)}")
                elif command == "/method":
                    if rest.strip() not in METHODS:
                        raise UsageError(f"unknown mapping method {rest.strip()!r}; choose one of {list(METHODS)}")
                    method = rest.strip()
                    say(f"mapping: {method}")
                else:
                    raise UsageError(f"unknown command {command!r}; /help lists them")
                continue
            policy.check_prompt(line)
            seed = None if args.seed is None else args.seed + turn
            result = policy.steer(line, preference, desired_rewards=desired, method=method, seed=seed, **settings)[0]
        except ValueError as err:
            say(f"error: {err}")
            continue
        turn += 1
        shown = policy.store_samples([result.sample], Path(args.image_dir), [f"chat{turn:04d}"])[0]
        say(f"[desired: {format_values(names, result.desired_rewards)}]")
        say(f"ric> {shown}")


# ---- desired ------------------------------------------------------------------------------------
def desired_command(args: argparse.Namespace) -> int:
    """The desired rewards of one preference under every mapping, in a model's reward space or the paper's."""
    from ric.mapping import default_reward_range, desired_rewards

    values = parse_vector(args.preference, "preference")
    if args.model:
        info = model_info(args)
        space = info.reward_space
        if space is None:
            raise UsageError(f"{info.path} holds no reward space")
        values = check_preference(values, info.reward_names).tolist()
        (lo, hi), names = space.mapped_range(), space.reward_names
        calibrated = " (calibrated: the achievable range)" if space.calibration is not None else ""
        where = f"the reward space of {info.path}{calibrated} (default mapping {space.method})"
    else:
        w = validate_preference(values)
        lo_n, hi_n = default_reward_range()
        lo, hi = np.full(w.size, lo_n), np.full(w.size, hi_n)
        names = [f"R{i + 1}" for i in range(w.size)]
        where = f"the paper's reward range [{lo_n:+.3f}, {hi_n:+.3f}]"
    print(f"preference w = {values} in {where}, normalized units")
    for method in METHODS:
        result = desired_rewards(values, method, p=args.p, r_min=lo, r_max=hi)
        label = f"{method} (p={args.p:g})" if method in ("p_norm", "solver") else method
        written = "" if not args.model or space.calibration is None else "  (written as " + ", ".join(
            f"{v:+.3f}" for v in space.markers(result)) + ")"  # fmt: skip
        print(f"{label:>16}: " + "  ".join(f"{n} = {v:+.3f}" for n, v in zip(names, result)) + written)
    return 0


# ---- calibrate ----------------------------------------------------------------------------------
def calibrate_command(args: argparse.Namespace) -> int:
    """Fit the map from written to obtained rewards on the user's prompts and store it in the reward space of
    an export folder: the model's own (in place) or, from a checkpoint, a new one (``--out``)."""
    from ric.calibration import calibrate, split_prompts

    prompts = read_prompts(args.prompts)
    for name, value, ok in (("--points", args.points, args.points >= 2), ("--samples", args.samples, args.samples >= 1),
                            ("--held-out", args.held_out, 0 < args.held_out < 1)):  # fmt: skip
        if not ok:
            raise UsageError(f"{name} {value} is out of range (points >= 2, samples >= 1, 0 < held-out < 1)")
    fit_prompts, check_prompts = split_prompts(prompts, args.held_out, args.seed)
    info = model_info(args)
    if not info.conditioned or info.reward_space is None:
        raise UsageError(f"{info.path} is not a conditioned model with a reward space: there is nothing to calibrate")
    if info.kind != "export" and not args.out:
        raise UsageError(f"{info.path} is a checkpoint: give --out FOLDER, a new export folder for the calibrated one")
    target = Path(args.out) if args.out else info.path
    if args.out:
        check_new_folder(target)
    settings = policy_class(info.class_path).check_sampling(sampling_settings(args), "sampling flags")
    rewards = rebuild_rewards(info)
    policy = load_checked(args, info)
    weights = info.path / "ric.json" if info.path.is_dir() else info.path
    fingerprint = f"{info.path.resolve()}:{weights.stat().st_mtime_ns}"
    work = Path(args.work) if args.work else target.with_name(target.name + ".calibration")
    print(f"calibrating {info.path} on {len(fit_prompts)} prompts, checking on {len(check_prompts)} others "
          f"({args.points} preferences x {args.samples} answers; sweeps kept in {work})", flush=True)  # fmt: skip
    space = calibrate(policy, rewards, prompts, work, points=args.points, samples=args.samples,
                      held_out=args.held_out, seed=args.seed, settings=settings, fingerprint=fingerprint)  # fmt: skip
    calibration = space.calibration
    for name, written, obtained in zip(space.reward_names, calibration.written, calibration.obtained):
        print(f"{name}: written " + " ".join(f"{v:+.2f}" for v in written) + " -> obtained "
              + " ".join(f"{v:+.2f}" for v in obtained))  # fmt: skip
    error = calibration.error
    print(
        f"\ncalibration error on {error['held_out_prompts']} held-out prompts, mean |obtained - asked| over "
        f"{len(error['asked'])} preferences (normalized units, asking within the achievable range):"
    )
    print(f"  {'reward':<16}{'before':>10}{'after':>10}")
    for name in space.reward_names:
        print(f"  {name:<16}{error['before'][name]:>10.3f}{error['after'][name]:>10.3f}")
    ratio = error["mean_before"] / error["mean_after"] if error["mean_after"] > 0 else float("inf")
    print(f"  {'mean':<16}{error['mean_before']:>10.3f}{error['mean_after']:>10.3f}   ({ratio:.1f}x smaller)")
    if args.out:
        policy.export(target)
    write_reward_space(target, space)
    print(f"\n{calibration.describe()}")
    print(f"wrote the calibration into {target / 'ric.json'}")
    print(steer_hint(target, len(space.reward_names)), flush=True)
    return 0


def write_reward_space(folder: Path, space: Any) -> None:
    """Replace the reward space in an export folder's ``ric.json`` (written whole, then moved into place)
    and rewrite its model card."""
    from ric.model_card import model_card

    meta_path = folder / "ric.json"
    meta = json.loads(meta_path.read_text())
    meta["reward_space"] = space.to_dict()
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)
    (folder / "README.md").write_text(model_card(meta, folder))


# ---- compare ------------------------------------------------------------------------------------
def compare_command(args: argparse.Namespace) -> int:
    from ric.compare import compare, print_summary

    print_summary(compare(args.fronts, args.labels, args.out, args.reference), args.out)
    return 0


# ---- serve --------------------------------------------------------------------------------------
def serve_command(args: argparse.Namespace) -> int:
    from ric.serve.server import build_server, run_server

    if args.max_body_mb <= 0:
        raise UsageError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    api_key = args.api_key or os.environ.get("RIC_API_KEY") or None
    server = build_server(args.model, args.max_batch_size, args.batch_timeout, args.score, args.device, args.front,
                          args.timeout, args.name, trust=args.trust_checkpoint, api_key=api_key,
                          max_body_bytes=int(args.max_body_mb * 2**20))  # fmt: skip
    print(f"ric serve: {args.model} at http://{args.host}:{args.port}/ (page), OpenAI API at "
          f"http://{args.host}:{args.port}/v1" + (" (API key required)" if api_key else ""), flush=True)  # fmt: skip
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"ric serve: warning: listening on {args.host} without an API key: anyone who can reach port "
              f"{args.port} can use the model (set --api-key or RIC_API_KEY)", file=sys.stderr, flush=True)  # fmt: skip
    run_server(server, args.host, args.port, args.log_level)
    return 0


# ---- the parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ric",
        description="Rewards-in-Context: train one model, steer it with a preference over its rewards.",
        epilog="fit, validate and test run LightningCLI: ric fit --config configs/quickstart_text.yaml "
        "(ric fit --help lists its settings).",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{fit,validate,test,baseline,export,generate,chat,serve,calibrate,desired,compare}"
    )
    for name in ("fit", "validate", "test"):
        sub.add_parser(name, help=f"LightningCLI {name} (ric {name} --help)", add_help=False)
    sub.add_parser("baseline", help="the paper's RL baselines: ric baseline morlhf|soups --config FILE",
                   add_help=False)  # fmt: skip

    export = sub.add_parser("export", help="write a standalone model folder with ric.json and a model card")
    export.add_argument("model", help="a .ckpt file (or an export folder)")
    export.add_argument("out", help="a new folder")
    export.add_argument("--no-merge", action="store_true", help="text: save the LoRA adapter alone")
    add_trust_flag(export)
    export.set_defaults(handler=export_command)

    gen = sub.add_parser("generate", help="samples for prompts at a preference")
    gen.add_argument("model", help="an export folder or a .ckpt file")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    prompts.add_argument("--prompts", help='a JSONL file, one {"prompt": ...} per line')
    steering = gen.add_mutually_exclusive_group()
    steering.add_argument("--preference", help="weights on the rewards, summing to 1, e.g. 0.2,0.8")
    steering.add_argument("--desired-rewards", help="desired rewards directly (normalized units), e.g. 1.0,-0.5")
    gen.add_argument("--method", choices=METHODS, help="preference mapping (default: the model's)")
    gen.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    gen.add_argument("--seed", type=int, help="the same seed gives the same samples")
    gen.add_argument("--score", action="store_true", help="score the samples with the model's rewards")
    gen.add_argument("--out", help="write one JSON line per sample here")
    gen.add_argument("--image-dir", default="ric_images", help="images: where the PNG files go")
    gen.add_argument("--device", help="cpu (default), cuda, cuda:1, ...")
    add_sampling_flags(gen)
    add_trust_flag(gen)
    gen.set_defaults(handler=generate_command)

    chat = sub.add_parser("chat", help="an interactive session with a steerable model")
    chat.add_argument("model", help="an export folder or a .ckpt file")
    chat.add_argument("--preference", help="the starting preference (default: equal weights)")
    chat.add_argument("--method", choices=METHODS, help="preference mapping (default: the model's)")
    chat.add_argument("--seed", type=int, help="seed of the first answer (then seed + 1, ...)")
    chat.add_argument("--image-dir", default="ric_images", help="images: where the PNG files go")
    chat.add_argument("--device", help="cpu (default), cuda, ...")
    add_sampling_flags(chat)
    add_trust_flag(chat)
    chat.set_defaults(handler=chat_command)

    desired = sub.add_parser("desired", help="the desired rewards of a preference under every mapping")
    desired.add_argument("preference", help="weights summing to 1, e.g. 0.2,0.8")
    desired.add_argument("--model", help="use this model's reward space (default: the paper's range)")
    desired.add_argument("--p", type=float, default=2.0, help="the norm of p_norm and solver")
    add_trust_flag(desired)
    desired.set_defaults(handler=desired_command)

    cal = sub.add_parser("calibrate", help="measure what the model obtains for what its prompt says, and write "
                         "the values that achieve what is asked from then on")  # fmt: skip
    cal.add_argument("model", help="an export folder (calibrated in place) or a .ckpt file (with --out)")
    cal.add_argument("--prompts", required=True, help='a JSONL file, one {"prompt": ...} per line (your own prompts)')
    cal.add_argument("--out", help="write the calibrated model to this new export folder instead")
    cal.add_argument("--points", type=int, default=5, help="preferences of the grid (per reward, for two rewards)")
    cal.add_argument("--samples", type=int, default=2, help="answers per prompt and preference")
    cal.add_argument("--held-out", type=float, default=0.5, help="share of the prompts kept to check the calibration")
    cal.add_argument("--seed", type=int, default=0, help="the prompts' split and the answers' sampling")
    cal.add_argument("--work", help="where the sweeps are kept (default: beside the model, <name>.calibration)")
    cal.add_argument("--device", help="cpu (default), cuda, ...")
    add_sampling_flags(cal)
    add_trust_flag(cal)
    cal.set_defaults(handler=calibrate_command)

    compare = sub.add_parser("compare", help="several runs' fronts on one plot, hypervolumes on one reference")
    compare.add_argument("fronts", nargs="+", help="sweep folders or their front.csv files")
    compare.add_argument("--labels", nargs="+", help="one name per run (default: the folder names)")
    compare.add_argument("--out", default="compare", help="where front.png, compare.csv and compare.json go")
    compare.add_argument("--reference", nargs="+", type=float, help="hypervolume reference point (default: shared)")
    compare.set_defaults(handler=compare_command)

    serve = sub.add_parser("serve", help="an OpenAI-compatible server with a steering page")
    serve.add_argument("model", help="an export folder or a .ckpt file")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="text: requests decoding at once (more wait for a free row); images: generated together",
    )
    serve.add_argument(
        "--batch-timeout",
        type=float,
        default=0.05,
        help="images: seconds the first waiting request waits for others (text joins at once)",
    )
    serve.add_argument("--score", action="store_true", help="return each response's obtained rewards")
    serve.add_argument("--device", help="cpu (default), cuda, ...")
    serve.add_argument("--front", help="the sweep's front.csv to show (default: found beside the model)")
    serve.add_argument("--timeout", type=float, default=600.0,
                       help="seconds a request may take before it gets a 504")  # fmt: skip
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /health and the "
                       "page (default: $RIC_API_KEY; none: open to whoever reaches the port)")  # fmt: skip
    serve.add_argument("--max-body-mb", type=float, default=4.0, help="larger request bodies get a 413 unread")
    serve.add_argument("--name", help="the model's name in /v1/models (default: from its path)")
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_trust_flag(serve)
    serve.set_defaults(handler=serve_command)
    return parser


def run(argv: Sequence[str]) -> int:
    """Parse and run a user command; bad input is reported in one line with exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"ric {args.command}: error: {err}", file=sys.stderr)
        return 2
