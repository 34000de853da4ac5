"""`fastpath` command line: `fastpath ppl` (sliding-window perplexity), `fastpath serve`
(vLLM's OpenAI-compatible server with the scoring route), `fastpath kld` (KL divergence
against a base model, `fastpath.kld`), `fastpath report`, `fastpath check-vllm` (judge a
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

from fastpath.cli.common import (
    EXIT_USAGE,
    UsageError,
    add_verbose_flag,
    given_flags,
    quiet_vllm,
    verbose_requested,
)


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser,
                            argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `fastpath` parser and its `ppl`, `kld` and `serve` subparsers (`given_flags`
    reads the flags given to each)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from fastpath.check_vllm import add_flags as add_check_vllm_flags
    from fastpath.cli.kld import add_kld_flags
    from fastpath.cli.ppl import add_ppl_flags
    from fastpath.cli.report import add_report_flags
    from fastpath.cli.serve import add_serve_flags

    parser = FlexibleArgumentParser(prog="fastpath", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ppl = commands.add_parser("ppl", help="sliding-window perplexity through vLLM")
    EngineArgs.add_cli_args(ppl)
    ppl.set_defaults(model=None)  # None = the embedded default model
    add_ppl_flags(ppl)
    add_verbose_flag(ppl)
    kld = commands.add_parser("kld", help="KL divergence of a model against a base model")
    EngineArgs.add_cli_args(kld)
    kld.set_defaults(model=None)
    add_kld_flags(kld)
    add_verbose_flag(kld)
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
        from fastpath.runners import prepare_process

        prepare_process()


def main(argv: list[str] | None = None) -> int:
    """Run the `fastpath` command line on `argv` (default: this process's); its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check-vllm"]:  # before build_parser: needs no installed vLLM
        from fastpath import check_vllm

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
            given = given_flags(subparsers[args.command],
                                argv[list(argv).index(args.command) + 1:])
            from fastpath.cli import kld, ppl, serve

            command = {"ppl": ppl.run, "kld": kld.run, "serve": serve.run}[args.command]
            return command(args, given)
        from fastpath.cli import report

        return report.run(args)
    except UsageError as error:
        print(f"fastpath {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
