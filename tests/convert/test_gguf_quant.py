"""GGUF quantized types: convert to-gguf --dtype q4_k_m (...) writes through llama.cpp's own quantizer, and
orionlm reads llama.cpp's files with the weights llama.cpp's C dequantizers give and llama.cpp's logits. Needs
llama-cpp-python (tests/test_extras.py checks the message without it; tests/convert/test_gguf.py the refusal of
other types and reading legacy types without llama.cpp).

llama.cpp computes logits in a subprocess: a build here was once seen to crash while generating from Q8_0 files
(not reproduced with llama-cpp-python 0.3.36 on this machine's AVX-512 EPYC), and a crash must skip that type,
not end the test session."""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import signal
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF needs the `gguf` package (pip install 'orionlm[gguf]')")

from orionlm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from orionlm.cli import main  # noqa: E402
from orionlm.cli.convert import GGUFType  # noqa: E402
from orionlm.config import preset  # noqa: E402
from orionlm.convert.gguf import GGUF_DTYPES, GGUFError, _gguf_tensors, load_gguf, read_gguf, save_gguf  # noqa: E402
from orionlm.convert.gguf_quant import LLAMA_CPP_TYPES, llama_cpp_quantize  # noqa: E402
from orionlm.model import OrionLM  # noqa: E402
from orionlm.tokenizer import Tokenizer  # noqa: E402

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)
WRITTEN = [dtype for dtype in GGUF_DTYPES if dtype in LLAMA_CPP_TYPES and dtype != "q8_0"]  # through llama.cpp
# The type of the bulk of the matrices (blk.N.attn_q) in each file type
MAIN_TYPE = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "q2_k": "Q2_K",
             "q3_k_m": "Q3_K", "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL"}  # fmt: skip
TOKENS = [(7 * i) % 300 + 5 for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe_from_texts(["The cat sat on the mat. " * 20, "import os\nimport sys\n" * 10], 300)


@pytest.fixture(scope="module")
def model() -> OrionLM:
    """A Llama-shaped model whose matrices are whole k-quant blocks (rows of 256 and 512), GQA, norms away from 1."""
    torch.manual_seed(0)
    config = dataclasses.replace(preset("tiny-dense"), vocab_size=320, hidden_size=256, intermediate_size=512,
                                 num_heads=4, num_kv_heads=2, head_dim=64, num_layers=2)  # fmt: skip
    model = OrionLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    return model


@pytest.fixture(scope="module")
def files(model, tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The f16 export, a file of every type to-gguf writes through llama.cpp, and llama.cpp's own Q8_0 and IQ4_NL
    quantization of the f16 file (IQ4_NL: the fallback type older llama.cpp versions give Q2_K/Q3_K files)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    out = tmp_path_factory.mktemp("quantized")
    paths = {"f16": out / "f16.gguf"}
    save_gguf(model, tokenizer, paths["f16"], dtype="f16")
    for dtype in WRITTEN:
        paths[dtype] = save_gguf(model, tokenizer, out / f"{dtype}.gguf", dtype=dtype)
    paths["q8_0"] = out / "q8_0.gguf"
    llama_cpp_quantize(paths["f16"], paths["q8_0"], "q8_0")
    paths["iq4_nl"] = out / "iq4_nl.gguf"
    _quantize_as(paths["f16"], paths["iq4_nl"], "IQ4_NL")
    return paths


def _quantize_as(src: Path, dst: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


# llama.cpp's logits for every position of the tokens in each file, one thread (deterministic), each saved as it
# is computed
_LLAMA_CPP_LOGITS = """
import sys, numpy as np, llama_cpp
tokens = [int(t) for t in sys.argv[1].split(",")]
for path in sys.argv[2:]:
    llm = llama_cpp.Llama(path, n_ctx=128, n_threads=1, logits_all=True, verbose=False, seed=0)
    llm.eval(tokens)
    np.save(path + ".npy", np.asarray(llm.scores[: len(tokens)]))
"""


@pytest.fixture(scope="module")
def llama_cpp_logits(files) -> dict[str, np.ndarray | str]:
    """llama.cpp's logits for each file, computed in a subprocess; where llama.cpp crashes, the signal's name
    (the files after it run in a new subprocess)."""
    results: dict[str, np.ndarray | str] = {}
    pending = list(files)
    while pending:
        args = [sys.executable, "-c", _LLAMA_CPP_LOGITS, ",".join(map(str, TOKENS)), *(str(files[d]) for d in pending)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode <= 0, done.stderr  # a Python error is a failure; a signal, a crash
        while pending and Path(f"{files[pending[0]]}.npy").exists():
            dtype = pending.pop(0)
            results[dtype] = np.load(f"{files[dtype]}.npy")
        if pending:  # the subprocess died on this file
            results[pending.pop(0)] = signal.Signals(-done.returncode).name
    return results


def _logits(model: OrionLM) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


@needs_llama_cpp
@pytest.mark.parametrize("dtype", [*WRITTEN, "q8_0", "iq4_nl"])
def test_logits_match_llama_cpp(dtype, files, model, llama_cpp_logits):
    """orionlm's logits from the dequantized file are llama.cpp's own on that file, up to llama.cpp's 8-bit
    quantization of the activations in its quantized dot products (about 1-2% RMS for every type here; with the
    same dequantized weights in an F32 file the two agree to 3e-4). The quantization error itself is up to 55%
    (Q2_K), so a misread block would show: ours must be closer to llama.cpp's logits than the unquantized model."""
    theirs = llama_cpp_logits[dtype]
    if isinstance(theirs, str):
        pytest.skip(f"llama.cpp crashed ({theirs}) evaluating the {dtype} file on this machine")
    ours = _logits(load_gguf(files[dtype], device="cpu", dtype=torch.float32)[0])
    unquantized = _logits(model)
    scale = _rms(unquantized)
    assert _rms(theirs - ours) / scale < 0.025
    assert _rms(theirs - ours) < 0.8 * _rms(theirs - unquantized)


@needs_llama_cpp
@pytest.mark.parametrize("dtype", [*WRITTEN, "q8_0", "iq4_nl"])
def test_dequantized_tensors_are_llama_cpp_s(dtype, files):
    """Every quantized tensor, as orionlm reads it (gguf.quants.dequantize), equals what llama.cpp's own C
    dequantizer (dequantize_row_<type> in libggml-base) gives for the same bytes, bit for bit."""
    import llama_cpp

    ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    _, reader = read_gguf(files[dtype])
    stored = _gguf_tensors(reader, files[dtype])
    kinds = set()
    for t in reader.tensors:
        if t.tensor_type.name in ("F32", "F16"):
            continue
        kinds.add(t.tensor_type.name)
        row = getattr(ggml, f"dequantize_row_{t.tensor_type.name.lower().replace('_k', '_K')}")
        row.argtypes, row.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
        blocks = np.ascontiguousarray(np.asarray(t.data).view(np.uint8))
        want = np.empty(int(t.n_elements), dtype=np.float32)
        row(blocks.ctypes.data, want.ctypes.data, want.size)
        np.testing.assert_array_equal(stored[t.name].numpy().ravel(), want, err_msg=t.name)
    assert MAIN_TYPE[dtype] in kinds


@needs_llama_cpp
@pytest.mark.parametrize("dtype", WRITTEN)
def test_to_gguf_writes_llama_cpp_types(dtype, model, tokenizer, tmp_path, capsys):
    """The CLI writes the file llama.cpp's quantizer makes of the f16 export (its file type, the named type in the
    matrices, norms in F32), smaller than the f16 file, and leaves nothing else behind; from-gguf reads it back."""
    import llama_cpp

    save_checkpoint(model, tmp_path / "m", tokenizer)
    main(["convert", "to-gguf", str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--dtype", dtype])
    main(["convert", "to-gguf", str(tmp_path / "m"), str(tmp_path / "f16.gguf")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f16.gguf", "m", "m.gguf"]
    metadata, reader = read_gguf(tmp_path / "m.gguf")
    assert metadata["general.file_type"] == getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_CPP_TYPES[dtype]}")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == MAIN_TYPE[dtype] and types["blk.1.ffn_norm.weight"] == "F32"
    assert (tmp_path / "m.gguf").stat().st_size < 0.6 * (tmp_path / "f16.gguf").stat().st_size
    main(["convert", "from-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "back")])
    back = load_checkpoint(tmp_path / "back", device="cpu")[0].state_dict()
    direct = load_gguf(tmp_path / "m.gguf", device="cpu")[0].state_dict()
    assert all(torch.equal(back[name], tensor) for name, tensor in direct.items())
    assert back["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32


@needs_llama_cpp
def test_a_failed_quantization_is_one_line_with_llama_cpp_s_reason(tmp_path):
    with pytest.raises(GGUFError, match=r"^llama\.cpp could not quantize the model to q4_k_m: .*nope\.gguf") as info:
        llama_cpp_quantize(tmp_path / "nope.gguf", tmp_path / "out.gguf", "q4_k_m")
    assert "\n" not in str(info.value) and not (tmp_path / "out.gguf").exists()


def test_the_cli_offers_every_dtype_the_writer_takes():
    assert set(typing.get_args(GGUFType)) == set(GGUF_DTYPES)
