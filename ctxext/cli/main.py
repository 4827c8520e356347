"""``ctxext`` command line: the parser is generated from the command table (``ctxext.cli.commands.COMMANDS``), each
command's flags from its options model; every command is one library call.

    ctxext patch SRC OUT --method yarn --factor 8
    ctxext info OUT
    ctxext methods
    ctxext eval ppl reference out/yarn8 --lengths 256,512,1024,2048
    ctxext eval passkey out/yarn8 --lengths 512,1024,2048 --trials 10
    ctxext analyze freq reference --compare out/prope
    ctxext search reference out/longrope8 --target-length 2048 --budget 160
    ctxext finetune configs/tiny.yaml stages.0.steps=20
    ctxext plan configs/llama3-8b-128k-cp.yaml --shape llama3-8b --gpu-memory 80
    ctxext demo
"""

from __future__ import annotations

import argparse
import logging
import sys

from ctxext.cli.commands import COMMANDS, GROUPS, Command
from ctxext.options import add_arguments, from_namespace


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    """One flag per parameter name in the method registry (``ctxext.rope.registry.all_parameters``)."""
    from ctxext.rope.registry import all_parameters

    g = p.add_argument_group("method parameters (see `ctxext methods`)")
    for name, entry in all_parameters().items():
        helps: dict[str, list[str]] = {}
        for method, text in entry["methods"].items():
            helps.setdefault(text, []).append(method)
        text = "; ".join(f"{', '.join(methods)}: {h}" for h, methods in helps.items())
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, type=entry["type"], help=text.replace("%", "%%"))


def _method_params(args: argparse.Namespace) -> dict:
    from ctxext.rope.registry import all_parameters

    return {n: getattr(args, n) for n in all_parameters() if getattr(args, n, None) is not None}


def _add_command(sub, command: Command) -> None:
    p = sub.add_parser(
        command.name.split()[-1],
        help=command.help,
        description=command.description or command.help,
        epilog=command.epilog() if command.epilog else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = command.options()
    add_arguments(p, model, skip=("params", "progress"))
    if "params" in model.model_fields:  # a patch: the method registry's flags
        _add_method_flags(p)
    p.set_defaults(command=command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxext", description="Extend the context window of Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress from the library")
    sub = parser.add_subparsers(dest="command_name", required=True)
    groups = {}
    for command in COMMANDS:
        if " " in command.name:
            group = command.name.split()[0]
            if group not in groups:
                groups[group] = sub.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest=f"{group}_command", required=True
                )
            _add_command(groups[group], command)
        else:
            _add_command(sub, command)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that a subcommand's ``key=value`` overrides may also come after its options
    (``ctxext finetune CONFIG --output-dir X lr=1``): argparse stops filling a ``nargs="*"`` positional at the first
    option, and ``parse_intermixed_args`` cannot be used with subcommands."""
    args, extra = parser.parse_known_args(argv)
    if (
        extra
        and all("=" in a and not a.startswith("-") for a in extra)
        and "overrides" in getattr(args.command.options(), "model_fields", {})
    ):
        args.overrides = [*getattr(args, "overrides", []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    command: Command = args.command
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if command.name == "demo":  # the demo's progress lines are its output
        logging.getLogger("ctxext").setLevel(logging.INFO)
    from ctxext.errors import CtxextError
    from ctxext.io.atomic import disk_full

    name = f"ctxext {command.name}"
    try:
        model = command.options()
        more = {"params": _method_params(args)} if "params" in model.model_fields else {}
        return command.run(from_namespace(model, args, **more))
    except CtxextError as err:  # a user mistake: the message says what to do; anything else keeps its traceback
        print(f"{name}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # a full disk outside ctxext's atomic writers is no bug either
        full = disk_full(err, err.filename or ".")
        if full is None:
            raise
        print(f"{name}: error: {full}", file=sys.stderr)
        return full.exit_code
    except KeyboardInterrupt:
        print(f"{name}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
