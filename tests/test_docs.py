"""The README and docs/ stay true: every command and config key they show exists, every relative
link resolves, the front page stays short and the tables readable, and every command's --help
gives each option one line and its default."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

from stica.config import load_config

PAGES = [Path("README.md"), *sorted(Path("docs").glob("*.md"))]
FILE_SUFFIXES = {"py", "md", "yaml", "json", "jsonl", "csv", "png", "pt", "txt", "tar", "idx", "log", "xml"}


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command a user types, by the words that start it."""
    from stica.eval import build_parser as eval_parser
    from stica.heartbeat import build_parser as heartbeat_parser
    from stica.tools.bench import build_parser as bench_parser
    from stica.tools.demo import build_parser as demo_parser
    from stica.tools.export import build_parser as export_parser
    from stica.tools.footage import build_parser as footage_parser
    from stica.tools.shard import build_parser as shard_parser
    from stica.train import build_parser as train_parser

    return {"stica-shard": shard_parser(), "stica-bench": bench_parser(), "stica-export": export_parser(),
            "stica-demo": demo_parser(), "stica.train": train_parser(), "stica.eval": eval_parser(),
            "stica.heartbeat": heartbeat_parser(),
            "stica.tools.footage": footage_parser()}


def shell_blocks(text: str) -> list[str]:
    """The commands of a page's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def invocations():
    """(page, command name, the words after it) of every stica command the pages show."""
    out = []
    for page in PAGES:
        for line in shell_blocks(page.read_text()):
            for part in re.split(r"\s*(?:&&|\|\||;)\s*", line):
                words = shlex.split(part.replace("$(date +%F)", "DATE"))
                for i, word in enumerate(words):
                    name = word if word in ("stica-shard", "stica-bench", "stica-export", "stica-demo") else \
                        words[i + 1] if word == "-m" and i + 1 < len(words) and words[i + 1].startswith("stica.") \
                        else None
                    if name:
                        out.append((page, name, words[i + (1 if word != "-m" else 2):]))
                        break
    return out


def options_of(parser: argparse.ArgumentParser, words: list[str]) -> tuple[set[str], argparse.ArgumentParser]:
    """The option strings a command line's (sub)parser knows, and that parser."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is not None and words and words[0] in sub.choices:
        parser = sub.choices[words[0]]
    return {s for a in parser._actions for s in a.option_strings}, parser


def test_every_command_the_docs_show_has_the_options_and_config_keys_they_use():
    shown = invocations()
    assert {name for _, name, _ in shown} >= {"stica-shard", "stica-bench", "stica-export", "stica-demo",
                                               "stica.train", "stica.eval"}
    for page, name, words in shown:
        known, _ = options_of(parsers()[name], words)
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"{page}: {name} has no option {word}"
        if name in ("stica.train", "stica.eval", "stica-demo"):
            config = words[words.index("--config") + 1] if "--config" in words else "configs/demo.yaml"
            overrides = [w for w in words if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+=.*", w)]
            load_config(config, overrides)  # a key the config lacks raises, naming it


def test_every_config_key_the_docs_name_exists():
    """Dotted keys in backticks (`train.sync_bn`, `data.crop_scale=[0.85,1.0]`) are real keys."""
    cfg = load_config("configs/pretrain_kinetics.yaml")
    roots = set(cfg.keys())
    for page in PAGES:
        for key in re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)(?:[=:][^`]*)?`", page.read_text()):
            if key.split(".")[0] not in roots or key.rsplit(".", 1)[-1] in FILE_SUFFIXES:
                continue  # a module path or a file, not a config key
            node = cfg
            for part in key.split("."):
                assert part in node, f"{page}: `{key}` is not a config key"
                node = node[part]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_relative_link_resolves():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page.resolve()
            assert file.exists(), f"{page}: link to {target}: no such file"
            if anchor and file.suffix == ".md":
                anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}
                assert anchor in anchors, f"{page}: link to {target}: no such heading"


def test_the_front_page_is_short_and_every_page_and_table_cell_readable():
    assert len(Path("README.md").read_text().splitlines()) <= 250
    for page in PAGES:
        lines = page.read_text().splitlines()
        assert page.name == "README.md" or len(lines) <= 300, f"{page}: {len(lines)} lines"
        for line in lines:
            if line.startswith("|"):
                cells = [c.strip() for c in line.strip("|").split(" | ")]
                assert max(map(len, cells)) <= 200, f"{page}: a table cell of {max(map(len, cells))} characters"


def all_parsers():
    for name, parser in parsers().items():
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from ((f"{name} {sub}", p) for sub, p in action.choices.items())


@pytest.mark.parametrize("name, parser", list(all_parsers()), ids=[n for n, _ in all_parsers()])
def test_help_gives_every_option_a_line_and_its_default(name, parser):
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help line"
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            line = parser._get_formatter()._get_help_string(action) % {"default": action.default}
            # argparse wraps the text, breaking long words too: compare without any whitespace
            assert "(default: " in line and "".join(line.split()) in "".join(text.split()), (name, action.dest)


def test_the_demo_tables_are_the_committed_runs():
    """README.md's and docs/demo.md's demo tables are rendered from docs/figures/demo*.json, the
    files `stica-demo --record` writes: a table edited by hand, or a json rerun without
    re-rendering, fails here."""
    from stica.tools.demo import PAGES, render, rendered_blocks

    blocks = rendered_blocks()
    assert "<!-- demo:scores -->" in PAGES[0].read_text()
    assert all(f"<!-- demo:{name} -->" in PAGES[1].read_text() for name in ("scores", "seeds"))
    for page in PAGES:
        text = page.read_text()
        assert render(text, blocks) == text, f"{page}: its demo tables differ from docs/figures/demo*.json"
