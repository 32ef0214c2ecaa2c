"""Import a local Hugging Face model as a run's starting point (`gptstack import --from hf DIR RUN`,
and `gptstack run` with model.from_hf=DIR in place of pretraining):

    RUN/tokenizer   DIR's tokenizer.json (Tokenizer.from_huggingface), with the chat format chosen
    RUN/pretrain    the weights (model/hf.py: same logits as transformers), config.json, summary.json

The chat format (`chat`): "model" keeps DIR's own chat template (the default where it has one, as
instruct models do); "gptstack" adds gptstack's chat specials after the largest id and grows the
embedding and LM head with mean rows (the default for a base model's tokenizer); "none" keeps the
vocabulary without a chat format. Everything is read and checked before anything is written.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ..common import UserError
from ..config import Config
from ..model.gpt import resize_vocab
from ..model.hf import import_hf
from ..rundir import adopt_tokenizer, save_model, write_summary
from ..tokenizer import Tokenizer
from ..tokenizer.chat_template import read_chat_template

CHATS = ("model", "gptstack", "none")


def run(source: str | Path, out: str | Path, chat: str | None = None) -> dict:
    source, run_dir = Path(source), Path(out)
    if chat is not None and chat not in CHATS:
        raise UserError(f"chat format: expected one of {', '.join(CHATS)}, got {chat!r}")
    has_tok = (source / "tokenizer.json").is_file()
    template = read_chat_template(source) if has_tok and chat in (None, "model") else None
    # an instruct model's user expects its own format; a base model (no template) gets gptstack's
    chat = chat or ("model" if template else "gptstack" if has_tok else "none")
    if chat in ("gptstack", "model") and not has_tok:
        raise UserError(f"--chat {chat}: {source / 'tokenizer.json'} not found (the chat format belongs to DIR's "
                        "tokenizer); use --chat none")
    if chat == "model" and template is None:
        raise UserError(f"--chat model: {source} has no chat template (neither chat_template.jinja nor "
                        "tokenizer_config.json's chat_template); use --chat gptstack to add gptstack's chat tokens")
    tok = Tokenizer.from_huggingface(source) if has_tok else None
    ends: list[int] = []
    if chat == "model":
        tok = tok.with_chat_template(template)
        ends = tok.turn_end_ids  # renders a probe chat: a template that cannot chat is refused before any write
    model = import_hf(source)
    model.config.from_hf = str(source)
    added: list[str] = []
    if tok is not None:
        # a checkpoint may have more rows than its tokenizer has ids (Qwen2.5 pads 151,665 ids to 151,936
        # rows), never fewer (as every stage checks: rundir.check_vocab)
        if tok.vocab_size > model.config.vocab_size:
            raise UserError(f"{source / 'tokenizer.json'}: {tok.vocab_size} ids (0..{tok.vocab_size - 1}), but "
                            f"{source / 'config.json'} vocab_size is {model.config.vocab_size}: the model has no "
                            "rows for the last ids")
        if chat == "gptstack":
            # new specials after the largest id (in the padding rows where there are some); their rows
            # in the embedding and LM head start at the mean of the tokenizer's rows, so the logits of
            # every old id stay as they were
            n = tok.vocab_size
            tok, added = tok.with_chat_specials()
            model = resize_vocab(model, tok.vocab_size, new_ids=[tok.special_tokens[s] for s in added], mean_of=n)
        with tempfile.TemporaryDirectory() as tmp:  # refused, before the stage is written, if RUN holds another
            tok.save(tmp)
            adopt_tokenizer(Path(tmp), run_dir, source_name=str(source / "tokenizer.json"))
    cfg = Config(name=f"import:{source}", model=model.config)
    stage = run_dir / "pretrain"
    save_model(stage, model.state_dict(), cfg.to_dict())
    summary = {"imported_from": str(source), "chat": chat, "params": model.num_params(),
               "vocab_size": model.config.vocab_size, "added_specials": added,
               "architecture": model.config.hf_family}
    write_summary(stage, summary)   # the stage is complete: `gptstack run` skips it
    print(f"wrote {stage} ({model.num_params() / 1e6:.1f}M params)"
          + (f" and {run_dir / 'tokenizer'} ({tok.vocab_size} ids)" if tok else " (no tokenizer.json in DIR)")
          + (f"; added chat specials {' '.join(added)}" if added else "")
          + (f"; chats use the model's own chat template (turns end at {' '.join(tok.decode([i]) for i in ends)})"
             if ends else "")
          + (f"; chats start with the model's own bos {tok.special_roles['bos_token']}"
             if chat == "gptstack" and tok is not None and tok.bos_id != tok.special_tokens.get("<|bos|>") else ""),
          file=sys.stderr)
    return summary
