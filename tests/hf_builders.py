"""Tokenizers as Hugging Face models ship them, built in the test (no downloads): shared by the
tokenizer-import, architecture and hf-small tests."""
import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from gptstack.tokenizer.hf_import import QWEN2_PATTERN  # noqa: E402

# ChatML as Qwen2.5 writes it, without its tool-calling branches and default system message
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")



def bpe_tokenizer(corpus: str, vocab_size: int, specials=(), layout: str = "bytelevel"):
    """A byte-level BPE trained on `corpus` by HF tokenizers. layout "bytelevel": GPT-2's
    pre-tokenizer (SmolLM's and Llama 2-era BPEs alike); "qwen2": Qwen2's NFC normalizer, its
    Split regex, then ByteLevel without regex — what transformers >= 5 rebuilds for any qwen2
    directory (Qwen2Tokenizer), whatever its tokenizer.json says."""
    tok = tokenizers.Tokenizer(models.BPE())
    if layout == "qwen2":
        tok.normalizer = tokenizers.normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                          show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok
