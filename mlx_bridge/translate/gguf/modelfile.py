"""An Ollama `Modelfile` beside the GGUF: FROM, TEMPLATE (known chat families), stop tokens, sampling.

The chat family is recognised from the Jinja chat template's markers; Ollama templates are Go
templates, written here for llama 3, ChatML (Qwen), Gemma and Mistral. For any other template the
Modelfile says that it relies on the template embedded in the GGUF (`tokenizer.chat_template`).

Example:
    >>> chat_family("{{ '<|im_start|>' + m['role'] }}")
    'chatml'
"""

from __future__ import annotations

import json
from pathlib import Path

# marker in the Jinja template -> family
FAMILIES = (("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"), ("<start_of_turn>", "gemma"),
            ("[INST]", "mistral"))
TEMPLATES = {
    "llama3": ('{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
               '{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}'
               '<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>', ["<|eot_id|>"]),
    "chatml": ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
               '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n{{ .Response }}<|im_end|>\n', ["<|im_end|>"]),
    "gemma": ('<start_of_turn>user\n{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}<end_of_turn>\n'
              '<start_of_turn>model\n{{ .Response }}<end_of_turn>\n', ["<end_of_turn>"]),
    "mistral": ('[INST] {{ if .System }}{{ .System }} {{ end }}{{ .Prompt }} [/INST]{{ .Response }}', ["[INST]", "[/INST]"]),
}
# generation_config.json key -> Ollama PARAMETER
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repeat_penalty"}


def chat_family(template: str | None) -> str | None:
    if not template:
        return None
    for marker, fam in FAMILIES:
        if marker in template:
            return fam
    return None


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def modelfile(gguf_name: str, chat_template: str | None, eos_tokens: list[str], gen: dict) -> tuple[str, str]:
    """(Modelfile text, one-line note on the template it uses)."""
    fam = chat_family(chat_template)
    lines = ["# written by mlx-bridge: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    stops = list(dict.fromkeys(eos_tokens))
    if fam is not None:
        tpl, fam_stops = TEMPLATES[fam]
        stops = list(dict.fromkeys(stops + fam_stops))
        lines.append(f'TEMPLATE """{tpl}"""')
        note = f"Modelfile: Ollama TEMPLATE for the {fam} chat format"
    else:
        lines.append("# no TEMPLATE: " + ("the chat template is not one Ollama's Modelfile here knows; Ollama uses "
                                          "the template embedded in the GGUF (tokenizer.chat_template)"
                                          if chat_template else "the model has no chat template"))
        note = ("Modelfile: no TEMPLATE (unrecognised chat format); relies on the template embedded in the GGUF"
                if chat_template else "Modelfile: the model has no chat template")
    for s in stops:
        lines.append(f"PARAMETER stop {_quote(s)}")
    for k, p in SAMPLING.items():
        if gen.get(k) is not None and (gen.get("do_sample", True) or k != "temperature"):
            lines.append(f"PARAMETER {p} {gen[k]}")
    if gen.get("do_sample") is False:
        lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n", note


def write_modelfile(out: Path, gguf_name: str, tok_dir: Path, tokens: list, eos_ids: list[int]) -> str:
    """Write out/Modelfile; return the note on its template."""
    gen_file = tok_dir / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    template = None
    tpl_file, cfg_file = tok_dir / "chat_template.jinja", tok_dir / "tokenizer_config.json"
    if tpl_file.is_file():
        template = tpl_file.read_text()
    elif cfg_file.is_file():
        t = json.loads(cfg_file.read_text()).get("chat_template")
        template = t if isinstance(t, str) else None
    eos = [t.decode() if isinstance(t, bytes) else t for i in eos_ids if 0 <= i < len(tokens) for t in [tokens[i]]]
    text, note = modelfile(gguf_name, template, eos, gen)
    (out / "Modelfile").write_text(text)
    return note
