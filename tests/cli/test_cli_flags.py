"""Explicit flags win: only flags the user did not give get fastpath's engine defaults."""

from __future__ import annotations

import dataclasses

import pytest

from fastpath import cli
from fastpath.cli import common
from fastpath.cli import ppl as ppl_command
from fastpath.engine import scoring


@pytest.fixture(scope="module")
def parsers():
    return cli.build_parser()


def given(parsers, *words: str) -> set[str]:
    return common.given_flags(parsers[1], words)


@pytest.mark.parametrize("words, dests", [
    ((), set()),
    (("--dtype", "auto"), {"dtype"}),
    (("--dtype=auto",), {"dtype"}),
    (("--max-logprobs", "20"), {"max_logprobs"}),
    (("--max_logprobs", "20"), {"max_logprobs"}),  # FlexibleArgumentParser's underscore form
    (("--max_logprobs=20",), {"max_logprobs"}),
    (("--max-logp", "20"), {"max_logprobs"}),  # argparse abbreviation
    (("-tp", "1"), {"tensor_parallel_size"}),
    (("--kv-cache-memory-bytes", "1G"), {"kv_cache_memory_bytes"}),
    (("--no-enable-prefix-caching",), {"enable_prefix_caching"}),
    (("--enforce-eager",), {"enforce_eager"}),
    (("--compilation-config.mode", "0"), {"compilation_config"}),  # dotted form
    (("--seed", "0", "--stride", "512", "--method", "fast"), {"seed", "stride", "method"}),
])
def test_given_flags_reads_every_spelling(parsers, words, dests):
    assert given(parsers, *words) == dests


def test_given_flags_reads_a_config_file(parsers, tmp_path):
    config = tmp_path / "engine.yaml"
    config.write_text("dtype: auto\nmax_logprobs: 20\n")
    assert given(parsers, "--config", str(config)) == {"dtype", "max_logprobs"}


def test_given_flags_needs_the_subcommand_parser(parsers):
    with pytest.raises(TypeError, match="subcommand"):
        common.given_flags(parsers[0], ["ppl"])


def engine_args(parsers, *words: str):
    args = parsers[0].parse_args(["ppl", *words])
    return common.engine_args(common.RunFlags.read(args, given(parsers, *words)))


def test_flags_are_read_once_and_never_written(parsers):
    """The parsed namespace is copied into RunFlags and left as parsed; derived values and
    fastpath's engine defaults live beside the given flags, never in them."""
    words = ["--context-length", "1024", "--dtype", "auto"]
    args = parsers[0].parse_args(["ppl", *words])
    before = dict(vars(args))
    flags = ppl_command.check_ppl_flags(common.RunFlags.read(args, given(parsers, *words)))
    common.engine_args(flags)
    assert vars(args) == before and args.stride is None  # nothing wrote into the namespace
    assert flags.stride == 512  # the fastpath convention's default stride, derived
    with pytest.raises(dataclasses.FrozenInstanceError):
        flags.stride = 3
    with pytest.raises(TypeError):
        flags.values["stride"] = 3
    assert flags.given_values() == {"context_length": 1024, "dtype": "auto"}
    settings = flags.settings()
    assert settings["stride"] == 512 and settings["dtype"] == "auto"
    assert settings["disable_log_stats"] == scoring.default_engine_kwargs()["disable_log_stats"]


def test_typed_values_equal_to_vllms_defaults_are_kept(parsers):
    """`--dtype auto` and `--max-logprobs 20` are vLLM's defaults, and what the user asked for."""
    fastpath = scoring.default_engine_kwargs()
    typed = engine_args(parsers, "--dtype", "auto", "--max-logprobs", "20",
                        "--no-enforce-eager", "--kv-cache-memory-bytes", "256M")
    assert (typed.dtype, typed.max_logprobs, typed.enforce_eager) == ("auto", 20, False)
    assert typed.kv_cache_memory_bytes == 256 * 2**20
    assert typed.disable_log_stats == fastpath["disable_log_stats"]  # not given: fastpath's
    untouched = engine_args(parsers)
    for key, value in fastpath.items():
        assert getattr(untouched, key) == value, key


def test_main_hands_the_given_flags_to_ppl(monkeypatch):
    seen = {}
    monkeypatch.setattr(ppl_command, "run",
                        lambda args, given: seen.update(given=given) or 0)
    assert cli.main(["ppl", "--dtype", "auto", "--max_logprobs=20", "-tp", "1"]) == 0
    assert seen["given"] == {"dtype", "max_logprobs", "tensor_parallel_size"}


def test_given_flags_on_vllms_server_parser():
    """`fastpath serve` reuses it on vLLM's own server parser (positional model, append flags)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    assert common.given_flags(parser, []) == set()
    words = ["--port", "8000", "--middleware", "a.b", "--dtype=auto", "--max_logprobs", "20",
             "--enable-scale-out"]
    assert common.given_flags(parser, words) == {"port", "middleware", "dtype", "max_logprobs",
                                              "enable_scale_out"}


@pytest.mark.parametrize("old, new", [("--path", "--method"), ("--protocol", "--convention")])
def test_the_old_spellings_are_gone(parsers, capsys, old, new):
    """0.1's `--path` and `--protocol` were renamed (they also meant file paths and HTTP)."""
    with pytest.raises(SystemExit):
        parsers[0].parse_args(["ppl", old, "fast" if old == "--path" else "hf"])
    assert f"unrecognized arguments: {old}" in capsys.readouterr().err
    assert parsers[1].parse_args([new, "fast" if new == "--method" else "hf"])


SHORT_HELP_MAX_LINES = 100


def _help(command: str, flag: str, capsys, monkeypatch) -> str:
    """What `fastpath COMMAND FLAG` prints (vLLM keeps a `--help=` search class-wide)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    monkeypatch.setattr(FlexibleArgumentParser, "_search_keyword", None)
    with pytest.raises(SystemExit) as done:
        cli.main([command, flag])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command, own_flag", [("ppl", "--context-length"),
                                               ("kld", "--base-model")])
def test_short_help_shows_fastpaths_flags_and_one_line_of_vllms(command, own_flag, capsys,
                                                                monkeypatch):
    text = _help(command, "--help", capsys, monkeypatch)
    assert len(text.splitlines()) <= SHORT_HELP_MAX_LINES, len(text.splitlines())
    assert own_flag in text and "--server URL" in text and "examples:" in text
    assert "Every `vllm serve` engine flag is accepted" in text and "SchedulerConfig" in text
    assert f"fastpath {command} --help=all" in text
    assert "--max-num-batched-tokens" not in text  # an engine flag: listed on request


def test_help_on_request_lists_vllms_flags(capsys, monkeypatch):
    everything = _help("ppl", "--help=all", capsys, monkeypatch)
    assert "--max-num-batched-tokens" in everything and "--stride" in everything
    assert len(everything.splitlines()) > 3 * SHORT_HELP_MAX_LINES
    group = _help("ppl", "--help=SchedulerConfig", capsys, monkeypatch)
    assert "--max-num-batched-tokens" in group and "--stride" not in group
