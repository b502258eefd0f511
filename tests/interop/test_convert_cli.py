"""`latentformer convert` as a user meets it: bad Hugging Face configs are one line naming the field,
and no output replaces what the command did not make (only with --force, never an input)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import latentformer  # noqa: E402
from latentformer.checkpoint import load, load_model, save_checkpoint  # noqa: E402
from latentformer.cli import main  # noqa: E402
from latentformer.config import ModelConfig  # noqa: E402
from latentformer.data.tokenizer import ByteTokenizer  # noqa: E402
from latentformer.interop.hf import import_hf  # noqa: E402
from latentformer.model.transformer import Transformer  # noqa: E402

V = 260  # the byte tokenizer's 257 ids fit


def _tree(path) -> dict[str, str]:
    """Every file under `path` (relative name -> sha256 of its bytes): equal before and after = untouched."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _fails(capsys, argv: list[str], match: str) -> None:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    assert "Traceback" not in err


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, n_layers=1, d_model=16, n_heads=2, max_seq_len=32, attention="gqa",
                                    n_kv_heads=1, d_ff=24))
    return save_checkpoint(tmp_path / "ckpt", model, ByteTokenizer())


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _edit_config(hf_dir, value) -> None:
    (hf_dir / "config.json").write_text(json.dumps(value))


def _hf_config(hf_dir) -> dict:
    return json.loads((hf_dir / "config.json").read_text())


@pytest.mark.parametrize("edit, match", [
    (lambda c: [1], "config.json must hold a JSON object, got list"),
    (lambda c: "llama", "config.json must hold a JSON object, got str"),
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, "required field 'hidden_size' is missing"),
    (lambda c: {k: v for k, v in c.items() if k != "model_type"}, "model_type None"),
    (lambda c: {**c, "hidden_size": "16"}, "field 'hidden_size' must be an integer, got '16'"),
    (lambda c: {**c, "num_hidden_layers": 1.5}, "field 'num_hidden_layers' must be an integer"),
    (lambda c: {**c, "num_attention_heads": 0}, "field 'num_attention_heads' must be positive"),
    (lambda c: {**c, "rms_norm_eps": "1e-5"}, "field 'rms_norm_eps' must be a number"),
    (lambda c: {**c, "tie_word_embeddings": "yes"}, "field 'tie_word_embeddings' must be true or false"),
    (lambda c: {**c, "rope_parameters": [10000]}, "field 'rope_parameters' must be an object"),
    (lambda c: {**c, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     "required field 'low_freq_factor' is missing"),
    (lambda c: {**c, "num_key_value_heads": 3, "num_attention_heads": 2}, "num_key_value_heads=3"),
    (lambda c: {**c, "quantization_config": "gptq"}, "quantized"),
])
def test_bad_hf_config_is_one_line_naming_the_field(tmp_path, capsys, hf_dir, edit, match):
    _edit_config(hf_dir, edit(_hf_config(hf_dir)))
    _fails(capsys, ["convert", "--from", "hf", str(hf_dir), str(tmp_path / "out")], match)
    assert not (tmp_path / "out").exists()


def test_bad_hf_config_leaves_an_existing_output_unchanged(tmp_path, capsys, hf_dir):
    assert main(["convert", "--from", "hf", str(hf_dir), str(tmp_path / "out")]) == 0
    before = _tree(tmp_path / "out")
    _edit_config(hf_dir, [1])
    _fails(capsys, ["convert", "--from", "hf", str(hf_dir), str(tmp_path / "out"), "--force"], "JSON object")
    assert _tree(tmp_path / "out") == before


def test_index_naming_a_file_outside_the_model_directory_is_refused(tmp_path, capsys, hf_dir):
    (tmp_path / "elsewhere.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    (hf_dir / "model.safetensors").unlink()
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    for target in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
        index = {"metadata": {}, "weight_map": dict.fromkeys(names, target)}
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match="outside"):
            import_hf(hf_dir)
        _fails(capsys, ["convert", "--from", "hf", str(hf_dir), str(tmp_path / "out")], "outside")
    assert not (tmp_path / "out").exists()


def test_index_may_name_symlinked_shards(tmp_path, hf_dir):
    """The hub cache's snapshots are symlinks into its blob store: a shard linked there is inside."""
    (tmp_path / "blob").write_bytes((hf_dir / "model.safetensors").read_bytes())
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "shard.safetensors").symlink_to(tmp_path / "blob")
    names = ["model.embed_tokens.weight"]
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, "shard.safetensors")}))
    model, _ = import_hf(hf_dir)
    assert model.config.vocab_size == V


def test_export_never_replaces_its_input(tmp_path, capsys, ckpt):
    before = _tree(ckpt)
    for extra in ([], ["--force"]):
        _fails(capsys, ["convert", "--to", "hf", str(ckpt), str(ckpt), *extra], "is or contains the input")
        _fails(capsys, ["convert", "--to", "hf", str(ckpt), str(tmp_path), *extra], "is or contains the input")
    assert _tree(ckpt) == before


def test_export_replaces_only_its_own_output_and_only_with_force(tmp_path, capsys, ckpt):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        _fails(capsys, ["convert", "--to", "hf", str(ckpt), str(user), *extra], "export directory made by latentformer")
    assert _tree(user) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}

    out = tmp_path / "out"
    assert main(["convert", "--to", "hf", str(ckpt), str(out)]) == 0
    first = _tree(out)
    _fails(capsys, ["convert", "--to", "hf", str(ckpt), str(out)], "pass --force")
    assert _tree(out) == first
    assert main(["convert", "--to", "hf", str(ckpt), str(out), "--force"]) == 0
    (tmp_path / "empty").mkdir()  # an empty directory holds nothing to lose
    assert main(["convert", "--to", "hf", str(ckpt), str(tmp_path / "empty")]) == 0


def test_import_never_replaces_its_input_or_a_foreign_directory(tmp_path, capsys, hf_dir):
    before = _tree(hf_dir)
    for extra in ([], ["--force"]):
        _fails(capsys, ["convert", "--from", "hf", str(hf_dir), str(hf_dir), *extra], "is or contains the input")
    other = tmp_path / "other-hf"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _fails(capsys, ["convert", "--from", "hf", str(hf_dir), str(other), "--force"], "not a checkpoint directory")
    assert _tree(hf_dir) == before

    out = tmp_path / "out"
    assert main(["convert", "--from", "hf", str(hf_dir), str(out)]) == 0
    _fails(capsys, ["convert", "--from", "hf", str(hf_dir), str(out)], "pass --force")
    assert main(["convert", "--from", "hf", str(hf_dir), str(out), "--force"]) == 0


def test_outputs_from_before_markers_are_recognised_by_kind(tmp_path, capsys, hf_dir, ckpt):
    other = save_checkpoint(tmp_path / "other", *load(ckpt, device="cpu"))
    (other / ".latentformer.json").unlink(missing_ok=True)  # as written before markers
    _fails(capsys, ["convert", "--to", "hf", str(ckpt), str(other), "--force"], "not a export")  # a checkpoint is no export
    assert main(["convert", "--from", "hf", str(hf_dir), str(other), "--force"]) == 0
    export = tmp_path / "export"
    assert main(["convert", "--to", "hf", str(ckpt), str(export)]) == 0
    (export / ".latentformer.json").unlink()  # as written before markers: config.json + tokenizer_meta.json
    assert main(["convert", "--to", "hf", str(ckpt), str(export), "--force"]) == 0


def test_gguf_source_must_be_a_file(tmp_path, capsys, hf_dir):
    _fails(capsys, ["convert", "--from", "gguf", str(tmp_path / "none.gguf"), str(tmp_path / "out")], "no such GGUF file")
    _fails(capsys, ["convert", "--from", "hf", str(hf_dir / "config.json"), str(tmp_path / "out")], "--from gguf")
    assert not (tmp_path / "out").exists()


def test_an_imported_model_without_a_tokenizer_says_so(tmp_path, capsys, hf_dir):
    assert main(["convert", "--from", "hf", str(hf_dir), str(tmp_path / "out")]) == 0
    assert "no tokenizer" in capsys.readouterr().out
    with pytest.raises(ValueError, match="checkpoint without a tokenizer.*tokenizer=False"):
        load(tmp_path / "out", device="cpu")
    model, tok = latentformer.load(tmp_path / "out", device="cpu", tokenizer=False)  # the documented model-only load
    assert tok is None and model.config.vocab_size == V
    x = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model(x), transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()(x).logits, atol=1e-4)
    _fails(capsys, ["generate", str(tmp_path / "out"), "--prompt", "hi"], "checkpoint without a tokenizer")


def _permute(w, n_heads: int):
    """llama.cpp's row order for q/k (its converter's `permute`; transformers' GGUF reader undoes it)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_convert_from_gguf_file(tmp_path, capsys):
    """A tiny Llama written as GGUF the way llama.cpp writes one, converted by the CLI, equals the model."""
    gguf = pytest.importorskip("gguf", reason="the [gguf] extra")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=500.0, initializer_range=0.2)).eval()
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for add, value in [("context_length", 32), ("embedding_length", 16), ("block_count", 2), ("feed_forward_length", 24),
                       ("head_count", 4), ("head_count_kv", 2), ("layer_norm_rms_eps", 1e-5), ("rope_freq_base", 500.0),
                       ("vocab_size", V)]:
        getattr(writer, f"add_{add}")(value)
    top = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in hf.state_dict().items():
        w = t.numpy()
        if name in top:
            writer.add_tensor(f"{top[name]}.weight", w)
            continue
        i, module = name.split(".")[2], name.split(".", 3)[3].removesuffix(".weight")
        w = _permute(w, 4) if module == "self_attn.q_proj" else _permute(w, 2) if module == "self_attn.k_proj" else w
        writer.add_tensor(f"blk.{i}.{layer[module]}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    out = tmp_path / "out"
    assert main(["convert", "--from", "gguf", str(tmp_path / "tiny.gguf"), str(out)]) == 0
    assert "no tokenizer" in capsys.readouterr().out  # this file has no vocabulary: the model alone
    model = load_model(out)
    x = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-5
    _fails(capsys, ["convert", "--from", "gguf", str(tmp_path / "tiny.gguf"), str(out)], "pass --force")
    _fails(capsys, ["convert", "--from", "gguf", str(tmp_path / "tiny.gguf"), str(tmp_path)], "is or contains the input")


@pytest.mark.parametrize("outside", ["../outside/tokenizer.json", "ABSOLUTE"])
def test_tokenizer_meta_naming_a_file_outside_the_model_directory_is_not_read(tmp_path, capsys, outside):
    """An exported directory whose tokenizer_meta.json points outside it (its tokenizer moved there,
    sha256 intact): the file is never read; the model converts without a tokenizer, with a warning."""
    from latentformer.data.tokenizer import load_tokenizer, train_bpe

    tok = train_bpe(["the quick brown fox jumps over the lazy dog. " * 4] * 8, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, n_layers=1, d_model=16, n_heads=2, max_seq_len=32, d_ff=24))
    save_checkpoint(tmp_path / "ckpt", model, tok)
    assert main(["convert", "--to", "hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    (tmp_path / "outside").mkdir()
    (tmp_path / "hf" / "tokenizer.json").rename(tmp_path / "outside" / "tokenizer.json")
    meta_path = tmp_path / "hf" / "tokenizer_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["file"] = str(tmp_path / "outside" / "tokenizer.json") if outside == "ABSOLUTE" else outside
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="outside"):
        load_tokenizer(tmp_path / "hf")
    with pytest.warns(UserWarning, match="a path outside"):
        _, imported = import_hf(tmp_path / "hf")
    assert imported is None
    assert main(["convert", "--from", "hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    meta_path.write_text("[]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_tokenizer(tmp_path / "hf")
