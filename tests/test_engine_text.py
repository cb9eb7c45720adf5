"""The engine's text events (Handle.events) against Gemma.generate on the tiny demo model: same text, same
parsed result; a stop string ends the sequence at the same place; the engine thread serves several at once."""

from __future__ import annotations

import pytest

import gemma_mlx
from gemma_mlx.events import Event
from gemma_mlx.tiny import write_demo_model

GREEDY = dict(greedy=True, max_tokens=24)


@pytest.fixture(scope="module")
def g(tmp_path_factory):
    return gemma_mlx.load(write_demo_model(tmp_path_factory.mktemp("engine_text") / "tiny"))


def collect(handle):
    events = list(handle.events())
    assert all(isinstance(e, Event) for e in events) and events[-1].done
    assert not any(e.done for e in events[:-1])
    return events


def test_events_equal_solo_generate(g):
    prompts = ["hello there", "a longer prompt about nothing at all, twice over", "x"]
    engine = g.engine(max_batch=4, prefill_chunk=8)
    handles = [engine.submit(g.prepare(p), g.options(**GREEDY)) for p in prompts]
    for p, h in zip(prompts, handles):
        events = collect(h)
        solo = g.generate(p, **GREEDY)
        result = events[-1].result
        assert result.text == solo.text and result.tokens == solo.tokens
        assert "".join(e.text for e in events[:-1]) == "".join(e.text for e in g.stream(p, **GREEDY))
        assert [t for e in events for t in e.tokens] == solo.tokens
        assert result.finish_reason == solo.finish_reason


def test_stop_string_ends_the_sequence_where_generate_does(g):
    solo = g.generate("stop here", **GREEDY)
    visible = solo.content
    assert len(visible) > 6, "the tiny model's greedy reply is long enough to hold a stop string"
    stop = visible[3:5]
    want = g.generate("stop here", stop=stop, **GREEDY)
    engine = g.engine()
    h = engine.submit(g.prepare("stop here"), g.options(stop=stop, **GREEDY))
    result = collect(h)[-1].result
    assert want.finish_reason == result.finish_reason == "stop_string"
    assert result.text == want.text and result.tokens == want.tokens
    assert result.stats.generated_tokens == len(want.tokens)


def test_engine_thread_serves_concurrent_handles(g):
    import threading

    engine = g.engine(max_batch=2).start()
    try:
        prompts = ["one", "two two", "three three three"]
        out = {}

        def consume(p):
            h = engine.submit(g.prepare(p), g.options(**GREEDY))
            out[p] = collect(h)[-1].result.text

        threads = [threading.Thread(target=consume, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert {p: g.generate(p, **GREEDY).text for p in prompts} == out
    finally:
        engine.close()


def test_events_need_a_tokenizer(g):
    from gemma_mlx.engine import Engine
    from gemma_mlx.errors import InputError

    h = Engine(g.model).submit(g.prepare("hi"), g.options(**GREEDY))
    with pytest.raises(InputError, match="tokenizer"):
        next(h.events())


def test_asyncio_consumers_and_early_exit_cancels(g):
    import asyncio

    engine = g.engine(max_batch=4).start()
    try:
        prompts = ["alpha", "beta beta", "gamma gamma gamma"]

        async def consume(p):
            h = engine.submit(g.prepare(p), g.options(**GREEDY))
            return [e async for e in h.aevents()][-1].result.text

        async def leave_early():
            h = engine.submit(g.prepare("delta"), g.options(greedy=True, max_tokens=200))
            async for e in h.aevents():
                if e.tokens:
                    break  # the consumer goes away: the sequence is cancelled
            await asyncio.get_running_loop().run_in_executor(None, h.result)  # its last event still comes
            return h

        async def main():
            return await asyncio.gather(*(consume(p) for p in prompts), leave_early())

        *texts, early = asyncio.run(main())
        assert texts == [g.generate(p, **GREEDY).text for p in prompts]
        assert early.finish_reason == "interrupted" and len(early.tokens) < 200
    finally:
        engine.close()


def test_batch_generate_equals_generate_with_image_audio_video_and_per_prompt_options(g, fixtures_dir):
    image = fixtures_dir / "media" / "chelsea.png"
    audio = fixtures_dir / "media" / "speech_16k.flac"
    video = fixtures_dir / "media" / "bigbuckbunny.mp4"
    prompts = [
        "plain text",
        [{"role": "user", "content": "a message list"}],
        {"prompt": "what is in the picture?", "images": [image], "max_tokens": 9},
        {"prompt": "what is said?", "audios": [audio], "system": "Be brief."},
        {"prompt": "sampled", "temperature": 0.8, "seed": 7, "greedy": False},
        {"prompt": "what happens?", "videos": [video], "max_tokens": 6},
    ]
    results = gemma_mlx.batch_generate(g, prompts, max_batch=3, **GREEDY)
    assert len(results) == len(prompts)
    for item, result in zip(prompts, results):
        spec = dict(item) if isinstance(item, dict) else {"prompt": item}
        p = spec.pop("prompt")
        want = g.generate(p, **{**GREEDY, **spec})
        assert result.tokens == want.tokens and result.text == want.text
    assert len(results[2].tokens) <= 9


def test_batch_generate_refuses_bad_prompts(g):
    from gemma_mlx.errors import InputError

    with pytest.raises(InputError, match="list of prompts"):
        g.batch_generate("one string")
    with pytest.raises(InputError, match="prompt 1: unknown key"):
        g.batch_generate(["ok", {"prompt": "x", "imagez": []}])
    with pytest.raises(InputError, match="needs the key 'prompt'"):
        g.batch_generate([{"images": []}])
