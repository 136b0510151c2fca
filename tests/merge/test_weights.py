"""Weight merges (orionlm merge): each method on small cases worked out by hand, parameter gradients and
filters, mergekit itself tensor for tensor on the same models, and the errors."""

import subprocess
import sys

import pytest
import torch
import yaml

from orionlm.checkpoint import save_checkpoint, stored_dtype
from orionlm.cli import main
from orionlm.config import preset
from orionlm.convert.hf import load_hf
from orionlm.errors import OrionError
from orionlm.loading import load_model
from orionlm.merge.weights import (
    MergeConfig,
    MergeError,
    MergeInput,
    Trim,
    drop,
    layer_position,
    load_merge_config,
    merge_models,
    setting,
    slerp,
    task_vector_merge,
)
from orionlm.model import OrionLM

from .conftest import built, cli_error, dense, tokenizer


def test_slerp_small_cases():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(0.5, v0, v1), torch.tensor([0.5**0.5, 0.5**0.5]))
    torch.testing.assert_close(slerp(1 / 3, v0, v1), torch.tensor([3**0.5 / 2, 0.5]))  # 30 degrees along
    assert torch.equal(slerp(0.0, v0, v1), v0) and torch.allclose(slerp(1.0, v0, v1), v1)
    # lengths interpolate along the arc: |result| = 2 at both ends of a quarter circle of radius 2
    torch.testing.assert_close(slerp(0.5, 2 * v0, 2 * v1).norm(), torch.tensor(2.0))
    parallel = torch.tensor([2.0, 4.0])
    torch.testing.assert_close(slerp(0.25, parallel / 2, parallel), 0.75 * parallel / 2 + 0.25 * parallel)


def test_ties_small_case():
    """TIES by hand: trim to the largest half of each task vector, elect each entry's sign from the sum of
    the weighted deltas, average the weighted deltas that agree with it."""
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-3.0, 1.5, 1.0, -0.1])
    out = task_vector_merge(base, [a, b], [1.0, 1.0], [1.0, 1.0], "ties", True, False, 1.0, torch.Generator())
    torch.testing.assert_close(out, torch.tensor([-3.0, -2.0, 2.0, 0.5]))
    # density 0.5: a keeps 3 and -2, b keeps -3 and 1.5; sums -3, -0.5, 3, 0 -> signs -, -, +, + (0 counts as +)
    out = task_vector_merge(base, [a, b], [1.0, 1.0], [0.5, 0.5], "ties", True, False, 1.0, torch.Generator())
    torch.testing.assert_close(out, torch.tensor([-3.0, -2.0, 3.0, 0.0]))
    # weights scale the deltas and the divisor; lambda scales the result; the base is added back
    out = task_vector_merge(base + 1, [a + 1, b + 1], [2.0, 1.0], [1.0, 1.0], "ties", True, False, 0.5,
                            torch.Generator())  # fmt: skip
    torch.testing.assert_close(out, 1 + 0.5 * torch.tensor([-3.0, -4.0 / 2, (6.0 + 1.0) / 3, 1.0 / 2]))
    delta = torch.tensor([0.1, -5.0, 2.0, -0.3])
    assert torch.equal(Trim(delta.abs(), 2)(delta), torch.tensor([0.0, -5.0, 2.0, -0.0]))


def test_chunked_math_equals_one_chunk(monkeypatch):
    """A merge's math runs CHUNK entries at a time: TIES keeps exactly its k largest entries even when many
    tie at the cut and the ties straddle chunks, and the methods give what one chunk gives (but DARE, whose
    drops are drawn chunk by chunk)."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randint(-3, 4, (6, 7), generator=generator).float()  # small integers: many equal magnitudes
    others = [base + torch.randint(-2, 3, (6, 7), generator=generator).float() for _ in range(2)]
    delta = others[0] - base
    kept = Trim(delta.abs().flatten(), int(0.3 * 42))(delta)
    assert int((kept != 0).sum()) == int(0.3 * 42)
    results = {}
    for chunk in (1 << 22, 5):
        monkeypatch.setattr("orionlm.merge.weights.CHUNK", chunk)
        results[chunk] = [
            task_vector_merge(
                base,
                others,
                [0.7, 0.4],
                [0.3, 0.6],
                method,
                True,
                True,
                1.0,
                torch.Generator().manual_seed(1),
                torch.bfloat16,
            )  # fmt: skip
            for method in ("ties", "task_arithmetic")
        ] + [slerp(0.3, base, others[0])]
    for one, chunked in zip(results[1 << 22], results[5], strict=True):
        torch.testing.assert_close(chunked, one, atol=0, rtol=1e-6)
    assert results[5][0].dtype == torch.bfloat16


def test_task_arithmetic_and_dare():
    base, a, b = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, -2.0, 1.0])
    plain = task_vector_merge(base, [a, b], [0.5, 1.0], [1.0, 1.0], "task_arithmetic", False, False, 2.0,
                              torch.Generator())  # fmt: skip
    torch.testing.assert_close(plain, 2 * (0.5 * a + b))
    dense_dare = task_vector_merge(base, [a, b], [0.5, 1.0], [1.0, 1.0], "dare_linear", False, True, 2.0,
                                   torch.Generator())  # fmt: skip
    assert torch.equal(dense_dare, plain)  # density 1 drops nothing
    delta = torch.randn(100_000)
    dropped = drop(delta, 0.3, True, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.01
    torch.testing.assert_close(dropped[kept], delta[kept] / 0.3)
    assert torch.equal(drop(delta, 0.3, False, torch.Generator().manual_seed(0))[kept], delta[kept])


def test_settings_gradients_and_filters():
    assert setting(0.3, "x", 0.7, "t") == 0.3
    assert setting([0.0, 1.0, 0.0], "x", 0.25, "t") == pytest.approx(0.5)
    assert setting([0.0, 1.0, 0.0], "x", 1.0, "t") == 0.0
    entries = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
    assert setting(entries, "model.layers.1.self_attn.q_proj.weight", 0.5, "t") == pytest.approx(0.5)
    assert setting(entries, "model.layers.1.mlp.up_proj.weight", 0.5, "t") == 0.7
    assert setting(entries, "model.norm.weight", 0.0, "t") == 0.5
    assert setting(entries[:2], "model.norm.weight", 0.0, "t") is None
    with pytest.raises(MergeError, match="not a number, a list of numbers or a list of"):
        setting("high", "x", 0.0, "parameters.t")
    assert [layer_position(f"model.layers.{i}.mlp.up_proj.weight", 3) for i in range(3)] == [0.0, 0.5, 1.0]
    assert layer_position("lm_head.weight", 3) == 0.0


def test_linear_and_slerp_models(sources):
    models = {n: load_model(sources[n], device="cpu")[0].state_dict() for n in ("base", "code", "numbers")}
    linear = MergeConfig("linear", [MergeInput(str(sources["code"]), {"weight": 3.0}),
                                    MergeInput(str(sources["numbers"]), {"weight": 1.0})])  # fmt: skip
    merged, tok = built(merge_models(linear))
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, 0.75 * models["code"][name] + 0.25 * models["numbers"][name])
    assert tok is not None and tok.bos_id is not None  # the first model's tokenizer
    t = [{"filter": "self_attn", "value": 0.0}, {"filter": "mlp", "value": 1.0}, {"value": [0.0, 1.0]}]
    config = MergeConfig("slerp", [MergeInput(str(sources["base"])), MergeInput(str(sources["code"]))],
                         base_model=str(sources["base"]), parameters={"t": t})  # fmt: skip
    merged, _ = built(merge_models(config))
    state = merged.state_dict()
    for name, tensor in state.items():
        if "self_attn" in name:
            assert torch.equal(tensor, models["base"][name])
        elif ".mlp." in name:
            torch.testing.assert_close(tensor, models["code"][name])
    layer1 = "model.layers.1.input_layernorm.weight"  # the gradient's end: t = 1
    torch.testing.assert_close(state[layer1], models["code"][layer1])
    torch.testing.assert_close(state["lm_head.weight"], models["base"]["lm_head.weight"])  # t = 0 outside layers
    assert merged.config.extra["merge"]["merge_method"] == "slerp"


@pytest.mark.parametrize(
    "method, parameters, model_parameters",
    [
        ("linear", {"normalize": True}, [{"weight": [0.2, 0.9]}, {"weight": 0.5}, {"weight": 0.3}]),
        (
            "slerp",
            {"t": [{"filter": "self_attn", "value": [0.1, 0.8]}, {"filter": "mlp", "value": 0.6}, {"value": 0.3}]},
            None,
        ),  # fmt: skip
        ("task_arithmetic", {"lambda": 0.8}, [{}, {"weight": 0.7}, {"weight": -0.4}]),
        ("ties", {"normalize": True}, [{}, {"weight": 0.6, "density": 0.5}, {"weight": [0.4, 1.0], "density": 0.3}]),
    ],
)
def test_matches_mergekit(sources, tmp_path, method, parameters, model_parameters):
    """mergekit-yaml on the Hugging Face copies of the same models: every tensor within float32 rounding."""
    pytest.importorskip("mergekit")
    hf = {n: str(sources[n].with_name(f"{n}-hf")) for n in ("base", "code", "numbers")}
    names = ["base", "code"] if method == "slerp" else ["base", "code", "numbers"]
    models = [{"model": hf[n], **({"parameters": p} if p else {})}
              for n, p in zip(names, model_parameters or [None] * len(names), strict=True)]  # fmt: skip
    config = {"merge_method": method, "models": models, "parameters": parameters, "dtype": "float32"}
    if method != "linear":
        config["base_model"] = hf["base"]
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(tmp_path / "merge.yaml"),
                          str(tmp_path / "mk")], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    theirs, _ = load_hf(tmp_path / "mk", device="cpu", dtype=torch.float32)
    ours, _ = built(merge_models(load_merge_config(tmp_path / "merge.yaml")))
    their_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, their_state[name], atol=2e-6, rtol=1e-5, msg=name)


def test_errors(sources, tmp_path):
    base, code, numbers = (str(sources[n]) for n in ("base", "code", "numbers"))
    with pytest.raises(MergeError, match="merge_method 'tie' is not one of linear, slerp"):
        MergeConfig("tie", [MergeInput(code), MergeInput(numbers)], base_model=base)
    with pytest.raises(MergeError, match="slerp interpolates two models"):
        MergeConfig("slerp", [MergeInput(base), MergeInput(code), MergeInput(numbers)], base_model=base)
    with pytest.raises(MergeError, match="ties needs base_model"):
        MergeConfig("ties", [MergeInput(code), MergeInput(numbers)])
    with pytest.raises(MergeError, match=r"models.0.parameters: density not used by linear \(it reads weight"):
        MergeConfig("linear", [MergeInput(code, {"density": 0.5}), MergeInput(numbers)])
    with pytest.raises(MergeError, match=f"ties needs parameter 'weight' for {code}"):
        merge_models(MergeConfig("ties", [MergeInput(code)], base_model=base))
    for density in (5, 0, -0.5):  # a fraction: 5 must not pass as "keep everything"
        config = MergeConfig("ties", [MergeInput(code, {"weight": 1.0, "density": density})], base_model=base)
        with pytest.raises(MergeError, match=rf"parameters.density is {density}: a density is the fraction"):
            merge_models(config)
    wide = save_checkpoint(dense(5, intermediate_size=256), tmp_path / "wide", tokenizer())
    with pytest.raises(MergeError, match="does not have .* architecture: intermediate_size 256"):
        merge_models(MergeConfig("linear", [MergeInput(code), MergeInput(str(wide))]))
    moe = save_checkpoint(OrionLM(preset("tiny-moe")), tmp_path / "moe", tokenizer())
    with pytest.raises(MergeError, match="num_experts 4"):
        merge_models(MergeConfig("linear", [MergeInput(code), MergeInput(str(moe))]))


def test_cli(sources, tmp_path, capsys):
    config = {
        "merge_method": "ties",
        "base_model": str(sources["base"]),
        "models": [
            {"model": str(sources[n]), "parameters": {"weight": 0.5, "density": 0.5}} for n in ("code", "numbers")
        ],
        "dtype": "bfloat16",
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out")])
    assert "ties merge of 3 models" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "out" / "merge.yaml").read_text()) == config
    model, tokenizer_, _ = load_model(tmp_path / "out", device="cpu")
    assert tokenizer_ is not None and model.config.num_layers == 2
    assert stored_dtype(tmp_path / "out") == torch.bfloat16
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "merge_methd": "ties"}))
    assert cli_error("merge", str(tmp_path / "bad.yaml"), str(tmp_path / "o")) == [
        f"orionlm: error: {tmp_path / 'bad.yaml'}: unknown key in config: 'merge_methd' (did you mean 'merge_method'?)"
    ]
    with pytest.raises(OrionError, match="merge config .*missing.yaml does not exist"):
        load_merge_config(tmp_path / "missing.yaml")
