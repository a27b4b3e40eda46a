"""Prompts have exactly the requested token count in the target tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.loadgen.errors import TokenizerError
from pdserve.loadgen.prompts import PromptBuilder, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
CANDIDATES = [REPO / "services" / "demo_model", Path("/tmp/smoke_model")]
MODEL_DIR = next((p for p in CANDIDATES if (p / "tokenizer.json").is_file()), None)
pytestmark = pytest.mark.skipif(MODEL_DIR is None, reason="no demo model tokenizer")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(MODEL_DIR))


@pytest.mark.parametrize("n", [2, 3, 17, 374, 1020, 4000])
def test_completion_prompts_are_exact(tokenizer, n):
    builder = PromptBuilder(tokenizer, chat=False, seed=7)
    prompt = builder.build(index=n, n_tokens=n)
    assert prompt.tokens == n
    assert len(tokenizer(prompt.text)["input_ids"]) == n  # as the server counts: BOS included


@pytest.mark.parametrize("n", [40, 500])
def test_chat_prompts_are_exact_after_the_template(tokenizer, n):
    builder = PromptBuilder(tokenizer, chat=True, seed=7)
    prompt = builder.build(index=0, n_tokens=n)
    rendered = tokenizer.apply_chat_template(builder.messages(prompt.text), add_generation_prompt=True,
                                             tokenize=False)
    assert len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) == n == prompt.tokens
    assert builder.overhead > 1  # the template's own tokens are part of the count


def test_too_short_is_raised_to_the_minimum(tokenizer):
    builder = PromptBuilder(tokenizer, chat=False)
    assert builder.build(0, 1).tokens == builder.min_tokens == builder.overhead + 1


def test_deterministic_and_distinct(tokenizer):
    a, b = PromptBuilder(tokenizer, chat=False, seed=3), PromptBuilder(tokenizer, chat=False, seed=3)
    assert a.build(5, 100).text == b.build(5, 100).text
    assert a.build(5, 100).text != a.build(6, 100).text
    # Without shared prefixes, two prompts agree on (almost) nothing at the start.
    t5, t6 = tokenizer(a.build(5, 100).text)["input_ids"], tokenizer(a.build(6, 100).text)["input_ids"]
    assert sum(x == y for x, y in zip(t5[1:], t6[1:])) < 10


def test_shared_prefixes(tokenizer):
    builder = PromptBuilder(tokenizer, chat=False, seed=1, prefix_fraction=0.5, prefix_len=64, prefix_groups=2)
    prompts = [builder.build(i, 200) for i in range(200)]
    shared = [p for p in prompts if p.prefix_group is not None]
    assert 0.4 < len(shared) / len(prompts) < 0.6
    assert {p.prefix_group for p in shared} == {0, 1}
    assert all(p.tokens == 200 for p in prompts)
    by_group: dict[int, set[tuple[int, ...]]] = {}
    for p in shared:
        ids = tuple(tokenizer(p.text)["input_ids"][:65])  # BOS + 64 prefix tokens
        by_group.setdefault(p.prefix_group, set()).add(ids)
    assert all(len(heads) == 1 for heads in by_group.values())  # same prefix within a group
    assert by_group[0] != by_group[1]
    # A prompt shorter than the prefix gets the prefix cut to its length, still exact.
    short = next(builder.build(i, 10) for i in range(50) if builder.build(i, 10).prefix_group is not None)
    assert short.tokens == 10


def test_unknown_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="--tokenizer"):
        load_tokenizer(str(tmp_path / "no-such-model"))
