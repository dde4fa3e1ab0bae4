"""``vgf-llm``: a table of commands, one module each. Every command module has ``run(argv)`` and parses its own
options; commands with knobs parse dataclasses with TRL's ``TrlParser``, so ``--config x.yaml`` works for each.

Only parsing, file I/O and printing live under ``vgf_llm/cli``; every computation is a library call. One error
policy for all commands: a bad input ends with one ``vgf-llm COMMAND: error: ...`` line on stderr and exit status
2 (``VGF_LLM_DEBUG=1`` re-raises it with its traceback).
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("vgf_llm.cli.train", "fine-tune a LoRA policy with VGF from a YAML recipe"),
    "generate": ("vgf_llm.cli.generate", "sample with VGF transport and write one JSON line per prompt"),
    "serve": ("vgf_llm.cli.serve", "serve test-time VGF behind an OpenAI-compatible HTTP API"),
    "fit-value": ("vgf_llm.cli.fit_value", "fit a value model to the true rewards of reference samples"),
    "models": ("vgf_llm.cli.models", "prepare or list offline models"),
    "env": ("vgf_llm.cli.env", "print versions and hardware, for bug reports"),
    "demo": ("vgf_llm.cli.demo", "run the toy bandit example (VGF vs best-of-N in 2-D)"),
}


class CLIError(Exception):
    """A bad command-line input; reported as one line on stderr with exit status 2."""


def usage() -> str:
    lines = ["usage: vgf-llm COMMAND [options]   (vgf-llm COMMAND --help lists a command's options)", "",
             "Value Gradient Flow for language models.", "", "commands:"]
    lines += [f"  {name:12s} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Errors from bad inputs exit with status 2; set VGF_LLM_DEBUG=1 to see their traceback."]
    return "\n".join(lines)


def yaml_message(err) -> str:
    """A YAML syntax error of a ``--config`` file as ``file:line:column: what``, without PyYAML's quoted excerpt."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return f"the --config file is not valid YAML: {err}"
    return (f"{mark.name}:{mark.line + 1}:{mark.column + 1}: not valid YAML ({err.problem}); fix the --config "
            "file there")


def main(argv: list[str] | None = None) -> int:
    """Run ``vgf-llm argv`` (default: sys.argv[1:]); bad inputs raise SystemExit(2)."""
    import yaml

    from vgf_llm.models import ModelNotAvailableError

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{usage()}\n\nvgf-llm: error: unknown command {name!r}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.run(rest) or 0
    except (CLIError, ModelNotAvailableError, FileNotFoundError, ValueError, TypeError, yaml.YAMLError) as err:
        if os.environ.get("VGF_LLM_DEBUG", "") not in ("", "0"):
            raise
        message = yaml_message(err) if isinstance(err, yaml.YAMLError) else err
        print(f"vgf-llm {name}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from err
