"""The onnxruntime-genai runtime the agent, evaluation and chat share."""

from pathlib import Path

import pytest

from slmops.agent.serve.runtime import GenerationStats, LoadedVariant
from slmops.errors import RuntimeLoadError


@pytest.fixture(scope="module")
def loaded(tiny_export: Path) -> LoadedVariant:
    return LoadedVariant.load(tiny_export / "variants" / "cpu-int4")


def test_chat_prompt_uses_the_bundle_template(loaded: LoadedVariant) -> None:
    prompt = loaded.chat_prompt([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_generation_is_greedy_and_counted(loaded: LoadedVariant) -> None:
    ids = loaded.encode("The capital of France is")
    first, second = GenerationStats(), GenerationStats()
    a = list(loaded.generate(ids, 12, first, ignore_eos=True))
    b = list(loaded.generate(ids, 12, second, ignore_eos=True))
    assert a == b and len(a) == 12
    assert first.prompt_tokens == len(ids) and first.new_tokens == 12
    assert 0 < first.time_to_first_token_s <= first.total_s


def test_streamed_text_matches_decoding(loaded: LoadedVariant) -> None:
    tokens = list(loaded.generate(loaded.encode("Once upon a time"), 10, ignore_eos=True))
    assert "".join(loaded.stream_text(iter(tokens))) == loaded.tokenizer.decode(tokens)


def test_prompt_longer_than_the_context_is_refused(loaded: LoadedVariant) -> None:
    with pytest.raises(ValueError, match=r"exceeds the context length of \d+ tokens"):
        next(loaded.generate([1] * loaded.context_length, 1))


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match=r"no genai_config\.json"):
        LoadedVariant.load(tmp_path)
