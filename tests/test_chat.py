"""data=chat: conversations rendered as transformers' apply_chat_template renders them (two families' templates on a
tokenizer made here), assistant turns the only labels, the ShareGPT and Alpaca layouts, bad records named."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatrain_lightning.data.chat import ChatTemplate, encode, to_messages
from megatrain_lightning.data import IGNORE, ChatDataModule
from megatrain_lightning.errors import UserError

# The templates as the models' tokenizer_config.json files carry them (Meta-Llama-3-8B-Instruct, Qwen2-7B-Instruct,
# Mistral-7B-Instruct-v0.1)
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
         "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
         "{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
           "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# Qwen2's with the assistant's text in {% generation %} (the tag transformers' return_assistant_tokens_mask reads;
# SmolLM3's and others' templates carry it)
QWEN2_GENERATION = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
                    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
                    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
FAMILIES = {"llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"), "qwen2": (QWEN2, None, "<|im_end|>"),
            "mistral": (MISTRAL, "<s>", "</s>"), "qwen2-generation": (QWEN2_GENERATION, None, "<|im_end|>")}
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
            "<|im_end|>", "<s>", "</s>"]

CHAT = [{"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Two plus two is four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six."}]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["What is two plus two? Two plus two is four. And three plus three? Six. You are a helpful assistant.",
            "system user assistant [INST] [/INST]"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _model_dir(tmp_path, tokenizer_file, family: str):
    source, bos, eos = FAMILIES[family]
    d = tmp_path / family
    d.mkdir()
    (d / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": source, "eos_token": eos}
    if bos:
        config["bos_token"] = bos
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rendering_equals_transformers_apply_chat_template(family, tmp_path, tokenizer_file):
    from transformers import AutoTokenizer

    d = _model_dir(tmp_path, tokenizer_file, family)
    reference = AutoTokenizer.from_pretrained(str(d))
    template = ChatTemplate.from_config(d / "tokenizer_config.json")
    for messages in (CHAT, CHAT[:1], CHAT[:3]):
        for prompt in (False, True):
            assert template.render(messages, add_generation_prompt=prompt) == \
                reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    ids, _ = encode(Tokenizer.from_file(str(d / "tokenizer.json")), template, CHAT, "test")
    want = reference.apply_chat_template(CHAT, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert ids == list(want)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_assistant_tokens_are_trained(family, tmp_path, tokenizer_file):
    d = _model_dir(tmp_path, tokenizer_file, family)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    template = ChatTemplate.from_config(d / "tokenizer_config.json")
    ids, mask = encode(tok, template, CHAT, "test")
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    eos = FAMILIES[family][2]
    for turn in ("Two plus two is four.", "Six."):
        assert turn + eos in trained  # the turn and its end-of-turn marker: the model learns to stop
    for question in ("What is two plus two?", "And three plus three?"):
        assert question in untrained and question not in trained
    assert "assistant" not in trained  # the headers that open a turn are the prompt's


def test_the_data_module_labels_assistant_tokens(tmp_path, tokenizer_file):
    d = _model_dir(tmp_path, tokenizer_file, "qwen2")
    data = tmp_path / "chat.jsonl"
    lines = [{"messages": CHAT},
             {"conversations": [{"from": "human", "value": "What is two plus two?"},
                                {"from": "gpt", "value": "Four."}]},
             {"instruction": "Add the numbers.", "input": "two and two", "output": "Four."}] * 4
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    dm = ChatDataModule(data, d / "tokenizer.json", seq_len=32, micro_batch=2, val_fraction=0.0)
    dm.setup()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    trained = []
    for i in range(len(dm.train)):
        labels = dm.train[i]["labels"]
        trained += labels[labels != IGNORE].tolist()
    text = tok.decode(trained, skip_special_tokens=False)
    # 12 records: 8 answers "Four.", 4 "Six."; the windows drop the stream's tail (less than one window)
    assert text.count("Four.<|im_end|>") >= 7 and text.count("Six.<|im_end|>") >= 3, text
    rest = text
    for turn in ("Two plus two is four.<|im_end|>\n", "Six.<|im_end|>\n", "Four.<|im_end|>\n"):
        rest = rest.replace(turn, "")
    assert len(rest) < 30, rest  # only the turns (a cut one at the stream's ends at most)
    assert "What is" not in text and "Add the numbers" not in text
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32) and batch["labels"].dtype == torch.int64


def test_layouts_map_onto_messages():
    assert to_messages({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                          {"from": "gpt", "value": "a"}]}, "x") == \
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert to_messages({"instruction": "do", "input": "this", "output": "done"}, "x") == \
        [{"role": "user", "content": "do\n\nthis"}, {"role": "assistant", "content": "done"}]
    assert to_messages({"instruction": "do", "output": "done"}, "x")[0] == {"role": "user", "content": "do"}


@pytest.mark.parametrize("record,message", [
    ({"text": "hi"}, "f.jsonl:3: a chat record needs 'messages' (role/content), 'conversations' (ShareGPT) or "
                     "'instruction' and 'output' (Alpaca)"),
    ({"messages": "hi"}, "f.jsonl:3: 'messages' must be a list of {role, content} objects"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "f.jsonl:3: role 'bot' is not one of ['system', 'user', "
                                                      "'assistant', 'tool']"),
    ({"messages": [{"role": "user", "content": "x"}]}, "f.jsonl:3: the conversation has no assistant turn to train on"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "f.jsonl:3: a user message has no text "
                                                                              "content"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "f.jsonl:3: ShareGPT role 'robot' is not one of"),
])
def test_bad_records_are_named(record, message):
    with pytest.raises(UserError) as e:
        to_messages(record, "f.jsonl:3")
    assert str(e.value).startswith(message)


def test_template_errors_are_named(tmp_path, tokenizer_file):
    d = _model_dir(tmp_path, tokenizer_file, "mistral")
    template = ChatTemplate.from_config(d / "tokenizer_config.json")
    with pytest.raises(UserError) as e:  # the template's own raise_exception
        encode(Tokenizer.from_file(str(d / "tokenizer.json")), template,
               [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "f.jsonl:7")
    assert str(e.value) == ("f.jsonl:7: the chat template refused the conversation: Conversation roles must "
                            "alternate user/assistant/user/assistant/...")
    # a template that rewrites earlier turns (drops them once a later one exists) cannot be located
    rewriting = ChatTemplate("{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}{{ m['content'] }}"
                             "{% endif %}{% endfor %}", {}, name="t.json")
    with pytest.raises(UserError, match="t.json renders the conversation up to assistant turn 1 differently"):
        rewriting.assistant_spans(CHAT, "f.jsonl:1")
    (tmp_path / "none.json").write_text("{}")
    with pytest.raises(UserError, match="none.json has no chat_template"):
        ChatTemplate.from_config(tmp_path / "none.json")
    with pytest.raises(UserError, match="data.chat_template: .*missing.json does not exist"):
        ChatTemplate.from_config(tmp_path / "missing.json")
    with pytest.raises(UserError, match=r"bad.json: not a valid Jinja2 template \(line 1"):
        ChatTemplate("{% for %}", {}, name="bad.json")
