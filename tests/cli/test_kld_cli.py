"""`fastpath kld` and `ppl --convention` flags, without an engine: refusals by name, and the
base engine's flags (the model's, with the --base-* overrides)."""

from __future__ import annotations

import pytest

from fastpath import cli
from fastpath.cli import common
from fastpath.cli import kld as kld_command


@pytest.mark.parametrize("argv, fragment", [
    (["ppl", "--convention", "lm-eval", "--stride", "10"],
     "--stride does not apply to --convention lm-eval"),
    (["ppl", "--convention", "llama.cpp", "--context-length", "2"],
     "--context-length must be at least 3"),
    (["ppl", "--convention", "hf", "--context-length", "64", "--stride", "65"],
     "--stride must be in"),
    (["kld", "--model", "m"], "--base-model is required unless --base-cache"),
    (["kld", "--base-model", "b"], "--model is required"),
    (["kld", "--base-model", "b", "--model", "m", "--top-k", "0"], "--top-k must be a positive"),
    (["kld", "--base-model", "b", "--model", "m", "--convention", "llama.cpp", "--stride", "4"],
     "--stride does not apply"),
    (["kld", "--base-model", "b", "--model", "m", "--max-batch-windows", "0"],
     "--max-batch-windows must be positive"),
    (["kld", "--server", "http://x", "--base-model", "b", "--model", "q", "--model=b"],
     "--model and --server both name the model"),
    (["kld", "--base-cache", "/nonexistent.npz", "--base-server", "http://b", "--model", "q",
      "--noise-floor", "bfloat16"], "--noise-floor bfloat16 re-runs the base model"),
    (["ppl", "--model", "a", "--model", "b"], "--model was given 2 times"),
])
def test_cli_flag_errors_before_any_engine(argv, fragment, capsys):
    assert cli.main(argv) == common.EXIT_USAGE
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_kld_corrupt_base_file_refused(tmp_path, capsys):
    bad = tmp_path / "base.npz"
    bad.write_bytes(b"junk")
    assert cli.main(["kld", "--model", "m", "--base-cache", str(bad)]) == common.EXIT_USAGE
    assert "is not a fastpath kld base file" in capsys.readouterr().err


def test_base_engine_flags_are_the_models_with_overrides():
    parser, _, kld_parser, _ = cli.build_parser()
    words = ["--base-model", "/b", "--model", "/q", "--quantization", "awq", "--dtype",
             "bfloat16", "--base-quantization", "none", "--tokenizer", "/q-tok"]
    args = parser.parse_args(["kld", *words])
    flags = common.RunFlags.read(args, common.given_flags(kld_parser, words))
    base = kld_command.base_flags(flags)
    assert (base.model, base.quantization, base.dtype, base.tokenizer) == ("/b", None,
                                                                            "bfloat16", None)
    assert {"quantization", "dtype"} <= base.given and "tokenizer" not in base.given
    assert (flags.model, flags.quantization, flags.tokenizer) == ("/q", "awq", "/q-tok")
    assert (args.model, args.quantization, args.tokenizer) == ("/q", "awq", "/q-tok")
    args = parser.parse_args(["kld", "--base-model", "/b", "--model", "/q",
                              "--base-dtype", "float16", "--base-tensor-parallel-size", "2"])
    base = kld_command.base_flags(common.RunFlags.read(args, set()))
    assert (base.dtype, base.tensor_parallel_size) == ("float16", 2)
    assert base.given == {"dtype", "tensor_parallel_size"}
    assert common.engine_args(base).dtype == "float16"
    # fastpath's float32 default, derived for the model's engine, must not shadow the base's
    defaulted = kld_command.base_flags(common.with_engine_defaults(common.RunFlags.read(args,
                                                                                       set())))
    assert defaulted.dtype == "float16" and common.engine_args(defaulted).dtype == "float16"


def test_every_model_given_is_a_variant_in_order():
    assert cli.model_values(["--base-model", "b", "--model", "q1", "--dtype", "auto",
                             "--model=q2", "--model", "b"]) == ["q1", "q2", "b"]


def test_noise_floor_by_default_only_with_several_local_variants():
    parser, _, kld_parser, _ = cli.build_parser()

    def floor(*words: str) -> str:
        args = parser.parse_args(["kld", *words])
        flags = common.RunFlags.read(args, common.given_flags(kld_parser, list(words)))
        return kld_command.noise_floor_dtype(flags.derive(models=cli.model_values(words)))

    assert floor("--base-model", "b", "--model", "q") == "none"
    assert floor("--base-model", "b", "--model", "q1", "--model", "q2") == "bfloat16"
    assert floor("--base-model", "b", "--model", "q", "--noise-floor", "float16") == "float16"
    assert floor("--base-model", "b", "--model", "q1", "--model", "q2",
                 "--noise-floor", "none") == "none"
    assert floor("--base-server", "http://b", "--model", "q1", "--model", "q2") == "none"


def test_variants_and_noise_floor_runs():
    """Each --model in order on the model's engine flags, then the base model in the noise
    floor's dtype on the base's flags (--base-dtype included): what the engines are given."""
    parser, _, kld_parser, _ = cli.build_parser()
    words = ["--base-model", "/b", "--model", "/q1", "--model=/q2/", "--dtype", "float16",
             "--base-dtype", "float32", "--kv-cache-memory-bytes", "64M"]
    args = parser.parse_args(["kld", *words])
    flags = common.RunFlags.read(args, common.given_flags(kld_parser, words))
    flags = kld_command.check_kld_flags(flags.derive(models=cli.model_values(words)))
    runs = kld_command.variants_of(flags)
    assert [(r.label, r.role) for r in runs] == [
        ("q1", "variant"), ("q2", "variant"), ("noise floor: base in bfloat16", "noise floor")]
    engines = [common.engine_args(r.flags) for r in runs]
    assert [(e.model, e.dtype) for e in engines] == [("/q1", "float16"), ("/q2/", "float16"),
                                                      ("/b", "bfloat16")]
    assert all(e.kv_cache_memory_bytes == 64 << 20 for e in engines)
    assert all(e.max_num_seqs == 1 for e in engines)  # fastpath's isolated schedule, each
