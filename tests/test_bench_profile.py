"""`leanvit bench --profile-ops`: the operator split of a forward, per runner."""
import torch

import leanvit
from conftest import images, small_vit
from leanvit.bench import format_profile, profile_operators


def test_profile_counts_the_operators_a_forward_runs():
    model = small_vit()
    x = images(4)
    runners = {"dense": leanvit.adapt(model, "none"), "tome": leanvit.adapt(model, "tome", r=4)}
    prof = profile_operators(runners, x, repeats=2, top=100)
    assert set(prof) == {"dense", "tome"}
    dense = prof["dense"]
    # one qkv, proj, fc1, fc2 per block and the head; ToMe adds its matching on top
    linear = sum(o["calls"] for o in dense["operators"] if o["op"] == "linear")
    assert linear >= 4 * len(model.blocks) and dense["calls"] > linear
    assert prof["tome"]["calls"] > dense["calls"]
    # each operator is attributed to the line of leanvit or timm that called it, never the profiler
    wheres = {o["where"].split(":")[0] for o in dense["operators"]}
    assert "bench.py" not in wheres and "?" not in wheres and {"attention.py", "mlp.py"} <= wheres  # timm's blocks
    assert "runtime.py" in {o["where"].split(":")[0] for o in prof["tome"]["operators"]}  # leanvit's block runner
    assert 0 < dense["operator_ms"] and dense["wall_ms"] > 0
    assert len(profile_operators({"dense": runners["dense"]}, x, repeats=1, top=3)["dense"]["operators"]) == 3
    text = format_profile(prof)
    assert "dense:" in text and "operator calls" in text


def test_frames_are_attributed_by_module_name_not_by_path():
    """A virtualenv whose path holds "leanvit" must not make torch's own frames look like leanvit's."""
    from leanvit.bench import calling_line
    source = "def inner():\n    return calling_line()\n"
    torch_like = {"__name__": "torch._fake_frames", "calling_line": calling_line}
    exec(compile(source, "/venvs/leanvit-env/lib/python3.11/site-packages/torch/_fake_frames.py", "exec"), torch_like)
    assert "_fake_frames" not in torch_like["inner"]()
    timm_like = {"__name__": "timm.layers._fake_frames", "calling_line": calling_line}
    exec(compile(source, "/opt/site/elsewhere/_fake_frames.py", "exec"), timm_like)
    assert timm_like["inner"]().startswith("_fake_frames.py:2")
