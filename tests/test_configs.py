"""The TOML files under configs/: they load, they say what they claim, bad keys are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sfprompt_mpi.config import FIELDS, WIRE_DTYPES, Config, build_config, clients_per_round, load_toml
from sfprompt_mpi.fed.state import select_clients
from sfprompt_mpi.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.rglob("*.toml"))
PAPER = sorted((CONFIGS / "paper").glob("*.toml"))


def _load(path: Path) -> Config:
    return build_config(load_toml(path))


def test_the_expected_files_are_there():
    names = {str(p.relative_to(CONFIGS)) for p in ALL}
    expected = {"offline.toml", "cifar10_vitb.toml", "paper/cifar10_vitl_iid.toml", "paper/cifar10_vitl_dir0.1.toml"}
    expected |= {f"paper/{ds}_{split}.toml" for ds in ("cifar10", "cifar100", "svhn", "flowers102")
                 for split in ("iid", "dir0.1")}
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads_and_validates(path):
    cfg = _load(path)
    assert isinstance(cfg, Config)


def test_offline_is_the_defaults_spelled_out():
    # Prepare
    raw = load_toml(CONFIGS / "offline.toml")
    defaults = Config().to_dict()
    # Assert: every field is written out, and each equals its default (but clients = 4).
    for section, values in defaults.items():
        assert set(raw.get(section, {})) == set(values), f"[{section}] must list every field"
        for key, default in values.items():
            want = 4 if (section, key) == ("fed", "clients") else default
            assert raw[section][key] == want, f"{section}.{key} = {raw[section][key]!r}, default {default!r}"
    cfg = _load(CONFIGS / "offline.toml")
    assert (cfg.data.dataset, cfg.model.pretrained, cfg.fed.clients) == ("digits", True, 4)


@pytest.mark.parametrize("path", PAPER + [CONFIGS / "cifar10_vitb.toml"], ids=lambda p: p.stem)
def test_paper_settings(path):
    cfg = _load(path)
    dataset, split = path.stem.replace("_vitl", "").split("_") if path.parent.name == "paper" else ("cifar10", "iid")
    large = "_vitl" in path.stem
    assert cfg.model.name == ("vit_large_patch16_224.augreg_in21k" if large else "vit_base_patch16_224.augreg_in21k")
    assert cfg.model.pretrained and not cfg.model.checkpoint
    assert (cfg.model.head_blocks, cfg.model.tail_blocks, cfg.model.prompt_len) == (1, 1, 10)
    assert cfg.data.dataset == dataset
    if split == "iid":
        assert cfg.data.partition == "iid"
    else:
        assert (cfg.data.partition, cfg.data.alpha) == ("dirichlet", 0.1)
    assert (cfg.fed.algo, cfg.fed.clients, cfg.fed.batch_size) == ("sfprompt", 50, 128)
    assert (cfg.fed.optimizer, cfg.fed.lr, cfg.fed.local_lr) == ("sgd", 0.1, 1e-4)


def test_cifar10_vitb_is_the_paper_cifar10_iid():
    assert _load(CONFIGS / "cifar10_vitb.toml") == _load(CONFIGS / "paper" / "cifar10_iid.toml")


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_model_exists_and_the_cut_fits(path):
    # Shapes only (meta device): no weights are fetched.
    from sfprompt_mpi.model.vit import SMALL_MODELS, build_backbone

    cfg = _load(path)
    vit = build_backbone(dataclasses.replace(cfg.model, pretrained=False), num_classes=10, quiet=True, meta=True)
    assert cfg.model.head_blocks + cfg.model.tail_blocks < len(vit.blocks)
    if cfg.model.pretrained and cfg.model.name not in SMALL_MODELS:  # the CPU models' weights ship
        import timm

        assert cfg.model.name in timm.list_pretrained(), f"timm has no pretrained tag {cfg.model.name}"


# --- bad files are named precisely -------------------------------------------

def test_unknown_key_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text((CONFIGS / "offline.toml").read_text().replace("[fed]\n", "[fed]\nroundz = 7\n"))
    with pytest.raises(UserError, match=r"fed\.roundz"):
        load_toml(path)


def test_key_in_the_wrong_section_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\nrounds = 3\n')
    with pytest.raises(UserError, match=r"model\.rounds"):
        load_toml(path)


def test_unknown_section_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[training]\nrounds = 3\n')
    with pytest.raises(UserError, match=r"training"):
        load_toml(path)


@pytest.mark.parametrize("line, key", [
    ('rounds = "five"', r"fed\.rounds"),
    ("lr = true", r"fed\.lr"),
    ("local_loss = 1", r"fed\.local_loss"),
])
def test_wrong_type_is_a_user_error_naming_the_key(tmp_path, line, key):
    name = line.split()[0]
    text = (CONFIGS / "offline.toml").read_text()
    start = text.index(f"\n{name} = ") + 1
    end = text.index("\n", start)
    path = tmp_path / "bad.toml"
    path.write_text(text[:start] + line + text[end:])
    with pytest.raises(UserError, match=key):
        load_toml(path)


def test_out_of_range_value_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[fed]\nrounds = 0\n')
    with pytest.raises(UserError, match=r"fed\.rounds"):
        build_config(load_toml(path))


@pytest.mark.parametrize("name", [n for n, (_, f) in FIELDS.items() if f.metadata["choices"]])
def test_every_choice_field_refuses_a_value_outside_its_choices(name):
    section, f = FIELDS[name]
    with pytest.raises(UserError, match=rf"^{section}\.{name} must be one of .*, got 'nonsense'$"):
        build_config({section: {name: "nonsense"}})
    for choice in f.metadata["choices"]:
        build_config({section: {name: choice}})


def test_clients_per_round_is_the_one_formula():
    assert [clients_per_round(n, f) for n, f in [(10, 1.0), (10, 0.25), (10, 0.01), (3, 0.5), (5, 0.5)]] == \
        [10, 2, 1, 2, 2]
    assert select_clients(10, 0.25, seed=0, rnd=1) == sorted(select_clients(10, 0.25, seed=0, rnd=1))
    assert len(select_clients(10, 0.25, seed=0, rnd=1)) == clients_per_round(10, 0.25)


def test_wire_bytes_follow_the_wire_dtype_names():
    import torch

    from sfprompt_mpi.estimate import WIRE_BYTES
    assert WIRE_BYTES == {n: torch.empty(0, dtype=getattr(torch, n)).element_size() for n in WIRE_DTYPES}
    assert FIELDS["wire_dtype"][1].metadata["choices"] == WIRE_DTYPES


def test_config_reads_toml_without_tomllib(tmp_path):
    """Python 3.10 has no tomllib: config falls back to tomli, which setup.cfg installs there."""
    import subprocess
    import sys

    (tmp_path / "a.toml").write_text("[fed]\nrounds = 3\n")
    script = (
        "import sys, tomllib\n"
        "sys.modules['tomli'] = tomllib  # stands in for the PyPI package of the same parser\n"
        "del sys.modules['tomllib']\n"
        "class NoTomllib:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tomllib': raise ModuleNotFoundError(\"No module named 'tomllib'\", name=name)\n"
        "sys.meta_path.insert(0, NoTomllib())\n"
        "from sfprompt_mpi.config import build_config, load_toml\n"
        f"print(build_config(load_toml({str(tmp_path / 'a.toml')!r})).fed.rounds)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
    setup = (Path(__file__).resolve().parents[1] / "setup.cfg").read_text()
    assert "python_requires = >=3.10" in setup and 'tomli>=1.1; python_version < "3.11"' in setup


def test_help_prints_each_default_once_and_the_real_one():
    from sfprompt_mpi.config import build_parser

    text = " ".join(build_parser().format_help().split())  # argparse wraps lines

    assert "(default: None)" not in text
    assert text.count("(default: ") == len(FIELDS)
    assert "federated rounds (default: 10)" in text and "client mini-batch size (default: 32)" in text


def test_given_names_the_fields_set_by_file_or_flag(tmp_path):
    from sfprompt_mpi.config import parse_config

    toml = tmp_path / "a.toml"
    toml.write_text("[fed]\nrounds = 3\nlr = 0.1\n[comm]\nwire_dtype = \"float32\"\n")

    assert parse_config([]).given == frozenset()
    cfg = parse_config(["--config", str(toml), "--rounds", "4", "--no-local-loss", "--seed", "0"])
    assert cfg.given == {"rounds", "lr", "wire_dtype", "local_loss", "seed"}  # a default given is still given
    assert cfg.fed.rounds == 4 and cfg.fed.lr == 0.1
    assert cfg == parse_config(["--rounds", "4", "--lr", "0.1", "--no-local-loss"])  # not compared
    assert "given" not in cfg.to_toml() and set(cfg.to_dict()) == {"model", "data", "fed", "comm", "run"}
    assert build_config({"fed": {"rounds": 2}}).given == {"rounds"}


def test_given_on_resume_is_what_the_resuming_command_sets(tmp_path):
    from sfprompt_mpi.run import resolve_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(build_config({"fed": {"rounds": 2, "lr": 0.1}}).to_toml())

    cfg = resolve_config(["--resume", str(run_dir), "--rounds", "5"])

    assert cfg.fed.rounds == 5 and cfg.fed.lr == 0.1 and cfg.run.run_dir == str(run_dir)
    assert cfg.given == {"resume", "rounds"}
