"""`leanlm prompt`: compress a long prompt to a token budget, or lint one."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    from leanlm.cli.options import command, model_options

    p = command(sub, "prompt", "compress or lint a prompt",
                "Work on prompts. `compress` drops the words the model finds least informative (and the question "
                "does not ask about) until the prompt fits a token budget, never a number, name, quoted string, "
                "code or URL; `lint` finds repeated, contradictory and buried instructions and counts tokens.", run)
    actions = p.add_subparsers(dest="prompt_command", metavar="ACTION", required=True)
    q = actions.add_parser("compress", help="compress FILE (or - for stdin) to --budget tokens",
                           description="Print the compressed prompt on stdout; its token counts on stderr.")
    q.set_defaults(action=run_compress)
    q.add_argument("file", help="a text file, or - for stdin")
    q.add_argument("--budget", type=float, required=True,
                   help="a share of the prompt's tokens (0.5) or a token count (300)")
    q.add_argument("--question", help="what the prompt will be asked: words it names are kept first")
    q.add_argument("--model", default="smollm2-135m", help="the scoring model (default: smollm2-135m)")
    q.add_argument("--json", action="store_true", help="print the result and its counts as JSON")
    model_options(q)
    q = actions.add_parser("lint", help="repeated, contradictory and buried instructions; tokens and cost",
                           description="Each finding names its line. Exit code 1 when anything but the token count "
                                       "was found.")
    q.set_defaults(action=run_lint)
    q.add_argument("file", help="a text file, or - for stdin")
    q.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts tokens (default: smollm2-135m)")
    q.add_argument("--price-per-million", type=float, help="$ per million input tokens, to price the prompt")
    q.add_argument("--json", action="store_true")


def run(args) -> int:
    return args.action(args)


def _read(path: str) -> str:
    from leanlm.errors import DataError

    if path == "-":
        return sys.stdin.read()
    try:
        return open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise DataError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 text ({err.reason} at byte {err.start})") from None


def run_compress(args) -> int:
    from leanlm.models.load import load_model
    from leanlm.prompt import compress

    text = _read(args.file)
    result = compress(text, args.budget, args.question, load_model(args.model, args.device, args.dtype))
    if args.json:
        print(json.dumps({"text": result.text, "tokens_before": result.tokens_before, "tokens_after": result.tokens_after,
                          "target": result.target, "seconds": result.seconds, "warnings": result.warnings}, indent=2))
        return 0
    print(result.text)
    print(f"{result.tokens_before} -> {result.tokens_after} tokens (asked {result.target}), {result.seconds:.2f} s",
          file=sys.stderr)
    return 0


def run_lint(args) -> int:
    from leanlm.prompt import lint
    from leanlm.prompt.lint import as_dicts

    findings = lint(_read(args.file), _tokenizer(args.model), args.price_per_million)
    if args.json:
        print(json.dumps(as_dicts(findings), indent=2))
    else:
        for f in findings:
            print(f"{args.file}:{f.line}: {f.kind}: {f.message}")
    return 1 if any(f.kind != "tokens" for f in findings) else 0


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    from leanlm.models.load import resolve_source

    path = resolve_source(model)
    if path.is_file():  # a .gguf: transformers reads its tokenizer from the file
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return AutoTokenizer.from_pretrained(path)
