"""An imported model keeps its own chat template (`gptstack import --chat model`, the default where
DIR's tokenizer has one): chats render with the same ids as transformers' `apply_chat_template`,
sft trains on the assistant's tokens only, generation stops at the template's end-of-turn token,
and the export carries the template back.

The templates are Qwen2.5-Instruct's (ChatML, a default system message) and Meta-Llama-3-Instruct's,
as their tokenizer_config.json files ship them; every tokenizer and model is built in the test."""
import io
import json
import sys
from collections.abc import Mapping

import pytest
import torch

from gptstack.cli import main
from gptstack.common import UserError
from gptstack.rundir import load_stage
from gptstack.tokenizer import Tokenizer
from gptstack.tokenizer.chat_template import read_chat_template
from gptstack.tokenizer.tokenizer import stored_identity

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

CHATML = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# name: (template, added special tokens, bos/eos/pad roles, the end-of-turn token)
FLAVOURS = {
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"), "<|eot_id|>"),
}
CORPUS = "".join(f"The quick brown fox jumps over the lazy dog {i} times. What is {i} + {i + 1}? It is {2 * i + 1}.\n"
                 for i in range(60))
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "And 4 + 4? Say <|im_end|> then."},  # a special string in text: HF matches it
    {"role": "assistant", "content": " It is 8. "},
]
CONVERSATIONS = [CHAT, CHAT[1:], CHAT[:3]]  # with a system message, without (ChatML's default one), one turn
PROMPTS = [CHAT[:4], CHAT[1:4], CHAT[:2], CHAT[1:2]]


def _hf_tokenizer(specials, roles, template):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **roles)


def ids_of(encoded) -> list[int]:  # apply_chat_template returns a BatchEncoding or a list, by version
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


def masked_spans(tok, ids, mask) -> list[str]:
    spans, cur = [], []
    for i, m in zip([*ids, None], [*mask, 0]):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans


def _saved(name, d):
    """(ours, transformers' AutoTokenizer) of flavour `name`, saved as save_pretrained writes it."""
    template, specials, roles, _ = FLAVOURS[name]
    _hf_tokenizer(specials, roles, template).save_pretrained(d)
    return Tokenizer.from_huggingface(d).with_chat_template(read_chat_template(d)), transformers.AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module", params=list(FLAVOURS))
def flavour(request, tmp_path_factory):
    ours, hf = _saved(request.param, tmp_path_factory.mktemp(request.param))
    _, _, roles, end = FLAVOURS[request.param]
    return request.param, ours, hf, end, roles


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_conversation_ids_and_mask_match_transformers(flavour, k):
    name, tok, hf, end, _ = flavour
    messages = CONVERSATIONS[k]
    ids, mask = tok.render_conversation(messages)
    assert ids == ids_of(hf.apply_chat_template(messages, tokenize=True))
    assert ids.count(tok.special_tokens.get("<|begin_of_text|>", -1)) == (name == "llama3")  # one BOS, the template's
    # 1 exactly on each assistant turn's content and its end-of-turn token (Llama 3's template trims content)
    answers = [m["content"] if name == "chatml" else m["content"].strip() for m in messages if m["role"] == "assistant"]
    assert masked_spans(tok, ids, mask) == [a + end for a in answers]


@pytest.mark.parametrize("k", range(len(PROMPTS)))
def test_prompt_ids_match_transformers(flavour, k):
    _, tok, hf, _, _ = flavour
    prompt = tok.render_prompt(PROMPTS[k])
    assert prompt == ids_of(hf.apply_chat_template(PROMPTS[k], tokenize=True, add_generation_prompt=True))
    # the conversation starts with the prompt: what sft trains is what chat samples from
    answered = [*PROMPTS[k], {"role": "assistant", "content": "It is 5."}]
    assert tok.render_conversation(answered)[0][: len(prompt)] == prompt


def test_turn_end_ids_and_identity(flavour, tmp_path):
    name, tok, _, end, roles = flavour
    # the template's end-of-turn token first, then the eos where it differs
    want = [end] + ([roles["eos_token"]] if roles["eos_token"] != end else [])
    assert tok.turn_end_ids == [tok.special_tokens[s] for s in want]
    plain = tok.with_chat_template(None)
    assert plain.identity != tok.identity and plain.encode(CORPUS[:100]) == tok.encode(CORPUS[:100])
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.chat_template == tok.chat_template and back.identity == tok.identity == stored_identity(tmp_path)
    assert json.loads((tmp_path / "gptstack.json").read_text())["version"] == 3
    plain.save(tmp_path / "plain")  # without a template the file and identity are as before
    assert "chat_template" not in json.loads((tmp_path / "plain" / "gptstack.json").read_text())
    assert stored_identity(tmp_path / "plain") == plain.identity
    with pytest.raises(UserError, match="no special token"):  # gptstack's own format is not there to fall back on
        plain.render_prompt(CHAT[1:2])


def test_where_the_template_is_read_from(tmp_path):
    _hf_tokenizer(FLAVOURS["chatml"][1], {}, None).save_pretrained(tmp_path)
    assert read_chat_template(tmp_path) is None
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": LLAMA3}))
    assert read_chat_template(tmp_path) == LLAMA3
    config_path.write_text(json.dumps({**config, "chat_template": [{"name": "tool_use", "template": "x"},
                                                                   {"name": "default", "template": LLAMA3}]}))
    assert read_chat_template(tmp_path) == LLAMA3
    (tmp_path / "chat_template.jinja").write_text(CHATML)  # transformers >= 4.43's file wins, as in AutoTokenizer
    assert read_chat_template(tmp_path) == CHATML
    (tmp_path / "chat_template.jinja").unlink()
    config_path.write_text(json.dumps({**config, "chat_template": [{"name": "tool_use", "template": "x"}]}))
    with pytest.raises(UserError, match="without a 'default'"):
        read_chat_template(tmp_path)


def test_a_template_that_is_not_prefix_stable_is_refused(flavour):
    _, tok, _, _, _ = flavour
    # marks the final assistant message: rendering more messages rewrites earlier text
    shifty = tok.with_chat_template(
        "{% for m in messages %}{% if loop.last and m.role == 'assistant' %}[final]{% endif %}"
        "{{ m.role }}: {{ m.content }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UserError, match=r"chat template of .*not prefix-stable at messages\[2\]"):
        shifty.render_conversation(CHAT)
    with pytest.raises(UserError, match="chat_template: not a valid Jinja template"):
        tok.with_chat_template("{% for m in messages %}")
    with pytest.raises(UserError, match="chat template of .*: TemplateError: no system role"):
        tok.with_chat_template("{{ raise_exception('no system role') }}").render_prompt(CHAT[:2])


def test_generation_markers_agree_with_transformers_assistant_mask(tmp_path):
    """On a template with TRL's {% generation %} markers, transformers' own assistant mask is the one
    gptstack finds by rendering prefixes."""
    tok, hf = _saved("chatml", tmp_path)
    marked = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.role == 'assistant' %}"
              "{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m.content + '<|im_end|>' }}"
              "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    out = hf.apply_chat_template(CHAT, chat_template=marked, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    assert tok.with_chat_template(marked).render_conversation(CHAT) == (out["input_ids"], out["assistant_masks"])


# --- the command line: import, sft, chat, export ---------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama with the ChatML tokenizer, wired as a bigram model: attention and MLP outputs are
    zero, so the logits depend on the last token alone. After the generation prompt's last token it
    says "fox", after "fox" <|im_end|>, so a reply is exactly " fox" if generation stops there."""
    template, specials, roles, _ = FLAVOURS["chatml"]
    d = tmp_path_factory.mktemp("hf_chatml")
    hf_tok = _hf_tokenizer(specials, roles, template)
    hf_tok.save_pretrained(d)
    ours = Tokenizer.from_huggingface(d).with_chat_template(template)
    last, fox, im_end = ours.render_prompt(CHAT[1:2])[-1], ours.encode(" fox")[0], ours.special("<|im_end|>")
    assert ours.encode(" fox") == [fox] and len({last, fox, im_end}) == 3
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 2] = 1.0  # every other token: all logits 0
        emb[last, 2], emb[last, 0] = 0.0, 1.0
        emb[fox, 2], emb[fox, 1] = 0.0, 1.0
        head.zero_()
        head[fox, 0] = head[im_end, 1] = 10.0  # logit 80 after RMSNorm's scaling by sqrt(64)
    model.save_pretrained(d, safe_serialization=True)
    return d


def test_import_keeps_the_template_sft_chat_and_export(hf_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    n = len(transformers.AutoTokenizer.from_pretrained(hf_dir))
    assert main(["import", "--from", "hf", str(hf_dir), str(run)]) == 0  # a template in DIR: --chat model
    assert "own chat template (turns end at <|im_end|>)" in capsys.readouterr().err
    model, _, tok = load_stage(run / "pretrain")
    assert tok.chat_template == CHATML and tok.vocab_size == model.config.vocab_size == n  # no new specials
    assert tok.turn_end_ids == [tok.special("<|im_end|>")]

    # generation stops at <|im_end|>: sample and chat say " fox" and nothing after it
    assert main(["sample", str(run / "pretrain"), "--prompt", "What is 2 + 3?", "--chat",
                 "--set", "sampling.temperature=1.0"]) == 0
    assert capsys.readouterr().out == " fox\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 + 3?\nAnd 4 + 4?\n"))
    assert main(["chat", str(run / "pretrain")]) == 0
    assert capsys.readouterr().out == "assistant>  fox\nassistant>  fox\n"

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": f"What is {i} + {i + 1}?"},
                                                     {"role": "assistant", "content": f"It is {2 * i + 1}."}]}) + "\n"
                            for i in range(16)))
    assert main(["sft", "--from", str(run / "pretrain"), "--data", str(data), "--out", str(run), "--recipe", "micro",
                 "--set", "sft.max_steps=3", "--set", "sft.heldout_fraction=0"]) == 0
    sft_model, _, tok = load_stage(run / "sft")  # the stage is stamped with the templated tokenizer's identity
    assert tok.chat_template == CHATML

    out = tmp_path / "export"
    assert main(["export", "--to", "hf", str(run / "sft"), str(out)]) == 0
    back = transformers.AutoTokenizer.from_pretrained(out)
    assert (back.eos_token, back.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for messages in PROMPTS:
        assert ids_of(back.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)) == \
            tok.render_prompt(messages)
    for messages in CONVERSATIONS:
        assert ids_of(back.apply_chat_template(messages, tokenize=True)) == tok.render_conversation(messages)[0]


def test_template_runs_refuse_what_needs_assistant_start(hf_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["import", "--from", "hf", str(hf_dir), str(run)]) == 0
    capsys.readouterr()
    assert main(["rm", "--from", str(run / "pretrain"), "--prefs", str(tmp_path / "none.jsonl"), "--out", str(run),
                 "--recipe", "micro", "--set", "rm.lm_coef=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: rm.lm_coef: needs gptstack's chat format")


def test_chat_model_without_a_template_is_refused(tmp_path, capsys):
    _hf_tokenizer(FLAVOURS["chatml"][1], {}, None).save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    assert main(["import", "--from", "hf", str(tmp_path / "hf"), str(run), "--chat", "model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --chat model:") and "no chat template" in err[0]
    assert not run.exists()


def test_mask_offsets_follow_the_normalized_text(tmp_path):
    """Qwen2's tokenizer normalizes to NFC, which changes byte lengths ("e" + U+0301 -> "é"): the
    assistant mask is found in the text as encoded, and the ids still equal transformers'."""
    from hf_builders import CHATML, bpe_tokenizer

    corpus = CORPUS + "Café crème, déjà vu.\n" * 20
    tok = bpe_tokenizer(corpus, 400, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], layout="qwen2")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHATML, eos_token="<|im_end|>",
                                         pad_token="<|endoftext|>").save_pretrained(tmp_path)
    ours = Tokenizer.from_huggingface(tmp_path).with_chat_template(read_chat_template(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": "Cafe\u0301 cre\u0300me?"}, {"role": "assistant", "content": "De\u0301ja\u0300 vu."},
            {"role": "user", "content": "Encore?"}, {"role": "assistant", "content": "Cafe\u0301."}]
    ids, mask = ours.render_conversation(chat)
    assert ids == ids_of(hf.apply_chat_template(chat, tokenize=True))
    assert masked_spans(ours, ids, mask) == ["Déjà vu.<|im_end|>", "Café.<|im_end|>"]
