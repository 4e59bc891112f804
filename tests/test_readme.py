"""The README's "Using it" commands, run as written on a tiny model at small settings, so that they cannot
rot: each must exit 0."""

import re
import shlex
from pathlib import Path

from click.testing import CliRunner

from anybit.cli import main
from conftest import tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def readme_commands() -> list[list[str]]:
    """The `anybit ...` commands of the README's "Using it" block, as argument lists (comments dropped, a
    line with `;` split in two; a `>> FILE` redirection kept as its last two items)."""
    text = README.read_text()
    block = re.search(r"## Using it\s+```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no 'Using it' bash block"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        for part in filter(None, (p.strip() for p in line.split(";"))):
            words = shlex.split(part)
            assert words[0] == "anybit", part
            commands.append(words[1:])
    return commands


def small(command: list[str], corpus: Path) -> list[str]:
    """The command at small settings: a few short windows of the tiny corpus, a few tokens."""
    calib = ["--calib", str(corpus), "--nsamples", "2", "--seqlen", "32"]
    windows = ["--dataset", str(corpus), "--seqlen", "32", "--max-windows", "1"]
    extra = {
        "quantize": calib,
        "compare": [*calib[:4], *windows],
        "eval": windows,
        "residual": calib,
        "tune": [*calib, "--steps", "2", "--nsamples", "4"],
        "generate": ["--max-new-tokens", "4"],
        "bench": ["--prompt-tokens", "4", "--new-tokens", "2", "--repeats", "1"],
    }.get(command[0], [])
    return [*command, *extra]


def test_the_readme_commands_run(tiny_tokenizer, corpus_file, tmp_path, monkeypatch) -> None:
    """On a tiny Llama whose dimensions are multiples of 64 (the README quantizes with `--group 64`)."""
    import torch
    import transformers as tf

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ANYBIT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = tiny_config("llama", len(tiny_tokenizer))
    config.hidden_size, config.intermediate_size = 128, 256
    source = tmp_path / "model"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    (source / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # `generate --chat` needs one
    places = {"MODEL": str(source), "DIR": str(tmp_path / "q")}
    commands = readme_commands()
    assert commands[0][0] == "quantize" and len(commands) >= 10  # the first one writes DIR
    runner = CliRunner()
    for index, command in enumerate(commands):
        places["OUT"] = str(tmp_path / f"out-{index}")  # each command that writes OUT gets its own
        words = [places.get(word, word) for word in command]
        redirect = None
        if ">>" in words:
            at = words.index(">>")
            words, redirect = words[:at], tmp_path / words[at + 1]
        result = runner.invoke(main, small(words, corpus_file))
        assert result.exit_code == 0, f"anybit {' '.join(command)}\n{result.output}"
        if redirect is not None:
            with redirect.open("a") as f:
                f.write(result.stdout)
    assert (tmp_path / "quality_vs_bits.png").is_file() and (tmp_path / "bits.png").is_file()
