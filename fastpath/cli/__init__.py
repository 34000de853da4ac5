"""`fastpath` command line: `fastpath ppl` (sliding-window perplexity), `fastpath serve`
(vLLM's OpenAI-compatible server with the scoring route), `fastpath kld` (KL divergence
against a base model, `fastpath.metrics.kld`), `fastpath report`, `fastpath check-vllm` (judge a
vLLM release against the patches without installing it), `fastpath upstream` (the same
change as a vLLM patch series), `fastpath lm-eval`
(lm-evaluation-harness's own command line with the `fastpath-vllm` model).

`fastpath ppl` and `fastpath kld` take every vLLM engine flag through vLLM's own
`EngineArgs` parser, plus the original script's flags. With no model and no data `ppl` runs
offline on the embedded default: a zoo model trained on the bundled text. With `--server
URL` (repeatable) the windows are scored by running `fastpath serve` servers instead.
All are quiet by default (vLLM warnings and errors only); `-v` shows vLLM's INFO lines.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from fastpath.cli.common import (
    EXIT_USAGE,
    UsageError,
    add_verbose_flag,
    given_flags,
    quiet_vllm,
    verbose_requested,
)

PPL_DESCRIPTION = """\
Sliding-window perplexity of a model over a text, scored on vLLM's fast path (one float32
log-prob per target token). With no --model and no text: the embedded default on the
bundled text.

examples:
  fastpath ppl                                   # the embedded default, bundled text
  fastpath ppl --model M --dataset wikitext --dataset-config wikitext-2-raw-v1 \\
      --context-length 2048 --stride 512 --json run.json
  fastpath ppl --model M --method both           # and the standard path: exit 3 if a bit differs
  fastpath ppl --model M --convention llama.cpp  # llama.cpp's windows and counting
  fastpath ppl --server http://a:8000 --server http://b:8000 --text-file corpus.jsonl"""
KLD_DESCRIPTION = """\
KL divergence and top-token agreement of a model against a base model, llama.cpp's
statistics, from the base model's top-K log-probs (a base file ~1000x smaller than
llama.cpp's).

examples:
  fastpath kld --base-model BASE --model QUANT --top-k 32 --base-cache base.kld.npz \\
      --dataset wikitext --dataset-config wikitext-2-raw-v1 --json quant.json
  fastpath kld --base-cache base.kld.npz --model QUANT2     # the base file again, no base pass
  fastpath kld --base-model BASE --model W8A8 --model W4A8 --json all.json
                                   # several variants, one base pass, a noise-floor row"""


ENGINE_FLAGS_NOTE = (
    "Every `vllm serve` engine flag is accepted too (vLLM's EngineArgs: --dtype, "
    "--max-model-len, --tensor-parallel-size, --quantization, --kv-cache-memory-bytes, ...); "
    "fastpath puts its engine defaults only where no flag was given (docs/cli.md).")
SHORT_HELP_OPTIONS = ("help", "model", "verbose")  # the plain --help's "options"
HELP_SEARCH = (
    "More help:  fastpath {command} --help=all              every flag, vLLM's included\n"
    "            fastpath {command} --help=ModelConfig      one group of engine flags "
    "(case-insensitive)\n"
    "            fastpath {command} --help=max-model-len    flags whose name matches")


class RawEpilogFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's examples and the epilog's lines as written."""


def _command_parser_class():
    """A parser whose plain `--help` shows fastpath's own flags in full and vLLM's engine
    flags as one line of groups; `--help=all|GROUP|flag` is vLLM's own search."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class CommandParser(FlexibleArgumentParser):
        """`fastpath ppl` / `kld`: vLLM's parser with a short help for fastpath's flags."""

        own_groups: tuple[str, ...] = ()  # titles of the groups shown in full

        def format_help(self) -> str:
            if self._search_keyword is not None or not self.own_groups:
                return super().format_help()
            formatter = self._get_formatter()
            formatter.add_usage(self.usage, [], [])
            formatter.add_text(self.description)
            formatter.start_section("options")
            formatter.add_arguments([a for a in self._actions if a.dest in SHORT_HELP_OPTIONS])
            formatter.end_section()
            for group in self._action_groups:
                if group.title in self.own_groups:
                    formatter.start_section(group.title)
                    formatter.add_arguments(group._group_actions)
                    formatter.end_section()
            shown = (*self.own_groups, "options", "positional arguments")
            engine_groups = [g.title for g in self._action_groups
                             if g._group_actions and g.title not in shown]
            formatter.start_section("vLLM engine flags")
            formatter.add_text("\n".join(textwrap.wrap(
                f"{ENGINE_FLAGS_NOTE} Groups: {', '.join(engine_groups)}.", width=88,
                break_on_hyphens=False)))
            formatter.end_section()
            formatter.add_text(self.epilog)
            return formatter.format_help()

    return CommandParser


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser,
                            argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `fastpath` parser and its `ppl`, `kld` and `serve` subparsers (`given_flags`
    reads the flags given to each)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from fastpath.cli.kld import add_kld_flags
    from fastpath.cli.ppl import add_ppl_flags
    from fastpath.cli.report import add_report_flags
    from fastpath.cli.serve import add_serve_flags
    from fastpath.tools.check_vllm import add_flags as add_check_vllm_flags

    parser = FlexibleArgumentParser(prog="fastpath", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True,
                                     parser_class=_command_parser_class())
    ppl = commands.add_parser(
        "ppl", help="sliding-window perplexity through vLLM", description=PPL_DESCRIPTION,
        usage="fastpath ppl [--model MODEL] [fastpath flags] [vllm serve engine flags]",
        epilog=HELP_SEARCH.format(command="ppl"), formatter_class=RawEpilogFormatter)
    EngineArgs.add_cli_args(ppl)
    ppl.set_defaults(model=None)  # None = the embedded default model
    add_ppl_flags(ppl)
    add_verbose_flag(ppl)
    kld = commands.add_parser(
        "kld", help="KL divergence of a model against a base model",
        description=KLD_DESCRIPTION, epilog=HELP_SEARCH.format(command="kld"),
        usage="fastpath kld --model MODEL [--model MODEL ...] (--base-model BASE | --base-cache "
        "FILE) "
        "[fastpath flags] [vllm serve engine flags]", formatter_class=RawEpilogFormatter)
    EngineArgs.add_cli_args(kld)
    kld.set_defaults(model=None)
    add_kld_flags(kld)
    add_verbose_flag(kld)
    for command, model_help in ((ppl, "the model to score, a path or a name (default: the "
                                  "embedded default on the bundled text)"),
                                 (kld, "the model to judge against the base (e.g. a quantized "
                                  "copy), a path or a name; repeat to compare several")):
        next(a for a in command._actions if a.dest == "model").help = model_help
        command.own_groups = tuple(g.title for g in command._action_groups
                                   if g.title and "fastpath" in g.title)
    serve = commands.add_parser(
        "serve", help="vLLM's OpenAI-compatible server with fastpath and the scoring route",
        usage="fastpath serve [MODEL] [vllm serve flags]")
    add_serve_flags(serve)
    add_verbose_flag(serve)
    add_report_flags(commands.add_parser("report", help="benchmark or kld JSON -> CSVs and plots"))
    add_check_vllm_flags(commands.add_parser(
        "check-vllm", help="judge a vLLM wheel or source tree against fastpath's patches"))
    commands.add_parser("upstream", add_help=False, help="the fast path as a vLLM patch "
                        "series: apply, copy, test, refresh (fastpath/upstream)")
    commands.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness's command line "
                        "with the fastpath-vllm model (fastpath/lm_eval_model.py)")
    return parser, ppl, kld, serve


def _prepare_runner(argv: list[str]) -> None:
    """`--model-runner v2` on CPU: register the stand-in Triton backend before vLLM is
    imported (the full parser imports vLLM), as vLLM decides V2 support at import."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model-runner", "--model_runner", dest="model_runner")
    known, _ = pre.parse_known_args(argv)
    if known.model_runner == "v2":
        from fastpath.engine.runners import prepare_process

        prepare_process()


def model_values(words: Sequence[str]) -> list[str]:
    """Every `--model` value on the command line, in order (argparse keeps only the last)."""
    values = []
    for i, word in enumerate(words):
        if word == "--model" and i + 1 < len(words):
            values.append(words[i + 1])
        elif word.startswith("--model="):
            values.append(word.removeprefix("--model="))
    return values


def check_one_model(command: str, words: Sequence[str]) -> None:
    """Refuse a repeated `--model` where a command scores one model (argparse would keep
    the last and drop the others without a word); `kld` compares every one it is given."""
    models = model_values(words)
    if len(models) > 1 and command != "kld":
        raise UsageError(f"--model was given {len(models)} times; `fastpath {command}` scores "
                         "one model per run and would silently keep the last")


def main(argv: list[str] | None = None) -> int:
    """Run the `fastpath` command line on `argv` (default: this process's); its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check-vllm"]:  # before build_parser: needs no installed vLLM
        from fastpath.tools import check_vllm

        return check_vllm.main(argv[1:])
    if argv[:1] == ["upstream"]:  # the patch series: imports no vLLM either
        from fastpath import upstream

        return upstream.main(argv[1:])
    quiet_vllm(verbose_requested(argv))  # before vLLM is imported
    _prepare_runner(argv)  # before vLLM is imported
    if argv[:1] == ["lm-eval"]:  # the rest is lm-eval's own command line
        from fastpath.cli import lm_eval

        return lm_eval.run(argv[1:])
    parser, ppl_parser, kld_parser, serve_parser = build_parser()
    subparsers = {"ppl": ppl_parser, "kld": kld_parser, "serve": serve_parser}
    args = parser.parse_args(argv)
    try:
        if args.command in subparsers:
            words = argv[list(argv).index(args.command) + 1:]
            check_one_model(args.command, words)
            given = given_flags(subparsers[args.command], words)
            from fastpath.cli import kld, ppl, serve

            if args.command == "kld":
                return kld.run(args, given, model_values(words))
            command = {"ppl": ppl.run, "serve": serve.run}[args.command]
            return command(args, given)
        from fastpath.cli import report

        return report.run(args)
    except UsageError as error:
        print(f"fastpath {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
