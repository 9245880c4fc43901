"""`semievol export` and `semievol run --config`, on a tiny run: the exported set is what the final fine-tune
trained on, mlx-lm's own dataset code reads chat.jsonl, the Modelfile's template renders our prompts, and a
run.json repeats its run."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import write_task
from typer.testing import CliRunner

from semievol_local.cli import app
from semievol_local.core.data import load_split
from semievol_local.core.prompts import question_messages
from semievol_local.core.runfolder import items_digest
from semievol_local.engines import llama_engine
from semievol_local.method import finetune
from semievol_local.method.export import row_item


def run(*args, code=0):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (res.stdout, res.stderr, res.exception)
    return res


@pytest.fixture(scope="module")
def finished(tiny_q4, tmp_path_factory):
    """A tiny run started from a TOML file (flag names as keys, one option in a table)."""
    folder = tmp_path_factory.mktemp("task")
    write_task(folder)
    root = tmp_path_factory.mktemp("runs")
    cfg = root / "run.toml"
    cfg.write_text(f'model = "{tiny_q4}"\ndata = "{folder}"\nout = "{root / "run"}"\n'
                   'epochs = 1.0\nbatch-size = 4\nsave-every = 1\nmin-letter-mass = 0\nlearners = 3\nforce = true\n'
                   '[engine]\nn_ctx = 1024\n')
    run("run", "--config", cfg)
    return folder, root / "run"


def test_a_toml_config_sets_the_run_options(finished):
    _, out = finished
    meta = json.loads((out / "run.json").read_text())
    assert meta["run"]["learners"] == 3 and meta["run"]["min_letter_mass"] == 0
    assert meta["train"]["epochs"] == 1.0 and meta["train"]["batch_size"] == 4 and meta["engine"]["n_ctx"] == 1024


def test_run_json_repeats_the_run_and_the_command_line_wins(finished, tmp_path):
    """--config RUN/run.json gives every option of that run: the new run's stages have the same inputs (so the
    same outputs); a flag on the command line overrides the file."""
    _, out = finished
    again = tmp_path / "again"
    run("run", "--config", out / "run.json", "--out", again, "--limit-test", "4")
    a, b = json.loads((out / "run.json").read_text()), json.loads((again / "run.json").read_text())
    assert b["run"] == {**a["run"], "limit_test": 4} and b["train"] == a["train"] and b["engine"] == a["engine"]
    for stage in ("warmup", "round1/retrieval", "round1/collaboration", "round1/selection", "round1/final"):
        # every input but the upstream stages' output digests (a training log holds its own timings)
        first, second = ({k: v for k, v in json.loads((r / stage / "inputs.json").read_text())["inputs"].items()
                          if k not in ("warm", "retrieval", "collaboration", "init_adapter")} for r in (out, again))
        assert first == second, stage
    for stage in ("warmup", "round1/final"):  # and MLX trains the same weights
        assert (again / stage / "adapters.safetensors").read_bytes() == (out / stage / "adapters.safetensors").read_bytes()
    assert (again / "pseudo_labels.jsonl").read_text() == (out / "pseudo_labels.jsonl").read_text()


# what each bad config covers -> (file name, text, message fragment)
BAD_CONFIGS = [
    ("unknown key", "run.toml", "learnerz = 2\n", "unknown option 'learnerz'"),
    ("wrong type", "run.toml", 'learners = "two"\n', "learners = 'two': give a whole number"),
    ("bool for a number", "run.toml", "theta = true\n", "give a number"),
    ("out of range", "run.toml", "theta = 120\n", "--theta 120: give a value"),
    ("unknown key in a table", "run.toml", "[train]\nlearning_rate = 1\n", "[train] has no option 'learning_rate'"),
    ("not TOML", "run.toml", "learners = = 2\n", "does not parse"),
    ("not JSON", "run.json", "{", "does not parse"),
    ("missing file", None, "", "file not found"),
]


@pytest.mark.parametrize("case,name,text,message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_a_bad_config_is_one_line_before_anything_runs(tiny_q4, tiny_task, tmp_path, case, name, text, message):
    cfg = tmp_path / (name or "absent.toml")
    if name:
        cfg.write_text(text)
    res = run("run", "--config", cfg, "--model", tiny_q4, "--data", tiny_task, "--out", tmp_path / "out", code=2)
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def exported(finished, tmp_path_factory):
    folder, out = finished
    dest = tmp_path_factory.mktemp("exports") / "fpb-export"
    res = run("export", out, "--out", dest)
    return folder, out, dest, res


def test_export_writes_the_set_the_final_fine_tune_trained_on(exported):
    folder, out, dest, _ = exported
    split = load_split(dest / "train.csv", "labeled")  # ready to be a labeled split again
    final = json.loads((out / "round1" / "final" / "inputs.json").read_text())["inputs"]["items"]
    assert items_digest(split.items, True) == final  # the same rows, answers and order the final trained on
    assert items_digest(load_split(dest / "train.jsonl", "labeled").items, True) == final
    rows = [json.loads(ln) for ln in (dest / "train.jsonl").read_text().splitlines()]
    pseudo = [json.loads(ln) for ln in (out / "pseudo_labels.jsonl").read_text().splitlines()]
    chosen = [p for p in pseudo if p["selected"]]
    assert [r["source"] for r in rows] == ["labeled"] * 12 + ["pseudo"] * len(chosen)
    assert [(r["source_index"], r["answer"], r["round"]) for r in rows[12:]] == \
        [(p["index"], p["pseudo_label"], 1) for p in chosen]
    assert [r["entropy"] for r in rows[12:]] == pytest.approx([p["entropy"] for p in chosen])
    assert (dest / "adapter.gguf").read_bytes() == (out / "round1" / "final" / "adapter.gguf").read_bytes()


class GGUFTokenizer:
    """What mlx-lm's dataset code asks of a tokenizer, answered with the GGUF's own template and tokenizer."""

    def __init__(self, engine):
        self.engine = engine

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=False, return_dict=False, **kw):
        return self.engine.tokenize(self.engine.template.render(messages, generation_prompt=add_generation_prompt))


def test_mlx_lm_reads_chat_jsonl_as_the_examples_our_trainer_uses(exported, tiny_q4):
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import ChatDataset, create_dataset, load_local_dataset

    _, _, dest, _ = exported
    engine = llama_engine.load(tiny_q4)
    tok = GGUFTokenizer(engine)
    args = SimpleNamespace(mask_prompt=True)
    train, valid, test = load_local_dataset(dest / "mlx-lm", tok, args)  # what `mlx_lm.lora --data DIR` reads
    assert isinstance(train, ChatDataset) and len(valid) == len(test) == 0
    recs = [json.loads(ln) for ln in (dest / "chat.jsonl").read_text().splitlines()]
    assert isinstance(create_dataset(recs, tok, args), ChatDataset) and len(train) == len(recs)
    rows = [json.loads(ln) for ln in (dest / "train.jsonl").read_text().splitlines()]
    ours = finetune.examples(engine, [row_item(r, i) for i, r in enumerate(rows)])
    for i, (prompt, answer) in enumerate(ours):
        tokens, offset = train.process(train[i])
        assert offset == len(prompt)  # the loss starts where ours does
        assert tokens[:len(prompt) + len(answer)] == prompt + answer  # ours end at end-of-turn; the template adds "\n"


def test_the_modelfile_template_renders_the_prompt_we_train_on(exported, tiny_q4):
    _, _, dest, _ = exported
    text = (dest / "Modelfile").read_text()
    assert re.search(r"^FROM (.+)$", text, re.M).group(1) == str(Path(tiny_q4).resolve())
    assert re.search(r"^ADAPTER \./adapter\.gguf$", text, re.M)
    assert 'PARAMETER stop "<|im_end|>"' in text
    tmpl = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    engine = llama_engine.load(tiny_q4)
    item = row_item(json.loads((dest / "train.jsonl").read_text().splitlines()[0]))
    msgs = question_messages(item)

    def ollama(system: str, prompt: str) -> str:  # Go's {{ if .System }}A{{ else }}B{{ end }} and the two fields
        m = re.fullmatch(r"\{\{ if \.System \}\}(.*)\{\{ else \}\}(.*)\{\{ end \}\}\{\{ \.Response \}\}(.*)", tmpl, re.S)
        body = m.group(1) if system else m.group(2)
        return body.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt)

    assert ollama("", msgs[0]["content"]) == engine.template.prompt(msgs)
    sys_msgs = [{"role": "system", "content": "Be brief."}, *msgs]
    assert ollama("Be brief.", msgs[0]["content"]) == engine.template.prompt(sys_msgs)


def test_export_refuses_a_used_folder_and_an_unfinished_run(exported, tmp_path):
    _, out, dest, _ = exported
    res = run("export", out, "--out", dest, code=2)
    assert "already exists" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text((out / "run.json").read_text())
    res = run("export", unfinished, "--out", tmp_path / "x", code=2)
    assert "no finished final fine-tune" in res.stderr and not (tmp_path / "x").exists()
    res = run("export", unfinished, "--out", tmp_path / "z", "--merged", code=2)
    assert "no finished final fine-tune" in res.stderr and not (tmp_path / "z").exists()
    res = run("export", tmp_path / "nothing", "--out", tmp_path / "y", code=2)
    assert "not a run folder" in res.stderr and not (tmp_path / "y").exists()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for text, message in (("{\"model\": ", "not readable JSON"), ("{}", "no 'model' in it")):
        (damaged / "run.json").write_text(text)
        for args in (["export", damaged, "--out", tmp_path / "w", "--merged"], ["report", damaged]):
            res = run(*args, code=2)
            assert message in res.stderr and "run.json" in res.stderr and len(res.stderr.strip().splitlines()) == 1
            assert not (tmp_path / "w").exists() and "Traceback" not in res.stderr


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # llama: Q/K rows permuted in the GGUF; qwen2: as in HF
def test_the_peft_adapter_on_the_hugging_face_layout_gives_the_mlx_logits(arch, tmp_path):
    """No torch here (PyPI's Linux wheel brings CUDA): the Hugging Face side is mlx-lm's own model class built
    with Hugging Face's rope (rotate-half) on the base weights in Hugging Face's row order, with PEFT's merge
    W + (lora_alpha / r) B A of the exported tensors, read by their PEFT names. Its logits must be ours: MLX
    on the GGUF's own layout (interleaved rope) with the adapter as we train it."""
    import dataclasses
    import importlib

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from tinymodel import write_tiny_gguf

    from semievol_local.training import lora  # first: it loads the fast BLAS before mlx.core
    from semievol_local.core.config import TrainConfig
    from semievol_local.method.export import peft_adapter, unpermute_rows
    from semievol_local.training import gguf_loader

    gg = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch=arch, peaked=True)
    model = gguf_loader.load_model(gg)
    cfg = TrainConfig(num_layers=-1, rank=4, scale=2.0)
    adapter_cfg = lora.apply_lora(model, cfg)
    rng = np.random.default_rng(0)  # a trained-looking adapter: B is zero at initialization
    model.load_weights([(n, mx.array(rng.normal(0, 0.05, p.shape).astype(np.float32)))
                        for n, p in tree_flatten(model.trainable_parameters()) if n.endswith("lora_b")], strict=False)
    (tmp_path / "ad").mkdir()
    lora.write_adapter(tmp_path / "ad", dict(tree_flatten(model.trainable_parameters())), adapter_cfg,
                       model.args.model_type, len(model.layers), cfg)
    tokens = mx.array([[1, 5, 9, 23, 42, 7, 3, 11, 60, 2]])
    ours = np.array(model(tokens).astype(mx.float32))

    base = gguf_loader.load_model(gg)
    module = importlib.import_module(f"mlx_lm.models.{gguf_loader.ARCHITECTURES[arch].mlx_module}")
    hf = module.Model(module.ModelArgs.from_dict({**dataclasses.asdict(base.args), "rope_traditional": False}))
    n_head, n_kv = base.args.num_attention_heads, base.args.num_key_value_heads
    weights = {}
    for name, w in tree_flatten(base.parameters()):
        w = np.array(w)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_rows(w, n_head if "q_proj" in name else n_kv)
        weights[name] = w

    def hf_logits():
        hf.load_weights([(n, mx.array(w)) for n, w in weights.items()])
        return np.array(hf(tokens).astype(mx.float32))

    base_ours = np.array(base(tokens).astype(mx.float32))
    assert np.abs(hf_logits() - base_ours).max() < 1e-3  # the Hugging Face base is the GGUF's model
    tensors, pcfg = peft_adapter(tmp_path / "ad", gg)
    assert pcfg["r"] == 4 and pcfg["lora_alpha"] == 8.0 and pcfg["layers_to_transform"] == [0, 1]
    assert set(pcfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(tensors) == 2 * 7 * 2 and all(k.startswith("base_model.model.model.layers.") for k in tensors)
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            mod = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            assert a.shape[0] == b.shape[1] == 4
            weights[mod + ".weight"] = weights[mod + ".weight"] + pcfg["lora_alpha"] / pcfg["r"] * (b @ a)
    with_adapter = hf_logits()
    assert np.abs(with_adapter - base_ours).max() > 1e-2  # the adapter changes the logits...
    assert np.abs(with_adapter - ours).max() < 1e-3  # ...exactly as MLX with the adapter has them


def test_export_peft_writes_the_adapter_for_the_hugging_face_base(finished, tmp_path):
    from safetensors.numpy import load_file

    _, out = finished
    res = run("export", out, "--out", tmp_path / "e", "--peft")
    assert "mlx.core was imported" not in res.stderr
    cfg = json.loads((tmp_path / "e" / "peft" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "e" / "peft" / "adapter_model.safetensors")  # what PEFT reads it with
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert len(tensors) == 2 * len(cfg["target_modules"]) * len(cfg["layers_to_transform"])
