"""Hugging Face export and import: transformers' LlamaForCausalLM and AutoTokenizer load an export
with no custom code and compute what raylm computes; importing an export gives the weights back
bit for bit; mismatches are one line naming the key."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch

from hf_support import CODE, MIXED, PROSE, one_thread, random_run, save_sharded
from raylm.cli import main as cli_main
from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.model import Transformer
from raylm.train.runs import TOKENIZER_FILE
from raylm.train import checkpoint as ckpt
from raylm.use.generate import SamplingOptions, generate_ids
from raylm.train.hf_import import hf_state_dict, load_hf_weights, rope_from_hf, rope_to_hf
from raylm.use.hf import export_hf

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

CONFIGS = {
    # the debug preset is itself GQA: 4 query heads share 2 K/V heads; vocab 512 > 480 tokenizer pieces
    "debug": {},
    # 8 heads over 2 K/V heads, tied output, other eps/theta, SwiGLU size from a multiplier and odd rounding
    "gqa-tied": dict(n_heads=8, n_kv_heads=2, tie_embeddings=True, norm_eps=1e-6, rope_theta=500000.0,
                     ffn_dim_multiplier=1.3, multiple_of=48),
    # µP at 4x its base width: the logit multiplier 1/4 is folded into lm_head and the attention
    # scale's ratio sqrt(8 / 32) = 1/2 into q_proj (powers of two, so import divides them out exactly)
    "mup": dict(parametrization="mup", mup_base_dim=32),
}


@pytest.fixture(scope="module")
def exports(tokenizer, tmp_path_factory) -> dict:
    """{config name: (raylm model, its config, run directory, HF export directory)}, random weights."""
    found = {}
    for seed, (name, overrides) in enumerate(CONFIGS.items()):
        root = tmp_path_factory.mktemp(name)
        run, model, cfg = random_run(root, tokenizer, seed=seed, **overrides)
        found[name] = model, cfg, run, export_hf(run, root / "hf", log=lambda line: None)
    return found


@pytest.fixture(params=list(CONFIGS))
def exported(request, exports):
    return exports[request.param]


@functools.cache
def hf_model(out: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def test_export_writes_the_files_transformers_expects(exported, tokenizer):
    model, cfg, _, out = exported
    assert {p.name for p in out.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_key_value_heads"], config["intermediate_size"], config["tie_word_embeddings"]) == (
        cfg.model.kv_heads, cfg.model.ffn_hidden_dim, cfg.model.tie_embeddings)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(tokenizer.vocab_size, cfg.model.vocab_size))
    assert not list(out.parent.glob(".hf.partial*"))  # the staging directory is renamed into place


def test_exported_logits_equal_raylm_logits_in_float32(exported):
    model, cfg, _, out = exported
    hf = hf_model(out)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads < hf.config.num_attention_heads
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
        # Not vacuous: without the rope permutation of one layer's wq the logits differ.
        q_proj = hf.model.layers[0].self_attn.q_proj.weight
        saved = q_proj.clone()
        q_proj.copy_(rope_from_hf(saved, cfg.model.n_heads))
        unpermuted = hf(tokens).logits
        q_proj.copy_(saved)
    assert (unpermuted - ours).abs().max() > 1e-2


def test_importing_the_export_gives_the_original_weights_exactly(exported):
    model, cfg, _, out = exported
    imported = hf_state_dict(out, cfg.model)
    original = model.state_dict()
    assert imported.keys() == original.keys()
    for name, tensor in original.items():
        assert imported[name].dtype == torch.float32 and torch.equal(imported[name], tensor), name
    fresh = Transformer(cfg.model)
    load_hf_weights(fresh, dataclasses.replace(cfg.model, init_from=f"hf:{out}"))
    assert all(torch.equal(fresh.state_dict()[name], tensor) for name, tensor in original.items())


def test_the_tokenizer_encodes_code_unicode_and_whitespace_runs_identically(exported, tokenizer):
    out = exported[3]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = [MIXED, CODE, PROSE, "   leading spaces", "\t\ttabs\n\n\nnewlines  ", "x" * 300, "", "🙂"]
    for text in texts:
        ids = tokenizer.encode_one(text)
        assert hf_tok(text, add_special_tokens=False).input_ids == ids, text
        assert hf_tok.decode(ids) == tokenizer.decode(ids)
    assert hf_tok("def f").input_ids == [tokenizer.bos_id, *tokenizer.encode_one("def f")]  # BOS as raylm adds it
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 3)


def test_transformers_greedy_generate_continues_a_prompt_as_raylm_does(exported, tokenizer, capsys):
    model, cfg, run, out = exported
    hf, hf_tok = hf_model(out), transformers.AutoTokenizer.from_pretrained(out)
    prompt = "def fibonacci(n):"
    ids = hf_tok(prompt, return_tensors="pt").input_ids  # (1, T) with BOS
    theirs = hf.generate(ids, do_sample=False, max_new_tokens=24)[0, ids.shape[1]:].tolist()
    ours = list(generate_ids(model, ids[0].tolist(), SamplingOptions(max_new_tokens=24, temperature=0),
                             vocab_limit=tokenizer.vocab_size, eos_id=tokenizer.eos_id))
    assert ours == theirs and len(ours) > 0
    if cfg.model.tie_embeddings:  # the CLI once is enough
        return
    assert cli_main(["generate", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "24",
                     "--device", "cpu"]) == 0
    # (raylm's decode: transformers spells invalid UTF-8 from byte pieces differently, and random weights make some)
    assert capsys.readouterr().out == prompt + tokenizer.decode(theirs) + "\n"


@pytest.mark.slow  # a spawned two-rank gloo group
def test_two_fsdp2_ranks_import_and_their_checkpoint_exports_sharded(exports, tmp_path):
    """Two FSDP2 ranks fill their shards from an HF export (`load_hf_weights`: rank 0 reads, the
    others receive) and get the original weights; the checkpoint two such ranks wrote, exported
    through the CLI into 40 kB safetensors files with an index, loads in transformers with the
    same logits."""
    from support import run_ranks

    model, cfg, run, hf_dir = exports["debug"]
    torch.save(model.state_dict(), tmp_path / "full.pt")
    tokenizer_path = ckpt.latest_checkpoint(run) / TOKENIZER_FILE
    ranks = run_ranks(functools.partial(save_sharded, cfg_yaml=cfg.to_yaml(), tokenizer_path=str(tokenizer_path),
                                        hf_dir=str(hf_dir)), tmp_path)
    assert ranks == [{"sharded": True, "imported_exactly": True}] * 2
    sharded_run = tmp_path / "run"
    marker = ckpt.read_marker(ckpt.latest_checkpoint(sharded_run))
    assert marker["world_size"] == 2
    out = tmp_path / "hf"
    assert cli_main(["export", str(sharded_run), "--format", "hf", "--out", str(out), "--max-shard-size", "40kB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = {p.name for p in out.glob("model-*.safetensors")}
    assert len(files) > 5 and set(index["weight_map"].values()) == files
    for file in files:  # at most 40 kB of tensors (plus a small header), or one larger tensor alone
        assert (out / file).stat().st_size <= 40_000 + 2_000 or len(_tensors_in(index, file)) == 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), rtol=1e-4, atol=1e-4)
    imported = hf_state_dict(out, cfg.model)
    assert all(torch.equal(imported[k], v) for k, v in model.state_dict().items())


def _tensors_in(index: dict, file: str) -> list[str]:
    return [name for name, f in index["weight_map"].items() if f == file]


def test_import_mismatches_are_one_line_naming_the_key(exported, tmp_path):
    _, cfg, _, out = exported
    with pytest.raises(ConfigError, match=r"config.json vocab_size=512 but model.vocab_size=1024"):
        hf_state_dict(out, dataclasses.replace(cfg.model, vocab_size=1024))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for p in out.iterdir():
        (damaged / p.name).write_bytes(p.read_bytes())
    config = json.loads((damaged / "config.json").read_text())
    config["intermediate_size"] += 1
    (damaged / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json intermediate_size=\d+ but the SwiGLU hidden size"):
        hf_state_dict(damaged, cfg.model)
    from safetensors.torch import load_file, save_file

    config["intermediate_size"] -= 1
    (damaged / "config.json").write_text(json.dumps(config))
    tensors = load_file(damaged / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:-2]
    save_file(tensors, damaged / "model.safetensors")
    with pytest.raises(ConfigError, match=r"model.layers.1.self_attn.k_proj.weight has shape \(\d+, \d+\), "
                                          r"the model's layers.1.attention.wk.weight needs"):
        hf_state_dict(damaged, cfg.model)
    with pytest.raises(ConfigError, match="no config.json"):
        hf_state_dict(tmp_path / "nowhere", cfg.model)


def test_init_from_must_name_an_hf_directory(tmp_path):
    assert load_config(None, []).model.init_from == ""
    assert load_config(None, ["model.init_from=hf:/some/dir"]).model.init_from == "hf:/some/dir"
    # A path without hf: names a raylm run or checkpoint (tests/test_finetune.py).
    assert load_config(None, ["model.init_from=/some/dir"]).model.init_from == "/some/dir"
    with pytest.raises(ConfigError, match=r"model.init_from='hf:': must be empty \(random init\), hf:DIR"):
        load_config(None, ["model.init_from='hf:'"])


def test_export_refuses_a_non_empty_directory_and_bad_paths_in_one_line(exported, tmp_path, capsys):
    run = exported[2]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    for args, message in [
        (["export", str(run), "--out", str(taken)], f"--out {taken}: exists and is not an empty directory"),
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "no such run directory or checkpoint"),
        (["export", str(run), "--out", str(tmp_path / "x"), "--max-shard-size", "big"], "--max-shard-size='big'"),
    ]:
        assert cli_main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert (taken / "keep.txt").read_text() == "mine" and not (tmp_path / "x").exists()


def test_rope_permutation_round_trips_and_moves_pairs_to_halves():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of head_dim 8, dim 3
    hf = rope_to_hf(w, n_heads=2)
    # head 0: raylm rows (0,1),(2,3),(4,5),(6,7) -> HF rows 0..3 take the evens, 4..7 the odds
    assert hf[:8, 0].tolist() == [0, 6, 12, 18, 3, 9, 15, 21]
    assert torch.equal(rope_from_hf(hf, n_heads=2), w)


def test_a_run_initialised_from_an_hf_directory_starts_from_its_weights_and_tokenizer(exports, tmp_path, capsys):
    """`model.init_from=hf:DIR`: the run's tokenizer is DIR's, its step-0 held-out loss is the
    exported model's own loss on those rows (`raylm eval` of the source run), and a restart of
    the run restores its own checkpoint, never the import again."""
    from raylm.data.local import local_documents
    from raylm.train.local import train_local
    from support import local_config

    _, _, source_run, hf_dir = exports["debug"]
    lines: list[str] = []
    cfg = local_config(tmp_path, f"model.init_from=hf:{hf_dir}", "train.max_steps=2", "train.eval_every=2",
                       "train.checkpoint_every=2")
    result = train_local(cfg, log=lines.append)
    run_dir = Path(result.run_dir)
    assert f"initial weights from hf:{hf_dir}" in lines
    assert (run_dir / TOKENIZER_FILE).read_bytes() == (hf_dir / "tokenizer.model").read_bytes()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step0 = next(r for r in records if r["step"] == 0)["val_loss"]

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in local_documents(cfg, "validation")))
    numbers = tmp_path / "source.json"
    assert cli_main(["eval", str(source_run), "--data", str(heldout), "--max-sequences", str(cfg.eval_sequences),
                     "--json", str(numbers)]) == 0
    capsys.readouterr()
    assert json.loads(numbers.read_text())["loss"] == pytest.approx(step0, rel=1e-5)

    lines.clear()
    train_local(local_config(tmp_path, f"model.init_from=hf:{hf_dir}", "train.max_steps=3",
                             f"run.resume_from={run_dir}"), log=lines.append)
    assert not any(line.startswith("initial weights") for line in lines)
    assert any("from step 2" in line for line in lines)
