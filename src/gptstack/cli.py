"""`gptstack <command>`: thin argument parsing over the library; every command has --help.

Commands register themselves in `build_parser`; each handler takes the parsed args and returns an
exit status. Bad input raises `UserError`, printed as one `error: ...` line with exit status 2
before any work starts.
"""
from __future__ import annotations

import argparse
import re
import sys
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
