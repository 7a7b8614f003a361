"""The CLI reference of the documentation site, generated from ``dlrt.cli.build_parser()``.

Every subcommand gets its usage line and a table of its arguments, read from the argparse
parser; a command that takes ``key=value`` overrides gets a table of its configuration keys,
read from the config dataclass (field name, type, default and the ``help`` metadata). The
site's build hook replaces the marker ``<!-- cli-reference -->`` with ``render()``.

    python scripts/docs/cli_reference.py           # print the reference as Markdown
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2] / "src"

#: The config dataclass behind each command that reads a YAML file and ``key=value`` overrides.
CONFIGS = {
    "dlrt train": "dlrt.training.config.TrainConfig",
    "dlrt finetune": "dlrt.training.config.FinetuneConfig",
    "dlrt federated": "dlrt.training.config.FederatedConfig",
    "dlrt closure train": "dlrt.kinetic.config.ClosureConfig",
}


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _config_class(path: str) -> type:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "none"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def config_table(path: str) -> str:
    """The keys of one config dataclass: name, type, default, help."""
    cls = _config_class(path)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        help_text = f.metadata.get("help")
        if not help_text:
            raise ValueError(f"{path}.{f.name} has no help metadata: the CLI reference needs one")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kind = " or ".join(part.strip() for part in kind.split("|"))  # a `|` cannot stand in a table's code span
        rows.append(f"| `{f.name}` | {_cell(kind)} | {_cell(_default(f))} | {_cell(help_text)} |")
    return "\n".join(rows)


def _argument(action: argparse.Action) -> tuple[str, str, str]:
    if action.option_strings:
        name = ", ".join(action.option_strings)
        if action.nargs != 0:
            name += " " + (action.metavar or action.dest.upper())
    else:
        name = action.metavar if isinstance(action.metavar, str) else action.dest
    if action.nargs in ("*", "+"):
        name += " …"
    default = "" if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 else f"`{action.default}`"
    if isinstance(action.default, list):
        default = "`" + " ".join(map(str, action.default)) + "`"
    description = action.help or ""
    if action.choices:
        description = (description + "; " if description else "") + "one of " + ", ".join(map(str, action.choices))
    return f"`{name}`", default, description


def _commands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(prog, help, parser) of every leaf subcommand, depth first, in the parser's order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                nested = _commands(sub)
                out.extend(nested or [(sub.prog, helps.get(name, ""), sub)])
    return out


def render() -> str:
    if str(SRC) not in sys.path:  # the reference describes this tree's dlrt, whatever else is installed
        sys.path.insert(0, str(SRC))
    from dlrt.cli import build_parser

    parser = build_parser()
    parts = []
    for prog, help_text, sub in _commands(parser):
        lines = [f"## `{prog}`", "", help_text[:1].upper() + help_text[1:] + ".", ""]
        lines += ["```text", sub.format_usage().strip(), "```", ""]
        args = [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        if args:
            lines += ["| argument | default | description |", "|---|---|---|"]
            lines += ["| " + " | ".join(_cell(x) for x in _argument(a)) + " |" for a in args]
            lines.append("")
        if prog in CONFIGS:
            cls = CONFIGS[prog].rsplit(".", 1)[1]
            lines += [
                f"### Configuration keys of `{prog}`",
                "",
                f"Set in a YAML file (`--config`) or as `key=value`; `{CONFIGS[prog]}` defines and validates them "
                "(an unknown key is an error that lists the valid ones). "
                f"The resolved `{cls}` is saved as `config.yaml` in the run directory.",
                "",
                config_table(CONFIGS[prog]),
                "",
            ]
        parts.append("\n".join(lines))
    return "\n".join(parts)


if __name__ == "__main__":
    print(render())
    sys.exit(0)
