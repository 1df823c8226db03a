"""A rank without ``torch._dynamo`` nor sympy (sfprompt_mpi/lean.py): both deferred through a whole run,
loaded for real where something needs them, and the same parameters either way.

Each check runs in a fresh interpreter: this test process has imported the real module long ago.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import run_helpers as helpers  # tests/mpi, put on sys.path by tests/conftest.py


def _python(code: str, *args: str, **env: str) -> list[str]:
    """Run ``code`` (with ``args``) in a fresh interpreter, bounded -> the words of its lines that start
    with ``RESULT`` (its output also holds the run's log lines); it must exit 0."""
    done = helpers.run_bounded([sys.executable, "-c", textwrap.dedent(code), *args], env=env)
    assert done.returncode == 0, done.report()
    return [w for line in done.output.splitlines() if line.startswith("RESULT") for w in line.split()[1:]]


TRAIN_A_STEP = """
    import sys
    from sfprompt_mpi.lean import SHAPES, defer_imports, deferred, dynamo_deferred
    print("RESULT installed", defer_imports())
    import torch, torch.nn.functional as F, timm, torchvision
    from sfprompt_mpi.config import parse_config
    from sfprompt_mpi.estimate import build_meta_model
    from sfprompt_mpi.model.split import build_model
    cfg = parse_config([])
    build_meta_model(cfg, 10)
    model = build_model(cfg.model, 10, cfg.run.seed, quiet=True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    acts = model.head(torch.zeros(2, 3, 32, 32))
    body = model.body(acts.detach().requires_grad_(True))
    (grad,) = torch.autograd.grad(body, body, torch.ones_like(body))   # the server's, with a gradient
    acts.backward(torch.ones_like(acts))                              # the client's head backward
    F.cross_entropy(model(torch.zeros(2, 3, 32, 32)), torch.zeros(2, dtype=torch.long)).backward()
    opt.step()
    print("RESULT deferred", dynamo_deferred(), "torch._dynamo" in sys.modules, deferred(SHAPES),
          "sympy" in sys.modules)
    from sfprompt_mpi.lean import LOADED_BY
    print("RESULT loaded-by", *(f"{k}<-{v}" for k, v in LOADED_BY.items()))
"""


def test_imports_a_meta_model_split_backward_and_an_optimiser_step_leave_both_deferred():
    out = _python(TRAIN_A_STEP)
    loaded_by = out[out.index("loaded-by") + 1:]
    # on failure after a torch upgrade, loaded_by names the attribute the new torch asked a stand-in for
    assert out[:out.index("loaded-by")] == ["installed", "True", "deferred", "True", "True", "True", "False"], loaded_by
    assert loaded_by == []


def test_the_shapes_stand_in_answers_as_the_real_module_and_loads_it_for_anything_else():
    out = _python("""
        import sys
        from sfprompt_mpi.lean import SHAPES, defer_imports, deferred
        defer_imports()
        from torch.fx.experimental.symbolic_shapes import expect_true, sym_eq
        import torch
        cases = [((1, 2), (1, 2)), (torch.Size([3, 4]), (3, 4)), ((1, 2), (1, 3)), ((1,), (1, 2)), (5, 5), (5, 6)]
        mine = [sym_eq(a, b) for a, b in cases] + [expect_true(True), expect_true(False)]
        print("RESULT", deferred(SHAPES), "sympy" in sys.modules)
        import torch.fx.experimental.symbolic_shapes as shapes
        shapes.ShapeEnv                     # anything else: the real module, from then on
        real = [shapes.sym_eq(a, b) for a, b in cases] + [shapes.expect_true(True), shapes.expect_true(False)]
        print("RESULT", deferred(SHAPES), "sympy" in sys.modules, mine == real, *mine)
        real_module = sys.modules[SHAPES]
        print("RESULT", real_module is torch.fx.experimental.symbolic_shapes, real_module.sym_eq is not sym_eq)
        from sfprompt_mpi.lean import LOADED_BY
        print("RESULT", LOADED_BY[SHAPES])
    """)
    assert out == ["True", "False", "False", "True", "True", "True", "True", "False", "False", "True", "False",
                   "True", "False", "True", "True", "torch.fx.experimental.symbolic_shapes.ShapeEnv"]


def test_keep_dynamo_installs_no_stand_in():
    # a whole run with it set loads the real module: see the last test
    out = _python("""
        import sys
        from sfprompt_mpi.lean import defer_imports
        print("RESULT", defer_imports(), "torch._dynamo" in sys.modules)
    """, SFPROMPT_KEEP_DYNAMO="1")
    assert out == ["False", "False"]


def test_a_submodule_import_loads_the_real_package_once_and_compile_still_works():
    out = _python("""
        import sys, torch
        from sfprompt_mpi.lean import defer_imports, dynamo_deferred
        defer_imports()
        import torchvision  # its ops take one helper from the stand-in's utils
        before = dynamo_deferred()
        import torch._dynamo.decorators as decorators  # what another library may do (peft's transformers)
        # the real package imported this submodule itself: the import above must hand out that very module
        print("RESULT", before, dynamo_deferred(), decorators.disable is torch._dynamo.disable,
              sys.modules["torch._dynamo"] is torch._dynamo)
        print("RESULT", float(torch.compile(lambda x: x * 2, backend="eager")(torch.ones(3)).sum()))
    """)
    assert out == ["True", "False", "True", "True", "6.0"]


def test_cost_defers_dynamo_and_loads_the_real_shapes_its_meta_kernels_need():
    out = _python("""
        import sys
        from sfprompt_mpi.cost import main
        assert main(["--algos", "sfprompt", "--json", "-"]) == 0
        from sfprompt_mpi.lean import SHAPES, deferred, dynamo_deferred
        print("RESULT", dynamo_deferred(), deferred(SHAPES))
    """)
    assert out == ["True", "False"]


@pytest.mark.slow
def test_a_run_never_loads_dynamo_nor_sympy_and_ends_bitwise_where_a_run_that_loaded_them_ends(tmp_path):
    code = """
        import sys
        from sfprompt_mpi.run import main
        assert main(sys.argv[1:]) == 0
        from sfprompt_mpi.lean import SHAPES, deferred, dynamo_deferred
        print("RESULT", dynamo_deferred(), deferred(SHAPES), "sympy" in sys.modules)
    """
    # sfprompt: the server's body and the clients' heads run backward with a received gradient
    flags = ["--rounds", "2", "--clients", "2", "--max-train-samples", "96", "--max-test-samples", "30",
             "--threads", "1", "--batch-size", "16", "--reference"]
    deferred = {name: _python(code, *flags, "--run-dir", str(tmp_path / name), **env)
                for name, env in (("lean", {}), ("kept", {"SFPROMPT_KEEP_DYNAMO": "1"}))}

    assert deferred == {"lean": ["True", "True", "False"], "kept": ["False", "False", "True"]}
    lean, kept = (load_file(str(tmp_path / name / "checkpoint" / "global.safetensors")) for name in ("lean", "kept"))
    assert sorted(lean) == sorted(kept) and all(torch.equal(lean[k], kept[k]) for k in lean)


FREEZING = """
    import gc, sys
    from sfprompt_mpi.lean import importing_for_good
    if sys.argv[1] == "gc-off":
        gc.disable()
    paused = []
    with importing_for_good():
        paused.append(gc.isenabled())
        import torch
    first = gc.get_freeze_count()
    with importing_for_good():  # torch is there now: nothing to pause, nothing more to freeze
        paused.append(gc.isenabled())
        import timm
    print("RESULT", *paused, gc.isenabled(), first > 100_000, gc.get_freeze_count() <= first)  # frozen objects may die, none were added
"""


@pytest.mark.parametrize("gc_before", ["gc-on", "gc-off"])
def test_a_processs_first_torch_import_runs_without_the_collector_and_is_frozen_after(gc_before):
    on = gc_before == "gc-on"
    # Execute + Assert: paused during the first import only, then as the process had it; torch's
    # objects frozen once, and a second block (torch imported already) changes nothing
    assert _python(FREEZING, gc_before) == ["False", str(on), str(on), "True", "True"]


PEFT_FROZEN = """
    import gc, sys
    from sfprompt_mpi.run import main
    code = main(sys.argv[1:])
    peft = sys.modules.get("peft")
    # a frozen object is in no generation gc.get_objects() lists
    print("RESULT", code, peft is not None, peft is not None and all(o is not peft.LoraConfig for o in gc.get_objects()))
"""


@pytest.mark.parametrize("algo,imported", [("fedlora", True), ("sfprompt", False)])
def test_an_algorithm_that_carries_peft_imports_it_with_the_ranks_imports_and_freezes_it(tmp_path, algo, imported):
    # Execute: the dry run's path through the rank's imports
    got = _python(PEFT_FROZEN, "--algo", algo, "--dry-run", "--reference", "--run-dir", str(tmp_path / "run"))
    # Assert: peft (and transformers with it) only where the model carries its LoRA, and then frozen
    assert got == ["0", str(imported), str(imported)]
