"""The config layer's YAML reader (stepdistill/config/yaml_loader.py) and path fields: numbers are decimal
(YAML 1.1's octal, hex, binary, sexagesimal and underscore forms are refused naming the key, or kept as
text by a text field), a key given twice is an error naming its dotted path and line, and path fields
expand ``~`` and environment variables (an unset one is refused naming the key and the variable)."""

import re

import pytest

from stepdistill.config import ConfigError, dump_config, load_config, load_yaml

BASE = ["method=progressive", "teacher.oracle={components: 4}"]
BASE_FILE = "method: progressive\nteacher:\n  oracle: {components: 4}\n"
NON_DECIMAL = ["010", "0o10", "0x10", "1:30", "0b101", "1_000"]
NUMBER_KEYS = ["train.max_steps", "train.seed", "train.checkpoint_every", "train.grad_clip", "optim.student.lr"]


def _file(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _nested(key: str, value: str) -> str:
    """``a.b.c`` = value as block YAML."""
    parts = key.split(".")
    heads = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parts[:-1]))
    return heads + f"{'  ' * (len(parts) - 1)}{parts[-1]}: {value}\n"


@pytest.mark.parametrize("form", NON_DECIMAL)
@pytest.mark.parametrize("key", NUMBER_KEYS)
def test_non_decimal_number_on_the_command_line_names_the_key(key, form):
    with pytest.raises(ConfigError, match=rf"^{key}: '{form}' is not a decimal number$"):
        load_config(None, [*BASE, f"{key}={form}"])


@pytest.mark.parametrize("form", NON_DECIMAL)
@pytest.mark.parametrize("key", NUMBER_KEYS)
def test_non_decimal_number_in_a_config_file_names_the_key(tmp_path, key, form):
    with pytest.raises(ConfigError, match=rf"^{key}: '{form}' is not a decimal number$"):
        load_config(_file(tmp_path, BASE_FILE + _nested(key, form)))


@pytest.mark.parametrize("form", NON_DECIMAL)
@pytest.mark.parametrize("where", ["override", "file"])
def test_non_decimal_number_in_a_list_or_method_args(tmp_path, where, form):
    """Inside a list of numbers, and in method_args (read later by the method's Options)."""
    cases = [("student.timesteps", f"[{form}, 1]", r"student\.timesteps\[0\]"),
             ("method_args.start_steps", form, r"method_args\.start_steps")]
    from stepdistill.training import validate_inputs

    for key, value, named in cases:
        with pytest.raises(ConfigError, match=rf"^{named}: '{form}' is not a decimal number$"):
            if where == "override":
                cfg = load_config(None, [*BASE, f"{key}={value}"])
            else:
                cfg = load_config(_file(tmp_path, BASE_FILE + _nested(key, value)))
            validate_inputs(cfg)  # method_args: read by the method's Options


@pytest.mark.parametrize("text", [*NON_DECIMAL, "1e-3", "2024"])
def test_a_text_field_keeps_number_like_text(tmp_path, text):
    by_override = load_config(None, [*BASE, f"train.output_dir={text}", f"data.split={text}"])
    assert by_override.train.output_dir == text and by_override.data.split == text
    if text != "2024":  # a YAML number (2024) in a file is a number, as before
        by_file = load_config(_file(tmp_path, BASE_FILE + f"train:\n  output_dir: {text}\ndata:\n  split: {text}\n"))
        assert by_file.train.output_dir == text and by_file.data.split == text
    # written back and read again, the text is still text
    assert load_yaml(dump_config(by_override))["train"]["output_dir"] == text


@pytest.mark.parametrize("override,field,value", [
    ("train.max_steps=12", ("train", "max_steps"), 12),
    ("train.seed=0", ("train", "seed"), 0),
    ("train.seed=+7", ("train", "seed"), 7),
    ("train.max_steps=100.0", ("train", "max_steps"), 100),
    ("train.grad_clip=1.5", ("train", "grad_clip"), 1.5),
    ("train.grad_clip=.5", ("train", "grad_clip"), 0.5),
    ("train.grad_clip=1e-3", ("train", "grad_clip"), 1e-3),
    ("train.grad_clip=1.5e-3", ("train", "grad_clip"), 1.5e-3),
    ("train.grad_clip=2E+1", ("train", "grad_clip"), 20.0),
    ("train.weight_decay=010.5", ("train", "weight_decay"), 10.5),  # a decimal fraction: no octal reading
    ("train.progress=false", ("train", "progress"), False),
    ("train.export=yes", ("train", "export"), True),
    ("train.mixed_precision=no", ("train", "mixed_precision"), "no"),  # the command line: a text field's text
])
def test_decimal_numbers_and_booleans_read_as_before(tmp_path, override, field, value):
    key, raw = override.split("=", 1)
    cfgs = [load_config(None, [*BASE, override])]
    if raw != "no":  # in a file, no is YAML 1.1's false, as before
        cfgs.append(load_config(_file(tmp_path, BASE_FILE + _nested(key, raw))))
    for cfg in cfgs:
        got = getattr(getattr(cfg, field[0]), field[1])
        assert got == value and type(got) is type(value), (override, got)


@pytest.mark.parametrize("value,match", [
    ("inf", "must be a finite number"), (".inf", "must be a finite number"), ("-.inf", "must be a finite number"),
    ("nan", "must be a finite number"), ("abc", "expected a number, got 'abc'")])
def test_not_finite_or_not_a_number_for_a_float_field(value, match):
    with pytest.raises(ConfigError, match=rf"^train\.grad_clip: {match}"):
        load_config(None, [*BASE, f"train.grad_clip={value}"])


@pytest.mark.parametrize("text", ["train:\n  max_steps: !!int 010\n", "train:\n  max_steps: !!int 0x10\n",
                                  "train:\n  grad_clip: !!float 1:30\n"])
def test_explicit_number_tags_are_decimal_too(tmp_path, text):
    key = "train.grad_clip" if "grad_clip" in text else "train.max_steps"
    message = rf"^config file '.*c\.yaml': {key}: '.*' is not a decimal number \(line 5\)$"
    with pytest.raises(ConfigError, match=message):
        load_config(_file(tmp_path, BASE_FILE + text))


@pytest.mark.parametrize("text,key,line,first", [
    (BASE_FILE + "train:\n  seed: 1\nstudent: {}\ntrain:\n  max_steps: 3\n", "train", 7, 4),
    (BASE_FILE + "train:\n  seed: 1\n  max_steps: 3\n  seed: 2\n", "train.seed", 7, 5),
    (BASE_FILE + "train: {seed: 1, seed: 2}\n", "train.seed", 4, 4),
    (BASE_FILE + "method_args:\n  grid_steps: 4\n  grid_steps: 8\n", "method_args.grid_steps", 6, 5),
    (BASE_FILE + "method_args:\n  opts:\n    - {a: 1}\n    - {b: 1, b: 2}\n", "method_args.opts[1].b", 7, 7),
    ("method: progressive\n" + BASE_FILE, "method", 2, 1),
    (BASE_FILE.replace("{components: 4}", "\n    components: 4\n    components: 8"), "teacher.oracle.components", 5, 4),
])
def test_duplicate_key_in_a_config_file_names_it(tmp_path, text, key, line, first):
    with pytest.raises(ConfigError, match=rf"^config file '.*x\.yaml': duplicate key '{re.escape(key)}' "
                                          rf"\(line {line}; first at line {first}\)$"):
        load_config(_file(tmp_path, text, "x.yaml"))


@pytest.mark.parametrize("override,key", [
    ("train={seed: 1, seed: 2}", "train.seed"),
    ("method_args={a: 1, a: 2}", "method_args.a"),
    ("teacher.oracle={components: 4, components: 8}", "teacher.oracle.components"),
])
def test_duplicate_key_in_an_override_names_it(override, key):
    with pytest.raises(ConfigError, match=rf"^duplicate key '{key}'$"):
        load_config(None, [*BASE, override])


def test_merge_keys_may_still_be_overridden(tmp_path):
    """A ``<<`` merge brings keys in that the mapping may set again: not a duplicate."""
    data = load_yaml("base: &b {seed: 1, max_steps: 5}\ntrain:\n  <<: *b\n  seed: 3\n")
    assert data["train"] == {"seed": 3, "max_steps": 5}


PATH_KEYS = ["train.output_dir", "data.cache", "teacher.path", "data.prompts", "data.images", "data.image_root",
             "student.init"]


def _path_cfg(key, value, via_file=None):
    """``key`` set to ``value`` (by an override, or in a file written to folder ``via_file``) as loaded."""
    if via_file is not None:
        head = "method: progressive\n" if key == "teacher.path" else BASE_FILE
        cfg = load_config(_file(via_file, head + _nested(key, f'"{value}"')))
    else:
        extra = ["teacher.oracle=null"] if key == "teacher.path" else []
        cfg = load_config(None, [*BASE, *extra, f"{key}={value}"])
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("via", ["override", "file"])
@pytest.mark.parametrize("key", PATH_KEYS)
def test_path_fields_expand_home_and_variables(tmp_path, monkeypatch, key, via):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SD_ROOT", "/data/sd")
    folder = tmp_path if via == "file" else None
    assert _path_cfg(key, "~/runs/a", folder) == f"{home}/runs/a"
    if via == "file":  # on the command line a lone ~ is YAML's null, as before
        assert _path_cfg(key, "~", folder) == str(home)
    assert _path_cfg(key, "$HOME/b", folder) == f"{home}/b"
    assert _path_cfg(key, "${SD_ROOT}/c/$SD_ROOT", folder) == "/data/sd/c//data/sd"
    assert _path_cfg(key, "a/~b/c$", folder) == "a/~b/c$"  # ~ not at the start, $ before no name: as written


@pytest.mark.parametrize("value,variable", [("$SD_UNSET/x", "SD_UNSET"), ("${SD_UNSET}/x", "SD_UNSET"),
                                            ("~/$SD_UNSET", "SD_UNSET")])
@pytest.mark.parametrize("key", PATH_KEYS)
def test_unset_variable_in_a_path_is_refused(tmp_path, monkeypatch, key, value, variable):
    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ConfigError, match=rf"^{key}: '.*': environment variable '{variable}' is not set$"):
        _path_cfg(key, value)


@pytest.mark.parametrize("value,match", [("${SD_ROOT", r"'\$\{' is not closed"),
                                         ("${1x}/a", r"'\$\{1x\}' does not name"),
                                         ("~sd-no-such-user/x", r"'~sd-no-such-user' names no home folder")])
def test_malformed_expansion_is_refused(value, match):
    with pytest.raises(ConfigError, match=rf"^train\.output_dir: .*{match}"):
        load_config(None, [*BASE, f"train.output_dir={value}"])


@pytest.mark.parametrize("key,value", [("teacher.path", "org/name"), ("teacher.path", "stepdistill:mnist-sd"),
                                       ("data.prompts", "hf:org/captions"), ("data.images", "hf:org/$images"),
                                       ("data.prompts", "[~/a, $NOPE]"), ("data.label_prompt", "$ {label} ~")])
def test_values_that_are_not_paths_stay_as_written(monkeypatch, key, value):
    monkeypatch.delenv("NOPE", raising=False)
    got = _path_cfg(key, value)
    assert got == (["~/a", "$NOPE"] if value.startswith("[") else value)
