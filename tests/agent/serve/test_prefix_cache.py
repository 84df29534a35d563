"""The prefix cache: a follow-up turn of a chat reuses the KV cache of the prompt before it, and
gets exactly the tokens a cold request gets, alone and with several clients at once."""

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from slmops.agent.serve.prefix_cache import MIN_SHARED_TOKENS, PrefixCache
from slmops.agent.serve.runtime import LoadedVariant, Sampling

GREEDY = ("greedy",)


def prompt(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_the_longest_shared_prefix_wins_and_leaves_a_token_to_prefill() -> None:
    cache = PrefixCache(budget_bytes=10_000, bytes_per_token=1)
    short, long = object(), object()
    cache.put(GREEDY, short, prompt(20), capacity=100)
    cache.put(GREEDY, long, prompt(40), capacity=100)
    reuse = cache.take(GREEDY, prompt(40), needed=60)
    assert reuse is not None and reuse.generator is long and reuse.tokens == 39  # the last one is prefilled again
    assert len(cache) == 1 and cache.hits == 1  # taken out: no second request can share it


def test_no_reuse_across_sampling_too_small_a_buffer_or_a_short_prefix() -> None:
    cache = PrefixCache(budget_bytes=10_000, bytes_per_token=1)
    cache.put(GREEDY, object(), prompt(40), capacity=50)
    assert cache.take(("sampled", 0.7), prompt(40), needed=45) is None
    assert cache.take(GREEDY, prompt(40), needed=51) is None
    assert cache.take(GREEDY, prompt(MIN_SHARED_TOKENS - 1) + [999] * 10, needed=30) is None
    assert cache.take(GREEDY, prompt(MIN_SHARED_TOKENS) + [999] * 10, needed=30) is not None
    assert cache.misses == 3


def test_idle_generators_stay_within_the_budget_least_recently_used_first() -> None:
    cache = PrefixCache(budget_bytes=250, bytes_per_token=1)
    first, second, third = object(), object(), object()
    cache.put(GREEDY, first, prompt(30, 0), capacity=100)
    cache.put(GREEDY, second, prompt(30, 100), capacity=100)
    cache.put(GREEDY, third, prompt(30, 200), capacity=100)
    assert len(cache) == 2 and cache.held_bytes == 200
    assert cache.take(GREEDY, prompt(30, 0), needed=40) is None  # the oldest went
    assert cache.take(GREEDY, prompt(30, 200), needed=40).generator is third  # type: ignore[union-attr]
    cache.put(GREEDY, object(), prompt(30), capacity=300)  # larger than the whole budget: not kept
    assert len(cache) == 1


def test_seeded_and_fixed_length_requests_never_reuse() -> None:
    assert Sampling(seed=1).cache_key() is None and Sampling(ignore_eos=True).cache_key() is None
    assert Sampling().cache_key() == Sampling().cache_key() != Sampling(temperature=0.7).cache_key()


def chat(variant: LoadedVariant, messages: list[dict[str, str]], max_new: int = 16) -> tuple[list[int], int]:
    """Greedy tokens of the assistant's turn, and how many prompt tokens came from the cache."""
    generation = variant.start(variant.encode(variant.chat_prompt(messages)), max_new, Sampling())
    tokens = []
    while (token := generation.step()) is not None:
        tokens.append(token)
    generation.release()
    return tokens, generation.stats.cached_prompt_tokens


def test_a_follow_up_turn_reuses_the_prompt_before_it_and_gives_the_cold_tokens(tiny_export: Path) -> None:
    warm = LoadedVariant.load(tiny_export / "variants" / "cpu-int4", prefix_cache_bytes=64 * 2**20)
    cold = replace(warm, prefix_cache=None)
    messages = [
        {"role": "system", "content": "You are a careful assistant who answers in one short sentence."},
        {"role": "user", "content": "Name a river in Europe."},
    ]
    first, cached = chat(warm, messages)
    assert cached == 0
    first_prompt = warm.encode(warm.chat_prompt(messages))
    messages += [
        {"role": "assistant", "content": warm.tokenizer.decode(first)},
        {"role": "user", "content": "Another?"},
    ]
    follow_up, cached = chat(warm, messages)
    assert cached >= len(first_prompt) - 1  # everything the first turn prefilled
    assert follow_up == chat(cold, messages)[0]
    assert warm.prefix_cache is not None and warm.prefix_cache.hits == 1


def test_several_clients_at_once_get_the_cold_answers_from_the_cache(start_agent, session_bundle: Path) -> None:
    warm_agent = start_agent(session_bundle, prefix_cache_mib=64, max_active_requests=4)
    warm = warm_agent.openai()
    cold = start_agent(session_bundle, prefix_cache_mib=0, max_active_requests=4).openai()

    def ask(client, messages: list[dict[str, str]]):
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)

    def conversation(topic: str) -> tuple:
        messages = [
            {"role": "system", "content": f"You are an expert on {topic}; answer in a few words, then stop."},
            {"role": "user", "content": f"Tell me one fact about {topic}."},
        ]
        first = ask(warm, messages)
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "And another one?"},
        ]
        return first, messages

    with ThreadPoolExecutor(4) as pool:
        histories = list(pool.map(conversation, ["rivers", "mountains", "deserts", "forests"]))  # first turns at once
        follow_ups = list(pool.map(lambda history: ask(warm, history[1]), histories))  # then the second turns
    for (first, messages), warm_answer in zip(histories, follow_ups, strict=True):
        cold_answer = ask(cold, messages)
        assert warm_answer.choices[0].message.content == cold_answer.choices[0].message.content
        cached = warm_answer.usage.prompt_tokens_details.cached_tokens
        assert cached >= first.usage.prompt_tokens - 1, json.dumps(warm_answer.usage.model_dump())
        assert cold_answer.usage.prompt_tokens_details.cached_tokens == 0
    metrics = warm_agent.http().get("/metrics").text
    counted = next(line for line in metrics.splitlines() if line.startswith("slmops_agent_cached_prompt_tokens_total"))
    assert float(counted.split()[1]) == sum(a.usage.prompt_tokens_details.cached_tokens for a in follow_ups)


def test_keeping_replies_reuses_the_reply_too(tiny_export: Path) -> None:
    """prefix_cache_replies: the next turn prefills only its new message (as llama.cpp's server does)."""
    warm = LoadedVariant.load(tiny_export / "variants" / "cpu-int4", prefix_cache_bytes=64 * 2**20, reuse_decoded=True)
    first_prompt = warm.encode(warm.chat_prompt([{"role": "user", "content": "Name a river in Europe."}]))
    generation = warm.start(first_prompt, 12, Sampling())
    reply = []
    while (token := generation.step()) is not None:
        reply.append(token)
    generation.release()
    follow_up = first_prompt + reply + warm.encode("<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n")
    second = warm.start(follow_up, 4, Sampling())
    assert second.stats.cached_prompt_tokens >= len(first_prompt) + len(reply) - 1
    second.release()
