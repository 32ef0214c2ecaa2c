"""`gptstack <command>`: thin argument parsing over the library; every command has --help.

Commands register themselves in `build_parser`; each handler takes the parsed args and returns an
exit status. Bad input raises `UserError`, printed as one `error: ...` line with exit status 2
before any work starts.
"""
from __future__ import annotations

import argparse
import errno
import re
import sys
import tempfile
import time
from pathlib import Path

from . import __version__
from .common import UserError, read_text_file

# --- tokenizer ------------------------------------------------------------------------------


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .tokenizer import DEFAULT_SPECIALS, Tokenizer
    from .tokenizer.bpe import resolve_pattern

    # Everything that can be wrong with the input is checked before training and before --out
    # is touched, so a failed run leaves no half-written tokenizer behind.
    resolve_pattern(args.pattern)
    specials = DEFAULT_SPECIALS if args.specials == "default" else ()
    if args.vocab_size < 256 + len(specials):
        raise UserError(
            f"--vocab-size: {args.vocab_size} is too small, expected at least {256 + len(specials)} "
            f"(256 byte tokens + {len(specials)} special tokens)"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    texts = [read_text_file(p) for p in args.input]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)

    t0 = time.perf_counter()
    tok = Tokenizer.train(texts, args.vocab_size, pattern=args.pattern, special_tokens=specials,
                          num_workers=args.workers)
    seconds = time.perf_counter() - t0
    # Self-check before saving: a tokenizer that does not round-trip its own corpus is never
    # written. The first 1M characters of each file are checked, which also gives bytes/token.
    samples = [t[: 1 << 20] for t in texts]
    n_tokens = 0
    for ids, text in zip(tok.encode_batch(samples), samples):
        if tok.decode(ids) != text:
            raise RuntimeError("trained tokenizer does not round-trip its training text; please report this")
        n_tokens += len(ids)
    sample_bytes = sum(len(s.encode("utf-8")) for s in samples)
    tok.save(out)
    print(
        f"trained {tok.vocab_size} tokens ({tok.vocab_size - 256 - len(specials)} merges, pattern "
        f"{tok.pattern_name}) on {n_bytes / 1e6:.2f} MB in {seconds:.2f} s; "
        f"{sample_bytes / max(n_tokens, 1):.2f} bytes/token; wrote {out}/tokenizer.json, {out}/gptstack.json",
        file=sys.stderr,
    )
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    from .tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    text = sys.stdin.read()
    ids = tok.encode(text)
    if args.bos:
        ids = [tok.bos_id, *ids]
    sys.stdout.write(" ".join(map(str, ids)) + "\n")
    return 0


def cmd_tokenizer_decode(args: argparse.Namespace) -> int:
    from .tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    ids = []
    for k, field in enumerate(f for f in re.split(r"[\s,\[\]]+", sys.stdin.read()) if f):
        if not field.isdigit():
            raise UserError(f"stdin: item {k + 1}: expected a token id (non-negative integer), got {field!r}")
        ids.append(int(field))
    bad = [i for i in ids if i >= tok.vocab_size]
    if bad:
        raise UserError(f"stdin: token id {bad[0]} is out of range, expected < {tok.vocab_size} (the vocab size)")
    sys.stdout.write(tok.decode(ids))
    return 0


def cmd_tokenizer_show(args: argparse.Namespace) -> int:
    import json

    from .tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    raw = sys.stdin.read()
    if args.chat:
        try:
            messages = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"stdin: line {e.lineno}: expected a JSON list of messages ({e.msg})") from None
        ids, mask = tok.render_conversation(messages)
    else:
        ids, mask = tok.encode(raw), None
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(f"{len(ids)} tokens, {len(raw.encode('utf-8'))} bytes"
          + (f", {sum(mask)} trained (mask=1)" if mask else ""))
    print(render_tokens(tok, ids, mask, color))
    return 0


def render_tokens(tok, ids: list[int], mask: list[int] | None, color: bool) -> str:
    """Token boundaries made visible: alternating backgrounds on a terminal, `|` otherwise. With a
    loss mask, trained tokens (mask 1) are green, or wrapped in [[ ]] without colour."""
    parts = []
    for k, i in enumerate(ids):
        piece = tok.decode([i]).replace("\n", "\\n\n")
        trained = mask is not None and mask[k] == 1
        if color:
            bg = ("42" if k % 2 else "102") if trained else ("100" if k % 2 else "47")
            parts.append(f"\x1b[30;{bg}m{piece}\x1b[0m")
        else:
            parts.append(f"[[{piece}]]" if trained else piece)
    return ("" if color else "|").join(parts)


# --- stages -----------------------------------------------------------------------------------


def _config(args: argparse.Namespace, overrides: dict | None = None):
    from .config import build_config

    return build_config(args.recipe, overrides, args.set or [])


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .stages import pretrain

    overrides = {"data": {"paths": args.data}} if args.data else None
    pretrain.run(_config(args, overrides), args.out, fresh=args.fresh, skip_bad_rows=args.skip_bad_rows)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from .stages import sft

    sft.run(_config(args), args.source, args.out, data=args.data, fresh=args.fresh, skip_bad_rows=args.skip_bad_rows)
    return 0


def _required(value, what: str):
    if not value:
        raise UserError(f"{what}: required")
    return value


def cmd_dpo(args: argparse.Namespace) -> int:
    from .stages import dpo

    cfg = _config(args)
    dpo.run(cfg, args.policy, _required(args.prefs or cfg.dpo.prefs, "--prefs (or dpo.prefs)"), args.out,
            fresh=args.fresh, skip_bad_rows=args.skip_bad_rows)
    return 0


def cmd_prefs(args: argparse.Namespace) -> int:
    from .stages import prefs

    if getattr(args, "prefs_action", None) == "export":
        try:
            from .data.feedback import export_prefs
        except ImportError as e:
            raise UserError(f"prefs export needs gptstack.serve ({e})") from None
        n = export_prefs(args.run, args.out, kwise=args.kwise)
        print(f"wrote {n} comparison rows from {args.run} to {args.out}", file=sys.stderr)
        return 0
    if args.out is None:
        raise UserError("prefs: --out RUN is required")
    overrides = {"prefs": {k: v for k, v in (("k", args.k), ("prompts", args.prompts)) if v is not None}}
    prefs.run(_config(args, overrides), args.source, args.out, rankings=args.rankings, fresh=args.fresh,
              skip_bad_rows=args.skip_bad_rows)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .stages import rm

    cfg = _config(args)
    rm.run(cfg, args.source, _required(args.prefs or cfg.rm.prefs, "--prefs (or rm.prefs)"), args.out, fresh=args.fresh,
           skip_bad_rows=args.skip_bad_rows)
    return 0


def cmd_bon(args: argparse.Namespace) -> int:
    from .stages import bon

    overrides = {"bon": {"n": args.n}} if args.n else None
    bon.run(_config(args, overrides), args.policy, args.rm, args.out, fresh=args.fresh)
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    from .stages import ppo

    cfg = _config(args)
    tc = getattr(cfg, args.stage)
    # the flags, else the config's keys (grpo.reward, <stage>.prompts), as `gptstack run` reads them
    reward, prompts = ppo.reward_source(getattr(args, "reward", None) or getattr(tc, "reward", "rm"),
                                        args.prompts or tc.prompts or None)
    ppo.run(cfg, args.policy, args.out, rm_dir=args.rm, reward=reward, prompts=prompts,
            stage=args.stage, fresh=args.fresh, skip_bad_rows=args.skip_bad_rows)
    return 0


def cmd_prm(args: argparse.Namespace) -> int:
    from .stages import prm

    prm.run(_config(args), args.source, args.out, data=args.data, fresh=args.fresh, skip_bad_rows=args.skip_bad_rows)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .stages import search

    overrides = {"search": {"n": args.n}} if args.n else None
    search.run(_config(args, overrides), args.policy, args.prm, args.out, orm_dir=args.orm, rm_dir=args.rm,
               data=args.data, fresh=args.fresh)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from . import pipeline

    from .config import apply_run_seed

    pipeline.run(apply_run_seed(_config(args), args.seed), args.out, stages=args.stages, report=not args.no_report)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    md, page = write_report(args.run, _config(args).report)
    print(f"report: wrote {md} and {page}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .config import apply_sets
    from .eval.protocol import evaluate_policy
    from .rundir import load_model, load_stage

    stage = Path(args.stage)
    model, cfg, tok = load_stage(stage)
    apply_sets(cfg, args.set or [])
    chat = stage.name != "pretrain"
    reference = None
    sft_dir = stage.parent / "sft"
    if chat and stage.resolve() != sft_dir.resolve() and (sft_dir / "model.safetensors").exists():
        reference, _ = load_model(sft_dir)
    figures, _ = evaluate_policy(model, tok, cfg.world, cfg.eval, chat=chat, reference_model=reference)
    print(json.dumps(figures, indent=2))
    return 0


def resolve_stage(path: str) -> Path:
    """RUN/STAGE as given, or for a bare RUN its most trained chat model."""
    p = Path(path)
    if (p / "model.safetensors").exists():
        return p
    for stage in ("ppo", "grpo", "dpo", "sft", "pretrain"):
        if (p / stage / "model.safetensors").exists():
            return p / stage
    raise UserError(f"{p}: no trained model here (expected RUN/STAGE/model.safetensors)")


def sampling_settings(args: argparse.Namespace):
    """chat's and sample's sampling: the config's `sampling` section (--recipe, then --set), each
    sampling flag given on the command line winning; checked against the section's ranges."""
    from .config import check_ranges

    s = _config(args).sampling
    flags = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "max_new_tokens", "seed")
             if getattr(args, name, None) is not None}
    if flags.get("top_p") == 0:  # `--top-p 0` meant off before top_p = 1 did: still accepted
        flags["top_p"] = 1.0
    for name, value in flags.items():
        setattr(s, name, value)
    check_ranges(s, "command line", "sampling.")
    return s


def cmd_chat(args: argparse.Namespace) -> int:
    from .engine.chat import fit_history, stream_reply
    from .rundir import load_stage

    s = sampling_settings(args)
    stage = resolve_stage(args.run)
    model, _, tok = load_stage(stage)
    model.eval()
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {stage} ({model.num_params() / 1e6:.1f}M params); /reset clears the history, "
              "Ctrl-D quits", file=sys.stderr)
    history: list[dict] = []
    turn = 0
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        # the oldest turns are dropped (left-truncation) when the history outgrows the context
        history = fit_history(tok, [*history, {"role": "user", "content": line}], s.max_new_tokens,
                              model.config.block_size)
        sys.stdout.write("assistant> ")

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        reply, _ = stream_reply(model, tok, history, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                top_k=s.top_k or None, top_p=s.top_p if s.top_p < 1 else None, seed=s.seed + turn,
                                on_text=show)
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply})
        turn += 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve.app import serve
    except ImportError as e:  # fastapi / uvicorn missing from a partial install
        raise UserError(f"gptstack serve needs FastAPI and uvicorn ({e}); pip install fastapi uvicorn") from None
    import os

    # the environment keeps the token out of `ps` listings and shell history
    token = args.token or os.environ.get("GPTSTACK_SERVE_TOKEN") or None
    serve(args.run, _config(args), host=args.host, port=args.port, token=token)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .engine import generate
    from .rundir import load_stage

    s = sampling_settings(args)
    stage = resolve_stage(args.stage)
    model, _, tok = load_stage(stage)
    model.eval()
    if args.chat:  # the prompt is a user turn, rendered with the chat template
        prompt, stop = tok.render_prompt([{"role": "user", "content": args.prompt}]), tok.turn_end_ids
    else:
        prompt, stop = [tok.bos_id, *tok.encode(args.prompt)], []
    (completions,) = generate(model, [prompt], s.max_new_tokens, n=args.num_samples, temperature=s.temperature,
                              top_k=s.top_k or None, top_p=s.top_p if s.top_p < 1 else None, stop_ids=stop,
                              seed=s.seed)
    for k, c in enumerate(completions):
        if args.num_samples > 1:
            print(f"--- sample {k + 1}")
        text = tok.decode(c.tokens[:-1] if c.finished else c.tokens)  # without the end token
        print(text if args.chat else args.prompt + text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .model.hf import export_hf
    from .tokenizer import Tokenizer
    from .rundir import load_model

    stage = Path(args.stage)
    model, _ = load_model(stage)
    tok_dir = stage.parent / "tokenizer"
    tok = Tokenizer.load(tok_dir) if (tok_dir / "gptstack.json").exists() else None
    export_hf(model, args.out, tok)
    from .tokenizer.hf_import import is_qwen2_layout
    if tok is not None and model.config.hf_family == "qwen2" and not is_qwen2_layout(tok):
        print(f"warning: {args.out} is a qwen2 model directory, which transformers >= 5 tokenizes with "
              "Qwen2Tokenizer (Qwen2's own normalizer and pre-tokenizer, whatever tokenizer.json says); this "
              "run's tokenizer pre-tokenizes otherwise, so transformers' ids will differ from gptstack's",
              file=sys.stderr)
    print(f"wrote {args.out}: AutoModelForCausalLM.from_pretrained({str(args.out)!r})"
          + ("" if tok else " (no tokenizer found beside the stage)"), file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .stages import hf_import

    hf_import.run(args.dir, args.out, chat=getattr(args, "chat", None))
    return 0


def add_stage_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    """The flags every stage command shares (DESIGN.md, Commands)."""
    p.add_argument("--out", required=out_required, metavar="RUN", help="run directory (the stage writes RUN/<stage>/)")
    p.add_argument("--recipe", default="tiny", metavar="NAME|FILE.toml",
                   help="recipe: a built-in name (see `gptstack recipes`) or a TOML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pretrain.lr=3e-3 (repeatable)")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming from RUN/<stage>/checkpoint")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """chat's and sample's sampling flags, their defaults the config's `sampling` section (shown as
    the dataclass has them; a recipe or --set sampling.KEY=VALUE changes them), and --recipe/--set."""
    import dataclasses

    from .sampling_config import SamplingConfig

    defaults = SamplingConfig()
    for f in dataclasses.fields(SamplingConfig):
        # SUPPRESS: a flag not given is absent from args, and the formatter adds no "(default: None)"
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int if f.type in (int, "int") else float,
                       default=argparse.SUPPRESS, metavar=f.name.upper(),
                       help=f"{f.metadata['help']} (default: sampling.{f.name} = {getattr(defaults, f.name)})")
    p.add_argument("--recipe", default="tiny", metavar="NAME|FILE.toml",
                   help="recipe whose [sampling] section gives the defaults")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sampling.temperature=1.0 (repeatable)")


# --- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="gptstack",
        description="Train a GPT assistant end to end: tokenizer, pretraining, SFT, reward model, RL.",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"gptstack {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tok = commands.add_parser("tokenizer", help="train a BPE tokenizer, encode and decode text",
                              description="Byte-level BPE tokenizer: train, encode, decode.", formatter_class=fmt)
    tok_commands = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    train = tok_commands.add_parser(
        "train", help="train byte-level BPE on text files", formatter_class=fmt,
        description="Train a byte-level BPE tokenizer on UTF-8 text files and write DIR/gptstack.json "
                    "and DIR/tokenizer.json (HF format).",
    )
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files to train on")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="total vocabulary: 256 bytes + merges + special tokens")
    train.add_argument("--out", required=True, metavar="DIR", help="directory to write the tokenizer to")
    train.add_argument("--pattern", default="gpt4", metavar="gpt4|gpt2|digits|none|REGEX",
                       help="pre-split regex: a built-in name or any regex")
    train.add_argument("--specials", choices=("default", "none"), default="default",
                       help="add gptstack's chat special tokens (<|bos|>, <|user_start|>, ...)")
    train.add_argument("--workers", type=int, default=None, metavar="N",
                       help="processes for the regex pre-split (default: all cores)")
    train.set_defaults(handler=cmd_tokenizer_train)

    enc = tok_commands.add_parser("encode", help="text on stdin -> token ids on stdout", formatter_class=fmt,
                                  description="Encode stdin as ordinary text (special-token strings stay "
                                              "plain text); print space-separated ids.")
    enc.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer directory")
    enc.add_argument("--bos", action="store_true", help="prepend the <|bos|> id")
    enc.set_defaults(handler=cmd_tokenizer_encode)

    dec = tok_commands.add_parser("decode", help="token ids on stdin -> text on stdout", formatter_class=fmt,
                                  description="Decode ids (separated by spaces, commas or newlines; a JSON "
                                              "list works) to text; invalid UTF-8 becomes U+FFFD.")
    dec.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer directory")
    dec.set_defaults(handler=cmd_tokenizer_decode)

    show = tok_commands.add_parser("show", help="show token boundaries (and a chat's loss mask)", formatter_class=fmt,
                                   description="Print stdin split into its tokens. With --chat, stdin is a JSON "
                                               "list of {role, content} messages, rendered with the chat "
                                               "template, trained tokens (loss mask 1) highlighted.")
    show.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer directory")
    show.add_argument("--chat", action="store_true", help="stdin is a JSON list of messages")
    show.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="ANSI colours")
    show.set_defaults(handler=cmd_tokenizer_show)

    pre = commands.add_parser("pretrain", help="pretrain a GPT on a text corpus", formatter_class=fmt,
                              description="Next-token pretraining. Trains RUN/tokenizer first when absent, packs "
                                          "the corpus into RUN/data, writes RUN/pretrain (resumable).")
    pre.add_argument("--data", nargs="+", metavar="PATH", help="text / JSONL files (default: the recipe's corpus)")
    add_stage_args(pre)
    pre.add_argument("--skip-bad-rows", action="store_true",
                     help="skip (and count in summary.json) malformed JSONL rows instead of stopping")
    pre.set_defaults(handler=cmd_pretrain)

    sft_p = commands.add_parser("sft", help="supervised fine-tuning on demonstrations", formatter_class=fmt,
                                description="Fine-tune a pretrained model on conversations (loss on assistant "
                                            "tokens only); evaluates the base model few-shot and the result.")
    sft_p.add_argument("--from", dest="source", required=True, metavar="RUN/pretrain", help="the model to fine-tune")
    sft_p.add_argument("--data", default=None, metavar="FILE|world",
                       help="conversations (TRL messages, prompt+completion, ...); default: world demonstrations")
    add_stage_args(sft_p)
    sft_p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    sft_p.set_defaults(handler=cmd_sft)

    prefs_p = commands.add_parser(
        "prefs", help="collect comparisons: K samples per prompt ranked by the simulated labeler", formatter_class=fmt,
        description="Sample K responses per world prompt from the SFT policy and rank them with the simulated "
                    "labeler (or read rankings from a file: TRL prompt/chosen/rejected, hh-rlhf, K-wise); writes "
                    "RUN/prefs/prefs.jsonl. `gptstack prefs export RUN --out FILE` writes the comparisons "
                    "collected in `gptstack serve` instead.")
    prefs_p.add_argument("--from", dest="source", metavar="RUN/sft", help="the policy to sample from")
    prefs_p.add_argument("--k", type=int, default=None, metavar="K", help="responses per prompt (default: prefs.k)")
    prefs_p.add_argument("--prompts", type=int, default=None, metavar="N", help="prompts (default: prefs.prompts)")
    prefs_p.add_argument("--rankings", default=None, metavar="FILE", help="read comparisons from FILE instead of sampling")
    add_stage_args(prefs_p, out_required=False)
    prefs_p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    prefs_p.set_defaults(handler=cmd_prefs)
    prefs_actions = prefs_p.add_subparsers(dest="prefs_action", metavar="ACTION", required=False)
    export_p = prefs_actions.add_parser(
        "export", help="write the comparisons collected in `gptstack serve` as JSONL", formatter_class=fmt,
        description="Write RUN's feedback store as preference JSONL: pairs (TRL prompt/chosen/rejected) or, "
                    "with --kwise, one ranking row per prompt.")
    export_p.add_argument("run", metavar="RUN", help="the run directory holding the feedback store")
    export_p.add_argument("--out", required=True, metavar="FILE", help="the JSONL file to write")
    export_p.add_argument("--kwise", action="store_true", help="one K-wise ranking row per prompt instead of pairs")
    export_p.set_defaults(handler=cmd_prefs)

    rm_p = commands.add_parser(
        "rm", help="train a reward model on comparisons (Bradley-Terry)", formatter_class=fmt,
        description="A scalar head on the SFT trunk trained with -log sigmoid(r_w - r_l) on all C(K,2) pairs of "
                    "each ranking; held-out accuracy, correct-vs-wrong accuracy and gold correlation; the reward "
                    "normalised to mean 0, std 1 on the SFT policy's responses. Writes RUN/rm.")
    rm_p.add_argument("--from", dest="source", required=True, metavar="RUN/sft", help="the model whose trunk starts the RM")
    rm_p.add_argument("--prefs", default=None, metavar="FILE|RUN/prefs|FILE.sqlite",
                      help="comparisons: a preference/ranking file, a prefs directory or a feedback store "
                           "(default: the config's rm.prefs)")
    add_stage_args(rm_p)
    rm_p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    rm_p.set_defaults(handler=cmd_rm)

    bon_p = commands.add_parser(
        "bon", help="best-of-N against the reward model, measured with gold", formatter_class=fmt,
        description="Sample max(n) responses per held-out eval prompt, pick the reward model's best of n for each "
                    "n; proxy and gold reward, accuracy, KL_bon = log n - (n-1)/n and the fit "
                    "gold gain = d(alpha - beta d). Writes RUN/bon.")
    bon_p.add_argument("--policy", required=True, metavar="RUN/sft", help="the policy to sample from")
    bon_p.add_argument("--rm", required=True, metavar="RUN/rm", help="the reward model")
    bon_p.add_argument("--n", default=None, metavar="N,N,...", help="the n values (default: bon.n)")
    add_stage_args(bon_p)
    bon_p.set_defaults(handler=cmd_bon)

    dpo_p = commands.add_parser("dpo", help="direct preference optimisation of the SFT policy", formatter_class=fmt,
                                description="DPO (sigmoid or IPO loss) on preference pairs against the frozen "
                                            "SFT model, whose logprobs are computed once; K-wise rankings give their "
                                            "pairs (dpo.pairs). Logs TRL's rewards/* and logps/* metrics, then runs the "
                                            "evaluation protocol with KL to the SFT model. Writes RUN/dpo.")
    dpo_p.add_argument("--policy", required=True, metavar="RUN/sft", help="the policy to start from (and reference)")
    dpo_p.add_argument("--prefs", default=None, metavar="FILE|RUN/prefs",
                       help="preferences: TRL prompt/chosen/rejected, hh-rlhf or ranking rows, or RUN/prefs "
                            "(default: the config's dpo.prefs)")
    add_stage_args(dpo_p)
    dpo_p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    dpo_p.set_defaults(handler=cmd_dpo)

    run_p = commands.add_parser(
        "run", help="the whole pipeline, resumable, then the report card", formatter_class=fmt,
        description="tokenizer -> pretrain -> sft -> prefs -> rm -> bon -> ppo -> overopt -> grpo -> dpo -> prm -> "
                    "search in one command: a stage whose summary.json exists is skipped, an interrupted one resumes "
                    "from its checkpoint, so running the same command again after a kill continues. Ends with "
                    "RUN/report.md and RUN/report.html.")
    run_p.add_argument("--out", default="runs/tiny", metavar="RUN", help="run directory")
    run_p.add_argument("--recipe", default="tiny", metavar="NAME|FILE.toml", help="recipe (values for every stage)")
    run_p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    run_p.add_argument("--stages", default=None, metavar="a,b,...", help="run only these stages (in pipeline order)")
    run_p.add_argument("--no-report", action="store_true", help="skip writing the report card at the end")
    run_p.add_argument("--seed", type=int, default=0, metavar="N",
                       help="derive every stage's seeds (init, data order, sampling, labeler noise, RL prompts) from N; "
                            "the eval set stays fixed (0 = the recipe's seeds)")
    run_p.set_defaults(handler=cmd_run)

    rl_help = {
        "ppo": ("PPO-RLHF on the reward model (KL penalty, adaptive KL, PPO-ptx)",
                "InstructGPT's RL stage: rollouts from the SFT policy, reward = RM score at the end minus "
                "beta x per-token KL to the frozen SFT model, GAE with a critic initialised from the RM, "
                "clipped PPO updates. The world's gold reward is logged beside the proxy, with a warning "
                "when the proxy rises while gold falls. Writes RUN/ppo."),
        "overopt": ("the over-optimization study: PPO run long at low beta",
                    "PPO at low (default zero) beta, evaluated on held-out prompts every few updates: proxy "
                    "and gold reward against d = sqrt(KL), the fit gold = d(alpha - beta log d) (Gao et al. "
                    "2023), summary.json points + fit and overopt.png. Writes RUN/overopt."),
        "grpo": ("GRPO/RLOO on a verifiable reward (actual RL)",
                 "G samples per prompt, group-normalised (or leave-one-out) advantages, clipped update, "
                 "optional KL to the reference; reward: the world's gold reward or, for a GSM8K-format "
                 "--prompts file, the answer check. Writes RUN/grpo."),
    }
    for name, (short, long) in rl_help.items():
        p_rl = commands.add_parser(name, help=short, description=long, formatter_class=fmt)
        p_rl.add_argument("--policy", required=True, metavar="RUN/sft", help="the policy to start from (and the frozen reference)")
        p_rl.add_argument("--rm", required=name != "grpo", default=None, metavar="RUN/rm",
                          help="the reward model (and the critic's initialisation)")
        if name == "grpo":
            p_rl.add_argument("--reward", default=None, metavar="gold|rm|FILE",
                              help="(default: the config's grpo.reward, gold) gold: the world's gold reward; rm: the reward model (--rm); FILE: a "
                                   "verifiable file (GSM8K question/answer '#### n', or prompt + answer rows) "
                                   "whose prompts are trained on and whose final answers are checked; its last "
                                   "rows (<= 10 %%, grpo.eval_prompts) are held out for the answer accuracy")
        p_rl.add_argument("--prompts", default=None, metavar="FILE|world",
                          help=f"training prompts (default: the config's {name}.prompts, else the world's); any "
                               "prompt/chat/preference/GSM8K file")
        add_stage_args(p_rl)
        p_rl.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
        p_rl.set_defaults(handler=cmd_rl, stage=name)

    prm_p = commands.add_parser(
        "prm", help="train a process reward model (and an outcome RM on the same samples)", formatter_class=fmt,
        description="Sample the SFT policy on training prompts, label every step (line) with the world's step "
                    "checker or by Monte-Carlo rollouts (Math-Shepherd), and train a PRM (one score per step) and "
                    "an ORM (final correctness only) on the same responses and budget. Writes RUN/prm, RUN/prm/orm "
                    "and RUN/prm/steps.jsonl (TRL stepwise format).")
    prm_p.add_argument("--from", dest="source", required=True, metavar="RUN/sft",
                       help="the policy to sample from (its trunk starts both models)")
    prm_p.add_argument("--data", default=None, metavar="FILE|world",
                       help="TRL stepwise rows (prompt, completions, labels) to train on as they are, or prompts with "
                            "answers (GSM8K, prompt+answer) to sample and label by rollouts; default: world prompts")
    add_stage_args(prm_p)
    prm_p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    prm_p.set_defaults(handler=cmd_prm)

    search_p = commands.add_parser(
        "search", help="best-of-N by PRM, ORM, RM and majority vote; PRM-guided step search", formatter_class=fmt,
        description="On held-out prompts (the world's multi-step arithmetic by default): best-of-N selected by the "
                    "PRM (min or product of step scores), the ORM, the preference RM and majority vote for each N, "
                    "and a PRM-guided step-level beam search at the same generated-token budget. Writes "
                    "RUN/search/summary.json (accuracy and tokens per method and N) and picks.jsonl.")
    search_p.add_argument("--policy", required=True, metavar="RUN/sft", help="the policy to sample from")
    search_p.add_argument("--prm", required=True, metavar="RUN/prm", help="the process reward model")
    search_p.add_argument("--orm", default=None, metavar="RUN/prm",
                          help="the outcome reward model (RUN/prm finds RUN/prm/orm; default: beside --prm)")
    search_p.add_argument("--rm", default=None, metavar="RUN/rm|none",
                          help="the preference reward model (default: RUN/rm beside the policy); none: leave rm out")
    search_p.add_argument("--data", default=None, metavar="FILE|world",
                          help="prompts with answers (GSM8K, prompt+answer) instead of the world's held-out set")
    search_p.add_argument("--n", default=None, metavar="N,N,...", help="the N values (default: search.n)")
    add_stage_args(search_p)
    search_p.set_defaults(handler=cmd_search)

    ev = commands.add_parser("eval", help="the evaluation protocol on a stage's model", formatter_class=fmt,
                             description="Greedy accuracy (per family, 95% interval), gold reward, format rate, "
                                         "pass@k and KL to RUN/sft on the world's fixed held-out eval set.")
    ev.add_argument("stage", metavar="RUN/STAGE", help="a stage directory with model.safetensors")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help="override e.g. eval.k=8")
    ev.set_defaults(handler=cmd_eval)

    rep = commands.add_parser("report", help="the report card of a run (report.md + report.html)", formatter_class=fmt,
                              description="Read every stage's summary.json, metrics.jsonl and sample responses in "
                                          "RUN and write RUN/report.md (plots as RUN/report-*.png beside it) and a "
                                          "self-contained RUN/report.html: the top table (accuracy with its 95 % "
                                          "interval, gold reward, KL to SFT, wall time), the claims with whether their "
                                          "intervals separate, and a section per stage. Stages not run are marked so.")
    rep.add_argument("run", metavar="RUN", help="a run directory")
    rep.add_argument("--recipe", default="tiny", metavar="NAME|FILE.toml", help="recipe for the report section")
    rep.add_argument("--set", action="append", metavar="KEY=VALUE", help="override e.g. report.samples=3")
    rep.set_defaults(handler=cmd_report)

    chat = commands.add_parser("chat", help="chat with a trained model in the terminal", formatter_class=fmt,
                               description="A terminal chat (streaming, multi-turn history) with RUN/STAGE, or with "
                                           "the most trained model in RUN (ppo, grpo, dpo, sft, then pretrain). "
                                           "Reads stdin line by line when it is not a terminal.")
    chat.add_argument("run", metavar="RUN[/STAGE]", help="a run or stage directory")
    add_sampling_args(chat)
    chat.set_defaults(handler=cmd_chat)

    srv = commands.add_parser("serve", help="chat, compare and rank responses in the browser", formatter_class=fmt,
                              description="A local web app over RUN: chat with any stage's model (streamed), "
                                          "compare two stages on one prompt (gold reward, RM score), and rank K "
                                          "sampled responses; every label goes to RUN/feedback.sqlite at once, "
                                          "which `gptstack rm --prefs RUN/feedback.sqlite` trains on.")
    srv.add_argument("run", metavar="RUN", help="a run directory (with RUN/tokenizer and trained stages)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (the default is this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port")
    srv.add_argument("--token", default=None, metavar="T",
                     help="require `Authorization: Bearer T` on every request but the page, its static files and "
                          "/api/health "
                          "(or set GPTSTACK_SERVE_TOKEN, which `ps` does not show)")
    srv.add_argument("--recipe", default="tiny", metavar="NAME|FILE.toml", help="recipe for the serve, sampling and world sections")
    srv.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a config value, e.g. --set serve.k=3 or --set serve.prompts=prompts.jsonl")
    srv.set_defaults(handler=cmd_serve)

    smp = commands.add_parser("sample", help="sample text from a trained stage", formatter_class=fmt,
                              description="Continue a prompt with a trained model (KV-cache sampling).")
    smp.add_argument("stage", metavar="RUN[/STAGE]", help="a stage directory, or a run (its most trained model)")
    smp.add_argument("--prompt", default="", help="text to continue")
    smp.add_argument("--chat", action="store_true", help="treat the prompt as a user message (chat template)")
    smp.add_argument("--num-samples", type=int, default=1)
    add_sampling_args(smp)
    smp.set_defaults(handler=cmd_sample)

    exp = commands.add_parser("export", help="export a stage's model to HF format", formatter_class=fmt,
                              description="Write a directory that transformers.AutoModelForCausalLM.from_pretrained "
                                          "loads with the same logits (the family imported: LlamaForCausalLM, "
                                          "Qwen2ForCausalLM or MistralForCausalLM), with the run's tokenizer, its chat "
                                          "template and generation_config.json.")
    exp.add_argument("--to", choices=("hf",), default="hf", help="target format")
    exp.add_argument("stage", metavar="RUN/STAGE", help="a stage directory with model.safetensors")
    exp.add_argument("out", metavar="OUT", help="output directory")
    exp.set_defaults(handler=cmd_export)

    imp = commands.add_parser("import", help="import a local HF Llama / Qwen2 / Mistral checkpoint", formatter_class=fmt,
                              description="Load a local Llama, Qwen2/2.5, SmolLM or Mistral checkpoint (config.json + "
                                          "*.safetensors, fp32/bf16/fp16, sharded or not) into gptstack as OUT/pretrain "
                                          "with the same logits as transformers, and its byte-level BPE tokenizer.json, "
                                          "where there is one, as OUT/tokenizer. What gptstack cannot reproduce (another "
                                          "model_type, dynamic/yarn RoPE, a sliding window, ...) is refused naming the "
                                          "field, before any weight is read. `gptstack run --set model.from_hf=DIR` "
                                          "does the same as its first stage (recipe hf-small).")
    imp.add_argument("--from", dest="source", choices=("hf",), default="hf", help="source format")
    imp.add_argument("--chat", choices=("model", "gptstack", "none"), default=argparse.SUPPRESS,
                     help="model (the default when DIR's tokenizer has a chat template, as instruct models do: "
                          "chat_template.jinja or tokenizer_config.json's chat_template): keep the model's own chat "
                          "template (Jinja, rendered as transformers' apply_chat_template does; ChatML's <|im_start|>, "
                          "Llama 3's <|start_header_id|>, ...), the vocabulary and the model unchanged; sft trains on "
                          "assistant tokens only and chats stop at the template's end-of-turn token. "
                          "gptstack (the default for a tokenizer.json without a template, a base model): add "
                          "gptstack's chat special tokens the tokenizer lacks (<|user_start|> <|user_end|> <|assistant_start|> <|assistant_end|> "
                          "<|step|>, and <|bos|> where DIR's tokenizer names no bos_token; otherwise chats start "
                          "with the model's own bos, e.g. <|begin_of_text|>) as new ids after its largest, and grow "
                          "the model's embedding and LM head to match (new rows: the mean of the old ones), so sft, "
                          "rm, dpo, ... and `chat` work on the import. none: keep the tokenizer and model as they are "
                          "(same vocabulary; chat stages then fail for want of the chat tokens)")
    imp.add_argument("dir", metavar="DIR", help="HF model directory")
    imp.add_argument("out", metavar="OUT", help="run directory to write OUT/pretrain into")
    imp.set_defaults(handler=cmd_import)
    from .data.cli import add_commands as add_data_commands
    from .world.cli import add_commands as add_world_commands
    add_data_commands(commands, fmt)
    add_world_commands(commands, fmt)
    return parser


# errnos of an output that cannot be written: a user's problem to fix, not a bug to trace
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def check_writable(out: str) -> None:
    """Refuse an output path that cannot be written, before any work: the nearest existing folder
    on its path must take a new file (tried with a temporary one, removed at once)."""
    path = Path(out).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if probe == path and not path.is_dir():  # an output file that exists: its folder must take the new one
        probe = path.parent
    if not probe.is_dir():
        raise UserError(f"{out}: cannot be created: {probe} is a file, not a directory")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise UserError(f"{out}: cannot write under {probe} ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if isinstance(getattr(args, "out", None), str):
            check_writable(args.out)
        return args.handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _UNWRITABLE:
            raise
        # atomic writes leave every earlier file whole: say which write failed and what is kept
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}cannot write ({e.strerror or e}); what was written before is intact, and a rerun "
              "resumes from the last checkpoint", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
