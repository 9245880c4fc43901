"""`semievol export --merged` (`method.merge`): the adapter merged into its base GGUF, for every family and a
K-quant; llama.cpp loads the file and computes what base + adapter computes (float32: within rounding), in the
base's own tensor types, with its provenance in the metadata; bad input is one line and writes nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tinymodel import quantize_with_llama_cpp, write_tiny_gguf
from typer.testing import CliRunner

from semievol_local.cli import app
from semievol_local.core.adapter_gguf import random_adapter
from semievol_local.core.gguf_file import read
from semievol_local.method import merge

SHAPE = dict(dim=256, n_head=4, n_head_kv=2, n_ff=512, n_layer=2, peaked=True)  # rows of 256: real K-quants
KEYS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
FAMILIES = {
    "llama": (dict(arch="llama", rope_freqs=True), None),
    "qwen2": (dict(arch="qwen2"), None),
    "qwen3": (dict(arch="qwen3", head_dim=128), None),
    "gemma3": (dict(arch="gemma3", head_dim=128), None),
    "llama-q4_k_m": (dict(arch="llama", rope_freqs=True), "Q4_K_M"),
    "qwen2-q8_0": (dict(arch="qwen2"), "Q8_0"),
}


def model(tmp_path, name):
    kwargs, ftype = FAMILIES[name]
    path = write_tiny_gguf(tmp_path / f"{name}.gguf", **SHAPE, **kwargs)
    return quantize_with_llama_cpp(path, tmp_path / f"{name}-{ftype}.gguf", ftype) if ftype else path


def prompts(n_vocab: int = 200, n: int = 6, length: int = 24) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, n_vocab, size=length).tolist() for _ in range(n)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_merged_file_is_base_plus_adapter(tmp_path, name, monkeypatch):
    from semievol_local.training.parity import llama_logits_many

    monkeypatch.setenv("SEMIEVOL_WEIGHTS", str(tmp_path / "weights"))
    base = model(tmp_path, name)
    quantized = FAMILIES[name][1] is not None
    # LoRA on every projection of both blocks, a large adapter (scale 100) that must move the logits. On these tiny
    # peaked models a 4-bit requantization alone costs KL 0.14 (top-1 0.83): the adapted tensors go to Q8_0
    adapter = random_adapter(tmp_path / "adapter.gguf", base, KEYS, -1, 8, 100.0)
    out = tmp_path / "model.gguf"
    seqs = prompts()
    got = merge.merge_model(base, adapter, out, seqs)
    assert got["tensors_merged"] == 2 * 7
    before = {t.name: t.tensor_type.name for t in read(base).tensors}
    after = {t.name: t.tensor_type.name for t in read(out).tensors}
    adapted = {n for n in before if any(n.endswith(f"{p}.weight") for p in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                              "ffn_gate", "ffn_up", "ffn_down"))}
    assert len(adapted) == 14 and after.keys() == before.keys()
    for tensor, kind in before.items():  # the base's types; an adapted tensor under 8 bits in Q8_0
        assert after[tensor] == ("Q8_0" if tensor in adapted and kind not in merge.FINE_TYPES else kind), tensor
    base_data = {t.name: np.asarray(t.data) for t in read(base).tensors}
    for t in read(out).tensors:  # the tensors the adapter did not touch keep the base's bytes, quantized or not
        assert (t.name in adapted) != np.array_equal(np.asarray(t.data), base_data[t.name]), t.name
    retyped = sum(before[n] not in merge.FINE_TYPES for n in adapted)
    assert got["adapted_tensors_retyped"] == retyped and retyped == (14 if FAMILIES[name][1] == "Q4_K_M" else 0)
    n = len(before)
    assert got["tensor_types_as_base"] == f"{n - retyped} of {n}"
    assert got["kl_mean"] <= 0.1 and got["top1_agreement"] >= 0.9, got  # the parity gate's bounds
    if not quantized:  # a float32 base: the merge is base + adapter up to float rounding
        assert got["kl_mean"] < 1e-6 and got["top1_agreement"] == 1.0, got
        logits = [np.concatenate(llama_logits_many(m, a, seqs)) for m, a in ((out, None), (base, adapter), (base, None))]
        err, moved = np.abs(logits[0] - logits[1]).max(), np.abs(logits[0] - logits[2]).max()
        assert moved > 1e-2 and err < 1e-3 * moved, (err, moved)  # the adapter is in the file, exactly
    fields = read(out).fields
    assert fields["semievol.merged"] is True and fields["semievol.base"] == base.name
    assert fields["semievol.adapter_sha256"] == got["adapter_sha256"] and len(got["adapter_sha256"]) == 64
    base_fields = read(base).fields
    assert {k: v for k, v in fields.items() if k not in merge.KEYS and k != "general.file_type"} == \
        {k: v for k, v in base_fields.items() if k != "general.file_type"}  # every key of the base, as it was
    assert not list(tmp_path.glob(".model*"))  # no temporary file left


def test_the_check_holds_logits_in_chunks(tmp_path, monkeypatch):
    """`compare_llama` splits the prompts so one model's logits stay within a byte budget (a 262k vocabulary over
    32 fpb prompts ran 24 GB out of memory held whole) and gives what one whole comparison gives."""
    from semievol_local.training.parity import compare_llama, compare_logits, llama_logits_many

    base = model(tmp_path, "qwen2")
    adapter = random_adapter(tmp_path / "adapter.gguf", base, KEYS, -1, 8, 100.0)
    seqs = prompts(n=5)
    vocab = merge.vocab_size(base)
    whole = compare_logits(*(np.concatenate(llama_logits_many(m, a, seqs)) for m, a in ((base, adapter), (base, None))))
    import semievol_local.training.parity as parity

    calls, real = [], parity.llama_logits_many
    monkeypatch.setattr(parity, "llama_logits_many", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    # a budget of 30 positions: prompts of 24 tokens go one per chunk
    chunked = compare_llama((base, adapter), (base, None), seqs, vocab=vocab, budget=4 * vocab * 30)
    assert calls == [1] * 10  # 5 chunks, each model once
    assert chunked["n_positions"] == whole["n_positions"] == 5 * 24
    assert abs(chunked["kl_mean"] - whole["kl_mean"]) < 1e-9 and chunked["kl_mean"] > 0.01
    assert chunked["top1_agreement"] == whole["top1_agreement"] and chunked["kl_max"] == whole["kl_max"]


def test_outtype_sets_the_merged_files_type(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMIEVOL_WEIGHTS", str(tmp_path / "weights"))
    base = model(tmp_path, "llama-q4_k_m")
    adapter = random_adapter(tmp_path / "adapter.gguf", base, KEYS, -1, 8, 100.0)
    got = merge.merge_model(base, adapter, tmp_path / "f16.gguf", prompts(), outtype="f16")
    types = {t.tensor_type.name for t in read(tmp_path / "f16.gguf").tensors if len(t.shape) > 1}
    # against the Q4_K_M file + adapter (llama.cpp's quantized kernels): the base's own kernel floor, ~0.005
    assert types == {"F16"} and got["kl_mean"] < 0.02
    # --outtype base: every tensor back in the base's own type, the adapted ones included (an adapter of a trained
    # one's size: see above)
    small = random_adapter(tmp_path / "small.gguf", base, KEYS, -1, 8, 2.0)
    got = merge.merge_model(base, small, tmp_path / "base.gguf", prompts(), outtype="base")
    n = len(read(base).tensors)
    assert got["tensor_types_as_base"] == f"{n} of {n}" and got["adapted_tensors_retyped"] == 0
    with pytest.raises(Exception, match="--outtype q9_x: llama.cpp does not know"):
        merge.check_outtype("q9_x")


def test_a_merge_beyond_the_bounds_leaves_no_file(tmp_path, monkeypatch):
    """A merge quantized to 2 bits per weight on a tiny model misses base + adapter: refused, nothing written."""
    monkeypatch.setenv("SEMIEVOL_WEIGHTS", str(tmp_path / "weights"))
    base = model(tmp_path, "llama")
    adapter = random_adapter(tmp_path / "adapter.gguf", base, KEYS, -1, 8, 100.0)
    with pytest.raises(Exception, match="beyond the parity gate's bounds.*nothing was written"):
        merge.merge_model(base, adapter, tmp_path / "q2.gguf", prompts(), outtype="q2_k")
    assert not (tmp_path / "q2.gguf").exists() and not list(tmp_path.glob(".q2*"))


def test_export_merged_of_a_run(tiny_q4, tiny_task, tmp_path):
    """From a finished run: model.gguf, a Modelfile that serves it (FROM ./model.gguf), the accuracy of both on
    the run's test split; eval and predict take the merged file as a model. Bad input is one line, exit 2."""
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--model", str(tiny_q4), "--data", str(tiny_task), "--out", str(out),
                                   "--epochs", "1", "--batch-size", "4", "--min-letter-mass", "0", "--force"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    for args, needle in [(["--merged", "--outtype", "q9_x"], "--outtype q9_x"),
                         (["--outtype", "f16"], "give --merged too")]:
        bad = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "bad"), *args])
        assert bad.exit_code == 2 and needle in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert not (tmp_path / "bad").exists()
    dest = tmp_path / "exp"
    # the tiny Q4_1 model's near-flat distributions lose top-1 to a 4-bit requantization (0.80 measured): the
    # default is refused on it (test_a_merge_beyond_the_bounds_leaves_no_file); float32 keeps it exact
    res = CliRunner().invoke(app, ["export", str(out), "--out", str(dest), "--merged", "--outtype", "f32"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert (dest / "model.gguf").is_file() and (dest / "adapter.gguf").is_file()
    mf = (dest / "Modelfile").read_text()
    assert "FROM ./model.gguf" in mf and "ADAPTER" not in mf.split("TEMPLATE")[0].split("# ")[-1]
    assert not any(line.startswith("ADAPTER") for line in mf.splitlines())
    assert "accuracy_merged" in res.stdout and "kl_mean" in res.stdout
    again = CliRunner().invoke(app, ["export", str(out), "--out", str(dest), "--merged", "--outtype", "f32"])
    assert again.exit_code == 2 and "already exists" in again.stderr
    # the merged file in this toolkit: eval gives the accuracy export measured
    js = tmp_path / "e.json"
    ev = CliRunner().invoke(app, ["eval", "--model", str(dest / "model.gguf"), "--data", str(tiny_task),
                                  "--weights", "file", "--json", str(js)])
    assert ev.exit_code == 0, ev.stderr
    summary = json.loads((dest / "merge.json").read_text())  # what export printed, kept beside the file
    assert json.loads(js.read_text())["accuracy"] == summary["accuracy_merged"]
    # against the Q4_1 file + adapter in llama.cpp's kernels (quantized activations): their floor (KL 6e-5, top-1 0.986)
    assert summary["questions"] == 10 and summary["kl_mean"] < 1e-3 and summary["top1_agreement"] >= 0.95
    run_acc = json.loads((out / "round1" / "eval" / "eval.json").read_text())["accuracy"]
    assert summary["accuracy_base_adapter"] == run_acc  # the run's own evaluation of base + adapter
