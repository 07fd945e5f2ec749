"""Generation with the KV cache: the cache changes speed, never the result; sampling obeys its
options; streamed text is whole characters; `raylm generate` errors are one line."""

from __future__ import annotations

import json

import pytest
import torch

from hf_support import MIXED, one_thread, random_run, randomize
from raylm.cli import main as cli_main
from raylm.model import KVCache, ModelConfig, Transformer
from raylm.use.generate import SamplingOptions, TextStream, generate, generate_ids, next_token
from raylm.use.sample import sample

GREEDY = SamplingOptions(max_new_tokens=24, temperature=0)
pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed: int = 0, **overrides) -> Transformer:
    config = ModelConfig.preset("debug", vocab_size=512, max_seq_len=64, **overrides)
    model = Transformer(config).eval()
    randomize(model, seed)
    return model


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": None}], ids=["gqa", "mha"])
def test_cached_forward_gives_the_full_forward_logits_for_every_chunking(overrides):
    """Prompt in one go, then in chunks (start_pos > 0 with several tokens: the masked path), then
    token by token: the logits of every position equal those of one full forward."""
    model = random_model(**overrides)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)  # (2, 40, V)
        for cuts in ([40], [17, 23], [5, 9, 1, 25], [1] * 40):
            cache, start, pieces = KVCache(model.config), 0, []
            for n in cuts:
                pieces.append(model(tokens[:, start:start + n], cache, start))
                start += n
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_bf16_cached_decoding_uses_native_gqa_and_stays_close():
    model = random_model().to(torch.bfloat16)
    tokens = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens).float()
        cache = KVCache(model.config)
        first = model(tokens[:, :16], cache, 0)
        rest = [model(tokens[:, t:t + 1], cache, t) for t in range(16, 24)]
    assert cache.layers[0].k.dtype == torch.bfloat16 and cache.layers[0].k.shape[1] == 2  # kv heads, not 4
    torch.testing.assert_close(torch.cat([first, *rest], dim=1).float(), full, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": None, "tie_embeddings": True}], ids=["gqa", "mha-tied"])
def test_greedy_with_and_without_the_kv_cache_agree_token_for_token(overrides):
    model = random_model(seed=3, **overrides)
    for prompt in ([1], [1, 40, 41, 42], list(range(1, 30))):
        cached = list(generate_ids(model, prompt, GREEDY, vocab_limit=480, eos_id=None))
        uncached = list(generate_ids(model, prompt, GREEDY, vocab_limit=480, eos_id=None, use_cache=False))
        assert cached == uncached and len(cached) == GREEDY.max_new_tokens


def test_generation_goes_on_past_max_seq_len_and_samples_only_tokenizer_ids():
    """The context slides when it fills (max_seq_len 64, 150 new tokens); no id at or above the
    tokenizer's vocabulary is sampled even when those rows dominate the logits."""
    model = random_model(seed=4)
    with torch.no_grad():
        model.output.weight[480:] = 0.0
        model.output.weight[480:, 0] = 1e4  # ids >= 480 would win every argmax
    options = SamplingOptions(max_new_tokens=150, temperature=1.0, top_k=0, seed=0)
    ids = list(generate_ids(model, [1, 5, 6], options, vocab_limit=480, eos_id=None,
                            generator=options.generator()))
    assert len(ids) == 150 and max(ids) < 480


def test_top_k_top_p_temperature_and_seed():
    logits = torch.tensor([4.0, 3.0, 2.9, 1.0, 0.0, -1.0])
    draw = lambda **kw: {next_token(logits, SamplingOptions(**kw), g) for g in [torch.Generator().manual_seed(0)]
                         for _ in range(300)}
    assert draw(temperature=0) == {0}
    assert draw(temperature=5.0, top_k=2) == {0, 1}
    # softmax: 0.58, 0.21, 0.19, ...: p=0.7 keeps the two that reach it, p=0.5 the first alone
    assert draw(temperature=1.0, top_k=0, top_p=0.7) == {0, 1}
    assert draw(temperature=1.0, top_k=0, top_p=0.5) == {0}
    assert len(draw(temperature=1.0, top_k=0)) > 3
    seeded = lambda: [next_token(logits, SamplingOptions(temperature=1.0), g)
                      for g in [SamplingOptions(seed=7).generator()] for _ in range(20)]
    assert seeded() == seeded()


def test_streamed_text_is_whole_characters_and_adds_up_to_the_decoded_text(tokenizer):
    text = MIXED.replace("\u2581", "") + "🙂🙃 €ȸ"  # (sentencepiece decodes a literal ▁ as a space)
    ids = tokenizer.encode_one(text)
    assert sum(tokenizer.sp.is_byte(i) for i in ids) >= 8  # characters spelled in byte pieces
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces) and "" in pieces  # held back, never broken


def test_sample_and_generate_stream_the_same_text_they_return(tokenizer):
    model = random_model(seed=5)
    seen: list[str] = []
    text = generate(model, tokenizer, "def fibonacci(n):", SamplingOptions(max_new_tokens=20, seed=1),
                    on_text=seen.append)
    assert "".join(seen) == text
    greedy = sample(model, tokenizer, "def ", 12, temperature=0)
    assert greedy == generate(model, tokenizer, "def ", SamplingOptions(max_new_tokens=12, temperature=0),
                              use_cache=False)


def test_generate_cli_reads_prompt_files_and_stdin(tokenizer, tmp_path, capsys, monkeypatch):
    import io

    run, _, _ = random_run(tmp_path, tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("def f(x):\n    return") + "\n" + json.dumps({"prompt": "class A:"}) + "\n")
    args = ["generate", str(run), "--temperature", "0", "--max-new-tokens", "5", "--device", "cpu"]
    assert cli_main([*args, "--prompts", str(prompts)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("=== prompt 1/2 ===\ndef f(x):\n    return") and "=== prompt 2/2 ===\nclass A:" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("import os\n"))
    assert cli_main(args) == 0
    assert capsys.readouterr().out.startswith("import os\n")


@pytest.mark.parametrize("args, message", [
    (["generate", "{missing}", "--prompt", "x"], "{missing}: no such run directory or checkpoint"),
    (["generate", "{empty}", "--prompt", "x"], "{empty}: no complete checkpoint in this directory"),
    (["generate", "{empty}", "--prompt", "x", "--top-p", "0"], "--top-p=0.0: must be in (0, 1]"),
    (["generate", "{empty}", "--prompts", "{missing}"], "--prompts {missing}: cannot read"),
])
def test_generate_errors_are_one_line(tmp_path, capsys, args, message):
    paths = {"missing": tmp_path / "nope", "empty": tmp_path}
    code = cli_main([a.format(**paths) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert message.format(**paths) in err, err
