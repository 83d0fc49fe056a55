import json
import shutil

import pytest

from megapairs_ops.stages.annotate.checks import check_description, check_instructions, word_count
from megapairs_ops.stages.annotate.parsing import normalise, parse_instructions
from megapairs_ops.stages.annotate.prompts import (
    POOL_SIZE,
    PROMPTS_ROOT,
    PromptError,
    draw_demos,
    draw_word_num,
    load_prompt_set,
)
from tests.fixtures.annotation import GOOD

# -- parse_instructions ----------------------------------------------------------------------


def test_numbered_list_with_preamble_and_closing_chatter():
    text = "Here are three instructions:\n\n1. " + GOOD[0] + "\n2) " + GOOD[1] + "\n3. " + GOOD[2] + "\n\nHope this helps!"
    assert parse_instructions(text) == GOOD


@pytest.mark.parametrize("marker", ["-", "*", "•"])
def test_bulleted_list(marker):
    text = "\n".join(f"{marker} {s}" for s in GOOD)
    assert parse_instructions(text) == GOOD


def test_wrapped_item_continues_on_next_line():
    text = "1. Find the same breakfast table,\n   but with a teapot.\n2. " + GOOD[1]
    assert parse_instructions(text) == ["Find the same breakfast table, but with a teapot.", GOOD[1]]


def test_json_array_object_and_code_fence():
    assert parse_instructions(json.dumps(GOOD)) == GOOD
    assert parse_instructions(json.dumps({"instructions": GOOD})) == GOOD
    fenced = "```json\n" + json.dumps({"instructions": GOOD}, indent=2) + "\n```"
    assert parse_instructions(fenced) == GOOD
    assert parse_instructions('Sure! {"instructions": ["a cup", "a pot", "a mug"]} Done.') == ["a cup", "a pot", "a mug"]


def test_markup_quotes_and_labels_are_stripped():
    text = '1. **"Find a red cup."**\n2. Instruction 2: `Show me a blue pot.`\n3. “Retrieve a green mug.”'
    assert parse_instructions(text) == ["Find a red cup.", "Show me a blue pot.", "Retrieve a green mug."]


def test_inner_quotes_are_kept():
    assert parse_instructions("1. Find the sign that reads 'CLOSED' in blue.") == [
        "Find the sign that reads 'CLOSED' in blue."
    ]


def test_duplicates_after_normalisation_are_dropped():
    text = "1. Find a red cup.\n2. find  a RED cup\n3. Find a red cup!\n4. Show a blue pot."
    assert parse_instructions(text) == ["Find a red cup.", "Show a blue pot."]
    assert normalise("  Find  a RED cup!! ") == "find a red cup"


def test_empty_and_blank_items():
    assert parse_instructions("") == []
    assert parse_instructions(None) == []
    assert parse_instructions("1. \n2. **\n3. Find a cup.") == ["Find a cup."]
    assert parse_instructions(json.dumps(["", "  ", "Find a cup."])) == ["Find a cup."]


def test_unmarked_lines_fall_back_to_one_per_line():
    assert parse_instructions("Instructions:\nFind a cup.\nShow a pot.") == ["Find a cup.", "Show a pot."]


# -- prompts ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_set():
    return load_prompt_set("v1")


def test_pool_has_fifty_realistic_demos(prompt_set):
    assert len(prompt_set.demos) == POOL_SIZE == 50
    assert len({d.description for d in prompt_set.demos}) == 50
    for demo in prompt_set.demos:
        assert 60 <= word_count(demo.description) <= 100, demo.description
        assert 3 <= len(demo.instructions) <= 4
        # The demos teach the model what we accept: each one passes our own checks.
        assert check_instructions(list(demo.instructions), demo.description, 3) == (True, ""), demo
        assert check_description(demo.description, word_count(demo.description)) == (True, ""), demo


def test_draw_demos_is_deterministic_distinct_and_key_dependent(prompt_set):
    first = draw_demos(prompt_set.demos, 5, "0:abcd")
    assert first == draw_demos(prompt_set.demos, 5, "0:abcd")
    assert len(set(first)) == 5
    draws = {tuple(d.description for d in draw_demos(prompt_set.demos, 5, f"0:{i}")) for i in range(20)}
    assert len(draws) == 20
    used = {d for i in range(200) for d in draw_demos(prompt_set.demos, 5, f"7:{i}")}
    assert len(used) == 50  # every demo gets its turn
    with pytest.raises(ValueError):
        draw_demos(prompt_set.demos, 51, "x")


def test_draw_word_num_in_range_and_deterministic():
    values = [draw_word_num(60, 100, f"0:{i}") for i in range(500)]
    assert all(60 <= v <= 100 for v in values)
    assert min(values) == 60 and max(values) == 100
    assert values == [draw_word_num(60, 100, f"0:{i}") for i in range(500)]
    assert draw_word_num(70, 70, "x") == 70


def test_rendered_prompts_have_no_leftover_placeholders(prompt_set):
    describe = prompt_set.render_describe(73)
    assert "73 words" in describe and "{" not in describe
    demos = draw_demos(prompt_set.demos, 5, "0:p")
    text = prompt_set.render_instruct(demos, "A {curly} description.")
    assert "A {curly} description." in text
    assert all(d.description in text for d in demos)
    assert "{demos}" not in text and "{output_format}" not in text and "numbered list" in text
    structured = prompt_set.render_instruct(demos, "desc", structured=True)
    assert '{"instructions": [' in structured and "JSON" in structured


def test_missing_version_and_files_give_clear_errors(tmp_path):
    with pytest.raises(PromptError, match="prompt version 'v999' not found"):
        load_prompt_set("v999")
    shutil.copytree(PROMPTS_ROOT / "v1", tmp_path / "vx")
    (tmp_path / "vx" / "describe.txt").unlink()
    with pytest.raises(PromptError, match="describe.txt: missing"):
        load_prompt_set("vx", root=tmp_path)


def test_pool_of_wrong_size_is_rejected(tmp_path):
    shutil.copytree(PROMPTS_ROOT / "v1", tmp_path / "vx")
    demos = tmp_path / "vx" / "demos.jsonl"
    demos.write_text("\n".join(demos.read_text().splitlines()[:49]) + "\n")
    with pytest.raises(PromptError, match="49 entries; the method needs exactly 50"):
        load_prompt_set("vx", root=tmp_path)
    demos.write_text("not json\n")
    with pytest.raises(PromptError, match="demos.jsonl:1"):
        load_prompt_set("vx", root=tmp_path)


def test_missing_placeholder_is_rejected(tmp_path):
    shutil.copytree(PROMPTS_ROOT / "v1", tmp_path / "vx")
    (tmp_path / "vx" / "instruct.txt").write_text("Write instructions for {description}.")
    with pytest.raises(PromptError, match=r"\{demos\}"):
        load_prompt_set("vx", root=tmp_path)
