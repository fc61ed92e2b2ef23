"""core.cli and core.errors: one error line, one exit-code scheme and one parser per kind of value for every CLI."""

from __future__ import annotations

import argparse
import importlib

import pytest

from core import cli
from core.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EXIT_FAILED, AnchorError, BadInput, Failed, Unavailable


@pytest.mark.parametrize("error, code", [(BadInput("no such file: x"), 2), (Unavailable("no GPU"), 3),
                                         (Failed("TensorRT refused"), 1)])
def test_guarded_prints_argparse_form_and_returns_the_class_code(error, code, capsys):
    def run(value):
        assert value == "arg"
        raise error

    assert cli.guarded("python -m tool", run, "arg") == code
    assert capsys.readouterr().err == f"python -m tool: error: {error}\n"
    assert cli.guarded("python -m tool", lambda: 0) == 0


def test_unexpected_exceptions_are_not_swallowed():
    with pytest.raises(ZeroDivisionError):
        cli.guarded("tool", lambda: 1 / 0)


def test_every_layers_errors_carry_their_exit_code():
    from core.backend import BackendError
    from core.config import ConfigError
    from core.cuda import NoGpuError
    from core.sidecar import OutputPathError, ProfileError, SidecarError
    from eval.scoring import EvalError
    from netdef.build import BuildError
    from weights import WeightsError
    from weights.checkpoint import CheckpointError

    for cls in (ConfigError, OutputPathError, ProfileError, SidecarError, WeightsError, CheckpointError):
        assert issubclass(cls, BadInput) and cls("x").exit_code == EXIT_BAD_INPUT, cls
    assert BackendError("x").exit_code == NoGpuError("x").exit_code == EXIT_ENVIRONMENT
    assert BuildError("x").exit_code == EXIT_FAILED
    assert isinstance(OutputPathError("x"), OSError)  # still caught where an OSError is
    assert EvalError("x").exit_code == 2 and EvalError("x", EXIT_ENVIRONMENT).exit_code == 3
    assert issubclass(EvalError, AnchorError)


@pytest.mark.parametrize("module, argv", [
    ("netdef.build", ["--weights", "{tmp}/w.safetensors"]),
    ("reference.check", ["--weights", "{tmp}/w.safetensors"]),
    ("weights.extract", ["{tmp}/c.pth"]),
    ("runtime.infer", ["{tmp}/x.jpg", "--weights", "{tmp}/w.safetensors"]),
    ("runtime.bench", ["--engine", "{tmp}/e.plan"]),
    ("eval.coco", ["--annotations", "{tmp}/a.json", "--results", "{tmp}/r.json"]),
])
def test_argparse_errors_and_ours_name_the_program_alike(module, argv, tmp_path, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit):
        main(["--no-such-option"])
    argparse_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert argparse_line.startswith(f"python -m {module}: error: ")
    assert main([a.format(tmp=tmp_path) for a in argv]) == EXIT_BAD_INPUT  # a missing file: our own error
    ours = capsys.readouterr().err.strip().splitlines()[-1]
    assert ours.startswith(f"python -m {module}: error: ") and str(tmp_path) in ours, ours


@pytest.mark.parametrize("parse, text, value", [
    (cli.hw, "800x1344", (800, 1344)), (cli.hw, "64X96", (64, 96)),
    (cli.hw_list, "800x800,16x24", [(800, 800), (16, 24)]),
    (cli.int_list, "1,4", [1, 4]), (cli.min_opt_max, "1,2,8", (1, 2, 8)),
    (cli.positive_int, "3", 3), (cli.positive_float, "1e-3", 1e-3),
    (cli.probability, "0", 0.0), (cli.probability, "1", 1.0),
])
def test_argument_types_accept(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse, text, detail", [
    (cli.min_opt_max, "0,1,8", "got '0,1,8': MIN '0' is not a positive integer"),
    (cli.min_opt_max, "1,x,8", "got '1,x,8': OPT 'x' is not a positive integer"),
    (cli.int_list, "1,4,-2", "got '1,4,-2': '-2' is not a positive integer"),
])
def test_list_refusals_name_the_number_that_is_wrong(parse, text, detail):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert str(info.value).endswith(detail), str(info.value)


@pytest.mark.parametrize("parse, text, expected", [
    (cli.hw, "800", "HEIGHTxWIDTH"), (cli.hw, "0x800", "positive sides"), (cli.hw, "8x8x8", "HEIGHTxWIDTH"),
    (cli.hw_list, "800x800,big", "HxW[,HxW...]"), (cli.int_list, "1,x", "positive integers"),
    (cli.int_list, "1,0", "positive integers"), (cli.min_opt_max, "1,8", "MIN,OPT,MAX"),
    (cli.positive_int, "0", "positive integer"), (cli.positive_int, "1.5", "positive integer"),
    (cli.positive_float, "nan", "positive finite"), (cli.positive_float, "inf", "positive finite"),
    (cli.positive_float, "-1", "positive finite"), (cli.probability, "nan", "from 0 to 1"),
    (cli.probability, "1.01", "from 0 to 1"), (cli.probability, "high", "from 0 to 1"),
])
def test_argument_types_refuse_with_what_they_expected(parse, text, expected):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert expected in str(info.value) and repr(text) in str(info.value)


# ---------------------------------------------------------------- outputs never replace inputs


def test_an_output_that_is_an_input_is_refused_by_name_link_or_inode(tmp_path):
    from core.sidecar import OutputPathError, check_output_path

    source = tmp_path / "photo.jpg"
    source.write_bytes(b"jpeg")
    (tmp_path / "sym.jpg").symlink_to(source)
    (tmp_path / "hard.jpg").hardlink_to(source)
    (tmp_path / "sub").mkdir()
    inputs = [("--weights", None), ("image", source)]
    for target in (source, tmp_path / "sym.jpg", tmp_path / "hard.jpg", tmp_path / "sub" / ".." / "photo.jpg"):
        with pytest.raises(OutputPathError, match=r"--json .* is the image .*photo.jpg.*would destroy that input"):
            check_output_path(target, "--json", inputs)
    # The input named through a link is still the same file.
    with pytest.raises(OutputPathError, match="is the image"):
        check_output_path(source, "--json", [("image", tmp_path / "sym.jpg")])
    other = tmp_path / "other.jpg"
    other.write_bytes(b"jpeg")  # equal bytes, another file: fine
    assert check_output_path(other, "--json", inputs) == other
    assert check_output_path(tmp_path / "new.json", "--json", inputs) == tmp_path / "new.json"
    assert source.read_bytes() == b"jpeg"


def test_serve_client_json_over_an_image_is_refused_before_connecting(tmp_path, capsys):
    from serve import client

    image = tmp_path / "photo.jpg"
    image.write_bytes(b"jpeg")
    # No server listens on port 9: reaching it would be exit 3, not 2.
    assert client.main([str(image), "--json", str(image), "--url", "127.0.0.1:9"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--json {image} is the image {image}" in err[0], err
    assert image.read_bytes() == b"jpeg"


# ---------------------------------------------------------------- Ctrl-C and SIGTERM


def test_guarded_turns_ctrl_c_and_sigterm_into_one_line(capsys):
    import signal

    from core.errors import Terminated

    def interrupted():
        raise KeyboardInterrupt

    def terminated():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM takes the KeyboardInterrupt path
        raise Terminated

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert cli.guarded("python -m tool", interrupted) == 130
    assert capsys.readouterr().err == "python -m tool: interrupted\n"
    assert cli.guarded("python -m tool", terminated) == 143
    assert capsys.readouterr().err == "python -m tool: terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back


@pytest.mark.parametrize("module, function, argv", [
    ("weights.extract", "run", ["--random-init", "r50_c5", "-o", "{tmp}/w.safetensors"]),
    ("reference.check", "run", ["--weights", "{tmp}/w.safetensors"]),
    ("runtime.bench", "run", ["--engine", "{tmp}/e.plan"]),
    ("runtime.infer", "run", ["{tmp}/x.jpg"]),
    ("eval.coco", "score_file", ["--annotations", "{tmp}/a.json", "--results", "{tmp}/r.json"]),
    ("serve.client", "run", ["{tmp}/x.jpg"]),
    ("netdef.build", "run", ["--weights", "{tmp}/w.safetensors"]),
])
def test_ctrl_c_in_every_command_is_one_line_and_exit_130(module, function, argv, tmp_path, capsys, monkeypatch):
    mod = importlib.import_module(module)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, function, interrupted)
    assert mod.main([a.format(tmp=tmp_path) for a in argv]) == 130
    assert capsys.readouterr().err == f"python -m {module}: interrupted\n"
