"""GGUF import: the real llama2.c stories260K GGUF against independent references (a numpy port of
llama2.c's run.c forward and encode(), and llama.cpp's greedy output), tiny transformers models
written as GGUF, a byte-level vocabulary, and the error messages."""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

gguf = pytest.importorskip("gguf", reason="GGUF import needs the `gguf` package (pip install 'orionlm[gguf]')")

from orionlm.checkpoint import LazyTensors, TensorSpec  # noqa: E402
from orionlm.config import preset  # noqa: E402
from orionlm.convert import gguf as orion_gguf  # noqa: E402
from orionlm.convert.gguf import GGUFError, load_gguf, save_gguf  # noqa: E402
from orionlm.convert.gguf_vocab import SPIECE_SPACE  # noqa: E402
from orionlm.generation import generate_ids  # noqa: E402
from orionlm.model import OrionLM  # noqa: E402
from orionlm.tokenizer import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STORIES = REPO / ".." / "shared" / "data" / "models" / "stories260K"

# llama.cpp's output on the decompressed stories260K.gguf, recorded with llama-cpp-python 0.3.36 (the PyPI
# sdist built from source on CPU with `pip install llama-cpp-python`, using the llama.cpp it bundles):
#   from llama_cpp import Llama
#   llm = Llama(model_path="stories260K.gguf", n_ctx=128, seed=0, verbose=False)
#   llm.reset(); llm.eval([1]); ids = []
#   for _ in range(60): t = llm.sample(top_k=1, temp=0.0); ids.append(t); llm.eval([t])
# (`llm.generate([1], top_k=1, temp=0.0)` gives the same 60 ids.) Greedy continuation of BOS (id 1):
LLAMA_CPP_GREEDY_FROM_BOS = [
    403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337,
    410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352,
    266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270, 333, 415,
]  # fmt: skip
# ... and its tokenizer: llm.tokenize(text.encode(), add_bos=True, special=False)
LLAMA_CPP_TOKENIZE = {
    " leading space, double  spaces and a trailing one ": [
        1, 410, 278, 411, 380, 299, 262, 427, 412, 331, 432, 279, 277, 430, 305, 410, 262, 427, 412, 331, 419, 269,
        261, 259, 420, 412, 290, 299, 353, 411, 410,
    ],
    "Unicode the tokenizer lacks: 日本語, café, emoji 🙂, Ω≈ç": [
        1, 410, 471, 416, 417, 429, 414, 418, 411, 265, 267, 433, 302, 417, 451, 285, 278, 412, 340, 419, 467, 410,
        233, 154, 168, 233, 159, 175, 235, 173, 161, 432, 280, 412, 431, 485, 432, 344, 423, 414, 449, 417, 410, 243,
        162, 156, 133, 432, 410, 209, 172, 229, 140, 139, 198, 170,
    ],
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# An independent reference: llama2.c (karpathy/llama2.c run.c) ported to numpy, reading its own
# checkpoint and tokenizer files rather than the GGUF.
# ---------------------------------------------------------------------------------------------


def read_llama2c_checkpoint(path: Path) -> dict[str, np.ndarray | int]:
    """run.c's checkpoint: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
    seq_len; a negative vocab_size means an unshared classifier), then float32 weights in order."""
    data = path.read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", data)
    shared, vocab = vocab > 0, abs(vocab)
    head_size = dim // heads
    kv_dim = kv_heads * head_size
    floats = np.frombuffer(data, dtype=np.float32, offset=28)
    w: dict[str, np.ndarray | int] = dict(dim=dim, heads=heads, kv_heads=kv_heads, vocab=vocab)
    offset = 0

    def take(name: str, *shape: int) -> None:
        nonlocal offset
        size = int(np.prod(shape))
        w[name] = floats[offset : offset + size].reshape(shape).astype(np.float64)
        offset += size

    take("token_embedding", vocab, dim)
    take("rms_att", layers, dim)
    take("wq", layers, dim, dim)  # (out, in) per layer: run.c's matmul computes W @ x
    take("wk", layers, kv_dim, dim)
    take("wv", layers, kv_dim, dim)
    take("wo", layers, dim, dim)
    take("rms_ffn", layers, dim)
    take("w1", layers, hidden, dim)
    take("w2", layers, dim, hidden)
    take("w3", layers, hidden, dim)
    take("rms_final", dim)
    offset += seq_len * head_size  # freq_cis_real and freq_cis_imag: run.c recomputes them
    if shared:
        w["wcls"] = w["token_embedding"]
    else:
        take("wcls", vocab, dim)
    assert offset == floats.size, "llama2.c checkpoint size does not match its header"
    return w


class Llama2c:
    """run.c's forward(token, pos), one token at a time with a key/value cache, in float64: RMSNorm,
    RoPE on interleaved pairs (2i, 2i+1) with frequency 10000^(-(i mod head_size)/head_size), GQA
    (query head h reads kv head h // (heads / kv_heads)), SwiGLU."""

    def __init__(self, w: dict) -> None:
        self.w = w
        self.head_size = w["dim"] // w["heads"]
        layers = w["rms_att"].shape[0]
        self.keys: list[list[np.ndarray]] = [[] for _ in range(layers)]
        self.values: list[list[np.ndarray]] = [[] for _ in range(layers)]

    def rope(self, v: np.ndarray, pos: int) -> np.ndarray:
        i = np.arange(0, v.size, 2)
        angle = pos / 10000.0 ** ((i % self.head_size) / self.head_size)
        a, b = v[0::2], v[1::2]
        out = np.empty_like(v)
        out[0::2] = a * np.cos(angle) - b * np.sin(angle)
        out[1::2] = a * np.sin(angle) + b * np.cos(angle)
        return out

    def forward(self, token: int) -> np.ndarray:
        """Logits (vocab,) of the next token after `token`, at the next position."""
        w, hs = self.w, self.head_size
        heads, kv_heads = w["heads"], w["kv_heads"]
        pos = len(self.keys[0])

        def rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
            return x / np.sqrt((x * x).mean() + 1e-5) * weight

        x = w["token_embedding"][token]  # (dim,)
        for layer in range(len(self.keys)):
            xb = rmsnorm(x, w["rms_att"][layer])
            q = self.rope(w["wq"][layer] @ xb, pos).reshape(heads, hs)
            self.keys[layer].append(self.rope(w["wk"][layer] @ xb, pos).reshape(kv_heads, hs))
            self.values[layer].append((w["wv"][layer] @ xb).reshape(kv_heads, hs))
            group = heads // kv_heads
            k = np.repeat(np.stack(self.keys[layer]), group, axis=1)  # (pos+1, heads, hs)
            v = np.repeat(np.stack(self.values[layer]), group, axis=1)
            scores = np.einsum("hd,thd->ht", q, k) / np.sqrt(hs)
            att = np.exp(scores - scores.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            x = x + w["wo"][layer] @ np.einsum("ht,thd->hd", att, v).reshape(-1)
            xb = rmsnorm(x, w["rms_ffn"][layer])
            h1, h3 = w["w1"][layer] @ xb, w["w3"][layer] @ xb
            x = x + w["w2"][layer] @ (h1 / (1.0 + np.exp(-h1)) * h3)
        return w["wcls"] @ rmsnorm(x, w["rms_final"])


def llama2c_logits(w: dict, tokens: list[int]) -> np.ndarray:
    """(T, vocab) logits of a sequence, fed to run.c's forward token by token."""
    runner = Llama2c(w)
    return np.stack([runner.forward(t) for t in tokens])


def llama2c_greedy(w: dict, steps: int) -> list[int]:
    """run.c's generate() with temperature 0 from BOS: argmax each step, stop when BOS comes again."""
    runner, token, out = Llama2c(w), 1, []
    for _ in range(steps):
        token = int(runner.forward(token).argmax())
        if token == 1:
            break
        out.append(token)
    return out


def read_llama2c_vocab(path: Path) -> tuple[list[str], list[float]]:
    """run.c's tokenizer file: uint32 max_token_length, then per token float32 score, uint32 length, bytes."""
    data = path.read_bytes()
    offset, vocab, scores = 4, [], []
    while offset < len(data):
        score, length = struct.unpack_from("<fI", data, offset)
        offset += 8
        vocab.append(data[offset : offset + length].decode("utf-8"))
        scores.append(score)
        offset += length
    return vocab, scores


def llama2c_encode(text: str, vocab: list[str], scores: list[float]) -> list[int]:
    """run.c's encode(text, bos=1, eos=0): BOS, a dummy-prefix space, one token per UTF-8 character
    (its bytes + 3 when it is not in the vocabulary), then repeatedly merge the adjacent pair whose
    concatenation is in the vocabulary with the best score (the leftmost on ties)."""
    lookup = {piece: i for i, piece in enumerate(vocab)}
    tokens = [1]
    if text:
        tokens.append(lookup[" "])
    for ch in text:
        if ch in lookup:
            tokens.append(lookup[ch])
        else:
            tokens.extend(b + 3 for b in ch.encode("utf-8"))
    while True:
        best, best_at = -1e10, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(vocab[tokens[i]] + vocab[tokens[i + 1]])
            if merged is not None and scores[merged] > best:
                best, best_at, best_id = scores[merged], i, merged
        if best_at < 0:
            return tokens
        tokens[best_at : best_at + 2] = [best_id]


# ---------------------------------------------------------------------------------------------
# stories260K: the real model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not STORIES.is_dir():
        pytest.skip(f"the shared test data is absent ({STORIES.resolve()}); it only exists beside the project checkout")
    out = tmp_path_factory.mktemp("stories260K")
    paths = {}
    for name in ("stories260K.gguf", "stories260K.bin"):
        paths[name] = out / name
        paths[name].write_bytes(gzip.decompress((STORIES / f"{name}.gz").read_bytes()))
    paths["tok512.bin"] = STORIES / "tok512.bin"
    return paths


@pytest.fixture(scope="module")
def loaded(stories: dict[str, Path]):
    return load_gguf(stories["stories260K.gguf"], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(stories: dict[str, Path]) -> dict:
    return read_llama2c_checkpoint(stories["stories260K.bin"])


@pytest.fixture(scope="module")
def llama2c_vocab(stories: dict[str, Path]) -> tuple[list[str], list[float]]:
    return read_llama2c_vocab(stories["tok512.bin"])


def test_stories_config(loaded) -> None:
    c = loaded[0].config
    got = (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size)
    assert got == (512, 64, 5, 8, 4, 172)
    assert (c.norm_eps, c.rope_theta, c.head_dim, c.tie_embeddings, c.hf_model_type) == (1e-5, 1e4, 8, False, "llama")


STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def test_logits_match_llama2c(loaded, reference, llama2c_vocab, monkeypatch, stories) -> None:
    tokens = llama2c_encode(STORY, *llama2c_vocab)
    assert len(tokens) > 20
    want = llama2c_logits(reference, tokens)
    with torch.no_grad():
        got = loaded[0](torch.tensor([tokens])).logits[0].double().numpy()
    diff = np.abs(got - want).max()
    assert diff <= 1e-4, f"max abs logits diff {diff:.3g}"
    # Without undoing llama.cpp's Q/K permutation the logits are far off: the check above has teeth.
    monkeypatch.setattr(orion_gguf, "_unpermute", lambda w, heads: w)
    unpermuted = load_gguf(stories["stories260K.gguf"], device="cpu", dtype=torch.float32)[0]
    with torch.no_grad():
        wrong = unpermuted(torch.tensor([tokens])).logits[0].double().numpy()
    assert np.abs(wrong - want).max() > 0.1


TEXTS = [STORY, "", "a", 'Tom said: "Wow!" 123\nNew line\ttab', *LLAMA_CPP_TOKENIZE]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_llama2c_encode(loaded, llama2c_vocab, text: str) -> None:
    tokenizer = loaded[1]
    ids = tokenizer.encode(text)
    assert ids == llama2c_encode(text, *llama2c_vocab)
    assert ids == LLAMA_CPP_TOKENIZE.get(text, ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_specials(loaded) -> None:
    tokenizer = loaded[1]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.token_to_id("<unk>")) == (1, 2, 0)
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>" and tokenizer.unk_token == "<unk>"
    assert tokenizer.add_bos_token and tokenizer.chat_template is None and tokenizer.vocab_size == 512
    assert tokenizer.encode("hi", add_special_tokens=False)[0] != 1
    assert tokenizer.decode([1, *tokenizer.encode("hi", add_special_tokens=False), 2]) == "hi"


def test_greedy_generation_matches_llama2c_and_llama_cpp(loaded, reference) -> None:
    steps = len(LLAMA_CPP_GREEDY_FROM_BOS)
    want = llama2c_greedy(reference, steps)
    assert want == LLAMA_CPP_GREEDY_FROM_BOS
    got = generate_ids(loaded[0], [[1]], max_new_tokens=steps, do_sample=False)[0]
    assert got == want
    assert loaded[1].decode(got).startswith("Once upon a time, there was a little girl named Lily. She loved to play")


def _llama_cpp_greedy(llama_cpp, path: Path, steps: int) -> list[int]:
    llm = llama_cpp.Llama(str(path), n_ctx=128, seed=0, verbose=False)
    ids = []
    for token in llm.generate([1], top_k=1, temp=0.0, reset=True):
        ids.append(token)
        if len(ids) == steps:
            return ids
    return ids


def test_stories_exported_back_to_gguf(loaded, stories, tmp_path) -> None:
    """orionlm's import of stories260K, exported again (SentencePiece vocabulary with scores derived from the
    merge ranks): the same model and tokenizer in orionlm, and llama.cpp generates the same text from both files."""
    model, tokenizer = loaded
    save_gguf(model, tokenizer, tmp_path / "back.gguf", dtype="f32")
    back, back_tokenizer = load_gguf(tmp_path / "back.gguf", device="cpu", dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    for text in TEXTS:
        assert back_tokenizer.encode(text) == tokenizer.encode(text)
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    steps = len(LLAMA_CPP_GREEDY_FROM_BOS)
    assert _llama_cpp_greedy(llama_cpp, tmp_path / "back.gguf", steps) == LLAMA_CPP_GREEDY_FROM_BOS
    assert _llama_cpp_greedy(llama_cpp, stories["stories260K.gguf"], steps) == LLAMA_CPP_GREEDY_FROM_BOS
    llm = llama_cpp.Llama(str(tmp_path / "back.gguf"), n_ctx=128, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer.encode(text), text


@pytest.mark.parametrize("form", ["metaspace", "no-space-prefix"])
def test_other_sentencepiece_forms_export(loaded, tmp_path, form: str) -> None:
    """HF's newer SentencePiece form (a Metaspace pre-tokenizer) and one without the leading space are
    written with the matching add_space_prefix: llama.cpp tokenizes like the tokenizer."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model, tokenizer = loaded
    backend = HFTokenizer.from_str(tokenizer.backend.to_str())
    if form == "metaspace":
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    else:
        backend.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    variant = Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True)
    save_gguf(model, variant, tmp_path / "m.gguf", dtype="f32")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=128, verbose=False)
    for text in TEXTS[:4]:
        ids = variant.encode(text)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
    assert (variant.encode("a")[1] == tokenizer.encode("a")[1]) == (form == "metaspace")


# ---------------------------------------------------------------------------------------------
# Tiny transformers models written as GGUF the way llama.cpp's convert_hf_to_gguf.py writes them
# ---------------------------------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half Q/K rows -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


SPM_PIECES = ["\u2581", "a", "b", "c", "\u2581a", "ab", "\u2581ab", "bc"]


def write_llama_gguf(
    path: Path, hf_model, ggml_type: str = "F32", tied: bool = False, add_space_prefix: bool | None = None
) -> None:
    """A GGUF of a transformers Llama/Mixtral model with a tiny SentencePiece vocabulary."""
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    experts = getattr(cfg, "num_local_experts", 0)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    tokens += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [5] * (cfg.vocab_size - 259 - len(SPM_PIECES))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(cfg.vocab_size - 259)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    block = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.experts.down_proj": "ffn_down_exps.weight",
    }
    for name, tensor in hf_model.state_dict().items():
        array = tensor.float().numpy()
        if name == "lm_head.weight" and tied:
            continue
        if name in names:
            writer_items = [(names[name], array)]
        else:
            layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
            if rest == "self_attn.q_proj.weight":
                array = llama_cpp_permute(array, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                array = llama_cpp_permute(array, cfg.num_key_value_heads)
            if rest == "mlp.experts.gate_up_proj":  # (E, 2I, C) = [gate; up]
                gate, up = np.split(array, 2, axis=1)
                writer_items = [(f"blk.{layer}.ffn_gate_exps.weight", gate), (f"blk.{layer}.ffn_up_exps.weight", up)]
            else:
                writer_items = [(f"blk.{layer}.{block[rest]}", array)]
        for gguf_name, item in writer_items:
            item = np.ascontiguousarray(item)
            if ggml_type == "F16" and item.ndim > 1:
                writer.add_tensor(gguf_name, item.astype(np.float16))
            elif ggml_type == "BF16" and item.ndim > 1:
                raw = gguf.quants.quantize(item, gguf.GGMLQuantizationType.BF16)
                writer.add_tensor(gguf_name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(gguf_name, item)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def round_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round the matrices as the GGUF stores them (norm vectors stay F32, as llama.cpp keeps them)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.to(dtype).float())


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.parametrize(("ggml_type", "tied"), [("F32", False), ("F16", True), ("BF16", False)])
def test_tiny_llama_matches_transformers(tmp_path: Path, transformers, ggml_type: str, tied: bool) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        rope_theta=5000.0,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).eval()
    round_weights(hf, {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[ggml_type])
    write_llama_gguf(tmp_path / "tiny.gguf", hf, ggml_type, tied)
    model, tokenizer = load_gguf(tmp_path / "tiny.gguf", device="cpu", dtype=torch.float32)
    assert model.config.tie_embeddings == tied and model.config.rope_theta == 5000.0
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    # The tiny vocabulary: "▁ab" (rank 6) beats "bc" (rank 7), bytes cover what it lacks.
    assert [tokenizer.backend.id_to_token(i) for i in tokenizer.encode("abc")] == ["<s>", "\u2581ab", "c"]
    assert tokenizer.encode("é", add_special_tokens=False) == [259, 0xC3 + 3, 0xA9 + 3]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"


def test_no_space_prefix(tmp_path: Path, transformers) -> None:
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64,
    )  # fmt: skip
    write_llama_gguf(tmp_path / "t.gguf", transformers.LlamaForCausalLM(config), add_space_prefix=False)
    _, tokenizer = load_gguf(tmp_path / "t.gguf", device="cpu")
    ids = tokenizer.encode("ab c")
    assert [tokenizer.backend.id_to_token(i) for i in ids] == ["<s>", "ab", "\u2581", "c"]
    assert tokenizer.decode(ids) == "ab c"


def test_tiny_mixtral_matches_transformers(tmp_path: Path, transformers) -> None:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    hf = transformers.MixtralForCausalLM(config).eval()
    write_llama_gguf(tmp_path / "moe.gguf", hf)
    model, _ = load_gguf(tmp_path / "moe.gguf", device="cpu", dtype=torch.float32)
    assert (model.config.num_experts, model.config.experts_per_token, model.config.hf_model_type) == (4, 2, "mixtral")
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_tensors_are_read_one_at_a_time_on_demand(tmp_path: Path, transformers, monkeypatch) -> None:
    """The config comes from the metadata and the tensors' specs: opening the file reads no tensor, and reading
    one orionlm tensor reads only the GGUF tensors it is made of, in the dtype its spec announces."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    write_llama_gguf(tmp_path / "moe.gguf", transformers.MixtralForCausalLM(config).eval(), "F16")
    model, _ = load_gguf(tmp_path / "moe.gguf", device="cpu", dtype=torch.float16)
    read, real = [], orion_gguf._read_tensor
    monkeypatch.setattr(
        orion_gguf, "_read_tensor", lambda path, name, *rest: read.append(name) or real(path, name, *rest)
    )
    config, tensors, _ = orion_gguf.read_gguf_model(tmp_path / "moe.gguf")
    assert isinstance(tensors, LazyTensors) and read == []
    assert (config.num_experts, config.vocab_size, config.tie_embeddings) == (4, 300, False)
    specs = tensors.specs
    assert specs["model.layers.1.mlp.experts.gate_up_proj"] == TensorSpec((4, 96, 64), torch.float16)
    assert specs["model.layers.1.self_attn.q_proj.weight"] == TensorSpec((64, 64), torch.float16)
    assert specs["model.layers.1.input_layernorm.weight"] == TensorSpec((64,), torch.float32)  # F32 in the file
    expected = model.state_dict()
    for name, parts in [
        ("model.layers.1.self_attn.q_proj.weight", ["blk.1.attn_q.weight"]),
        ("model.layers.1.mlp.experts.gate_up_proj", ["blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"]),
        ("model.layers.0.input_layernorm.weight", ["blk.0.attn_norm.weight"]),
    ]:
        read.clear()
        tensor = tensors[name]
        assert read == parts
        assert tensor.dtype == specs[name].dtype and tuple(tensor.shape) == specs[name].shape
        assert torch.equal(tensor.to(torch.float16), expected[name]), name


def test_q8_0_tensors_are_read_as_float32(tmp_path: Path) -> None:
    model = OrionLM(preset("tiny-dense", vocab_size=320)).eval()
    original = Tokenizer.train_bpe_from_texts([STORY] * 4, 300)
    save_gguf(model, original, tmp_path / "q.gguf", dtype="q8_0")
    _, tensors, tokenizer = orion_gguf.read_gguf_model(tmp_path / "q.gguf")
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert tensors.specs["model.layers.0.self_attn.q_proj.weight"].dtype == q.dtype == torch.float32
    want = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert 0 < (q - want).abs().max() <= want.abs().max() / 127  # Q8_0: one scale per 32, 8-bit codes
    assert tokenizer.encode(STORY) == original.encode(STORY)


def test_byte_level_vocabulary_without_merges(tmp_path: Path) -> None:
    """Other writers' files of a single-byte 'gpt2' vocabulary have no merges (GGUF leaves out the empty list):
    orionlm reads them as the byte-level tokenizer they came from (its own export refuses them: llama.cpp cannot)."""
    writer = gguf.GGUFWriter(str(tmp_path / "bytes.gguf"), "llama")
    _add_tiny_llama_tensors(writer, vocab_size=_add_byte_level_vocabulary(writer))
    _finish(writer)
    _, tokenizer = load_gguf(tmp_path / "bytes.gguf", device="cpu")
    assert tokenizer.encode(STORY) == Tokenizer.byte_level().encode(STORY)


def _add_byte_level_vocabulary(writer) -> int:
    """orionlm's byte-level vocabulary, without merges, and the tiny llama's metadata; the vocabulary size."""
    byte_level = Tokenizer.byte_level()
    tokens = sorted(byte_level.backend.get_vocab(), key=byte_level.backend.get_vocab().__getitem__)
    _add_tiny_llama_metadata(writer, vocab_size=len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_eos_token_id(byte_level.eos_id)
    return len(tokens)


def test_byte_level_vocabulary(tmp_path: Path) -> None:
    """A `gpt2` GGUF vocabulary rebuilt from tokens + merges encodes exactly like the tokenizer it came from."""
    original = HFTokenizer(models.BPE())
    original.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    original.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [STORY, "The quick brown fox jumps over the lazy dog. " * 3, "Lily and Tom played in the sun."] * 20
    original.train_from_iterator(corpus, trainer=trainer)
    spec = original.to_str()
    vocab = sorted(original.get_vocab().items(), key=lambda kv: kv[1])
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(spec)["model"]["merges"]]

    writer = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "llama")
    _add_tiny_llama_metadata(writer, vocab_size=len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(original.token_to_id("<|endoftext|>"))
    _add_tiny_llama_tensors(writer, vocab_size=len(vocab))
    _finish(writer)

    _, tokenizer = load_gguf(tmp_path / "bpe.gguf", device="cpu")
    for text in [STORY, "  odd   spacing\n\nand émojis 🙂<|endoftext|>", "lazy dogs jump"]:
        ids = tokenizer.encode(text)
        assert ids == original.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.bos_token is None and not tokenizer.add_bos_token


# ---------------------------------------------------------------------------------------------
# Errors: one line, saying what to do
# ---------------------------------------------------------------------------------------------

TINY = dict(hidden=32, heads=4, ffn=48)


def _add_tiny_llama_metadata(writer, vocab_size: int, layers: int = 1) -> None:
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_layer_norm_rms_eps(1e-5)


def _add_tiny_llama_tensors(writer, vocab_size: int, q_type: str | None = None) -> dict[str, np.ndarray]:
    """A complete one-layer llama with random F32 weights (attn_q optionally quantized as q_type by the gguf
    package, or as IQ2_XXS blocks of zeros, which orionlm does not read); the float weights by name."""
    rng = np.random.default_rng(0)
    h, f = TINY["hidden"], TINY["ffn"]
    shapes = {
        "token_embd.weight": (vocab_size, h),
        "output_norm.weight": (h,),
        "blk.0.attn_norm.weight": (h,),
        "blk.0.attn_q.weight": (h, h),
        "blk.0.attn_k.weight": (h, h),
        "blk.0.attn_v.weight": (h, h),
        "blk.0.attn_output.weight": (h, h),
        "blk.0.ffn_norm.weight": (h,),
        "blk.0.ffn_gate.weight": (f, h),
        "blk.0.ffn_up.weight": (f, h),
        "blk.0.ffn_down.weight": (h, f),
    }
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    for name, weight in weights.items():
        if q_type == "IQ2_XXS" and name == "blk.0.attn_q.weight":
            # One IQ2_XXS block (256 weights in 66 bytes) per row; the type check comes before any shape check.
            writer.add_tensor(name, np.zeros((h, 66), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
        elif q_type and name == "blk.0.attn_q.weight":
            kind = gguf.GGMLQuantizationType[q_type]
            writer.add_tensor(name, gguf.quants.quantize(weight, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, weight)
    return weights


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _assert_one_line_error(path: Path, pattern: str) -> None:
    with pytest.raises(GGUFError, match=pattern) as info:
        load_gguf(path, device="cpu")
    assert "\n" not in str(info.value)


def test_other_quantized_types_are_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    _add_tiny_llama_metadata(writer, vocab_size=64)
    _add_tiny_llama_tensors(writer, vocab_size=64, q_type="IQ2_XXS")
    _finish(writer)
    _assert_one_line_error(
        tmp_path / "q.gguf",
        r"tensors of type IQ2_XXS are not supported \(tensor 'blk.0.attn_q.weight'\); orionlm reads F32, F16, BF16, "
        r"Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL$",
    )


@pytest.mark.parametrize("q_type, step", [("Q4_0", 1 / 7), ("Q4_1", 1 / 15), ("Q5_0", 1 / 15), ("Q5_1", 1 / 31)])
def test_legacy_quantized_tensors_are_dequantized(tmp_path: Path, q_type: str, step: float) -> None:
    """Without llama.cpp: a Q/K matrix quantized by the gguf package is read dequantized, un-permuted to HF's
    rotate-half rows, within a quantization step (a share of its block's range) of the float weights."""
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    weights = _add_tiny_llama_tensors(writer, vocab_size=_add_byte_level_vocabulary(writer), q_type=q_type)
    _finish(writer)
    _, tensors, _ = orion_gguf.read_gguf_model(tmp_path / "q.gguf")
    got = orion_gguf._permute(tensors["model.layers.0.self_attn.q_proj.weight"], TINY["heads"]).numpy()
    want = weights["blk.0.attn_q.weight"]
    block_range = np.ptp(want.reshape(-1, 32), axis=1).repeat(32).reshape(want.shape)
    error = np.abs(got - want)
    assert (error <= block_range * step + 1e-3).all() and error.max() > 0
    assert tensors.specs["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    _finish(writer)
    _assert_one_line_error(tmp_path / "gpt2.gguf", r"architecture 'gpt2' is not supported; only 'llama' and 'bloom'")


def test_missing_tokenizer_is_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "notok.gguf"), "llama")
    _add_tiny_llama_metadata(writer, vocab_size=64)
    _add_tiny_llama_tensors(writer, vocab_size=64)
    _finish(writer)
    _assert_one_line_error(tmp_path / "notok.gguf", r"has no embedded tokenizer")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    _assert_one_line_error(tmp_path / "nope.gguf", r"nope\.gguf does not exist")


@pytest.mark.parametrize("keep", [100, 50_000, 1_000_000])
def test_truncated_file_is_refused(stories: dict[str, Path], tmp_path: Path, keep: int) -> None:
    path = tmp_path / "truncated.gguf"
    path.write_bytes(stories["stories260K.gguf"].read_bytes()[:keep])
    _assert_one_line_error(path, r"is not a readable GGUF file \(truncated or corrupt\?\)")
