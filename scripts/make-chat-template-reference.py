#!/usr/bin/env python3
"""Renders chat templates with transformers' own jinja2 renderer (the code behind
`apply_chat_template`) into tests/fixtures/chat_templates.json, which the Rust tests compare
with minijinja's rendering. Templates: SmolLM2's (from the GGUF, via the converted directory)
and templates written here in the shapes of the major families (ChatML with a default system
prompt, Llama 3 headers, Gemma turns, Mistral [INST], Phi). Each with a system prompt,
multi-turn, and with and without add_generation_prompt.

    target/mlx-venv/bin/python scripts/make-chat-template-reference.py models
"""

import json
import sys
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

TEMPLATES = {
    "llama3": "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system_message = 'Cutting Knowledge Date: December 2023' %}{%- endif %}\n{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n",
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    "mistral": "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content'] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n    {%- endif %}\n    {%- if message['role'] == 'user' %}\n        {%- if loop.first and system_message is defined %}\n            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n        {%- else %}\n            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n        {%- endif %}\n    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token}}\n    {%- endif %}\n{%- endfor %}\n",
    "phi3": "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    "chatml_qwen": "{%- for message in messages %}\n    {%- if loop.first and message.role != 'system' %}\n        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n    {{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>' + '\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n",
}
TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse. "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "Name a colour."},
    ],
]


def main() -> None:
    models = Path(sys.argv[1])
    smol = json.loads((models / "mlx/SmolLM2-135M-Instruct-hf/tokenizer_config.json").read_text())
    templates = {"smollm2": (smol["chat_template"], {"bos_token": smol["bos_token"], "eos_token": smol["eos_token"]})}
    templates.update({k: (v, TOKENS) for k, v in TEMPLATES.items()})
    cases = []
    for name, (template, tokens) in templates.items():
        for conv in CONVERSATIONS:
            for agp in (True, False):
                rendered, _ = render_jinja_template(
                    conversations=[conv], chat_template=template, add_generation_prompt=agp, **tokens
                )
                cases.append(
                    {
                        "template_name": name,
                        "template": template,
                        "tokens": tokens,
                        "messages": conv,
                        "add_generation_prompt": agp,
                        "expected": rendered[0],
                    }
                )
    out = Path(__file__).resolve().parent.parent / "tests/fixtures/chat_templates.json"
    out.write_text(json.dumps({"note": "transformers render_jinja_template (jinja2)", "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
