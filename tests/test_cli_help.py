"""`--help` states every default, and the README's command synopses show the real ones."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from mlx_bridge.cli import COMMANDS, build_parser
from mlx_bridge.clihelp import FLAGS
from mlx_bridge.train.cli import config_defaults

README = Path(__file__).resolve().parents[1] / "README.md"


def subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def effective_defaults(command: str) -> dict:
    """dest -> the default the command uses (train: TrainConfig's, behind its None parser defaults)."""
    p = subparser(command)
    d = {a.dest: a.default for a in p._actions}
    if command == "train":
        d.update({k: v for k, v in config_defaults().items() if k in d})
    return d


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_states_every_default(command, capsys):
    p = subparser(command)
    defaults = effective_defaults(command)
    for a in p._actions:
        if not a.option_strings or isinstance(a, FLAGS) or defaults[a.dest] is None:
            continue
        assert "default" in (a.help or "").lower(), f"{command} {a.option_strings[0]}: help does not state the default"
    with pytest.raises(SystemExit):
        build_parser(command).parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text


def test_train_help_shows_the_train_config_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for flag, value in (("--lora-rank LORA_RANK", "8"), ("--batch-size BATCH_SIZE", "4"), ("--lr LR", "1e-05"),
                        ("--eval-every EVAL_EVERY", "200"), ("--max-seq-len MAX_SEQ_LEN", "2048")):
        start = text.index(flag)
        assert f"(default: {value})" in text[start:text.index(" --", start + len(flag))], flag


def _synopses(text: str) -> list[tuple[str, str]]:
    """(command, synopsis text) of each `mlx-bridge CMD ...` line in a code block, continuation lines joined."""
    out, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"mlx-bridge (\w+) (.*)", line)
        if m and m.group(1) in COMMANDS and "[" in line:
            body = m.group(2)
            for nxt in lines[i + 1:]:
                if not nxt.startswith(" ") or not nxt.strip().startswith("["):
                    break
                body += " " + nxt.strip()
            out.append((m.group(1), body))
    return out


def _same(shown: str, default) -> bool:
    if isinstance(default, bool) or isinstance(default, str):
        return shown == str(default)
    try:
        return float(shown) == float(default)
    except (TypeError, ValueError):
        return False


def test_readme_synopses_show_real_defaults():
    """`[--flag VALUE]` in a synopsis: VALUE is the default, or a placeholder (N, DIR, a|b choices), or an
    example of an option without one."""
    checked = 0
    for command, body in _synopses(README.read_text()):
        defaults = effective_defaults(command)
        options = {s: a for a in subparser(command)._actions for s in a.option_strings}
        for flag, value in re.findall(r"(--[\w-]+) ([^\s\[\]|]+)(?=[\]\s])", body):
            if flag not in options or value.isupper() or value.startswith("-") or "|" in value:
                continue
            d = defaults[options[flag].dest]
            if d is None:
                continue
            assert _same(value, d), f"README: mlx-bridge {command} ... {flag} {value}, but the default is {d!r}"
            checked += 1
    assert checked >= 15
