import json

import pytest

from megapairs_ops.config import OutputChecksConfig, parse_config
from megapairs_ops.stages.annotate.checks import (
    DEFAULT_RULES,
    TextRules,
    check_answer,
    check_description,
    check_instructions,
    ends_as_sentence,
    is_refusal,
    word_count,
)
from megapairs_ops.stages.annotate.parsing import parse_instructions
from tests.fixtures.annotation import DESCRIPTION, GOOD

WORDS_80 = " ".join(["word"] * 79) + " end."


def words(n: int) -> str:
    return " ".join(["word"] * n) + "."


# -- instructions --------------------------------------------------------------------------------


def test_check_instructions_accepts_good_set():
    assert check_instructions(GOOD, DESCRIPTION, 3) == (True, "")
    assert check_answer("\n".join(f"{i}. {s}" for i, s in enumerate(GOOD, 1))) == ""
    assert check_answer(json.dumps({"instructions": GOOD})) == ""


def test_check_instructions_too_few_distinct():
    assert check_instructions(GOOD[:2], DESCRIPTION, 3) == (False, "too_few_instructions")
    assert check_instructions([GOOD[0], GOOD[0].upper(), GOOD[1]], DESCRIPTION, 3) == (False, "too_few_instructions")


@pytest.mark.parametrize(
    "refusal",
    [
        "I'm sorry, but I can't help with that.",
        "As an AI language model, I cannot see images.",
        "I cannot generate instructions for this.",
        "Sorry, but I am unable to do that.",
        "I apologize, I do not have the ability to view images.",
    ],
)
def test_check_instructions_refusal(refusal):
    assert is_refusal(refusal)
    assert check_instructions([refusal, *GOOD], DESCRIPTION, 3) == (False, "refusal")
    assert check_instructions(parse_instructions(refusal), DESCRIPTION, 3) == (False, "refusal")


def test_check_instructions_copies_description():
    assert check_instructions([DESCRIPTION, *GOOD], DESCRIPTION, 3) == (False, "copies_description")
    first_sentence = DESCRIPTION.split(". ")[0] + "."
    assert check_instructions([first_sentence, *GOOD], DESCRIPTION, 3) == (False, "copies_description")


def test_check_instructions_too_long():
    long = "Find " + "a very red cup " * 40 + "today."
    assert check_instructions([long, *GOOD], DESCRIPTION, 3) == (False, "instruction_too_long")
    assert check_instructions(GOOD, DESCRIPTION, 3, max_chars=20) == (False, "instruction_too_long")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("Find the same table with a teapot.<|eot_id|>", "template_token"),
        ("Find the same table with a teapot. <|im_end|> {{{", "template_token"),
        ("[INST] Find the same table with a teapot.", "template_token"),
        ("Find the same table with a teapot.</s>", "template_token"),
        ("Find the <image> table with a teapot.", "template_token"),
        ("Find the same table with a teapot <|reserved_special_token_3|>.", "template_token"),
        ('Find the same table with a teapot.", "Show me', "json_debris"),
        ("Find the same table {with a teapot}.", "json_debris"),
        ("Find the same table with a teapot.\\nShow me a mug.", "json_debris"),
        ("```Find the same table with a teapot.", "unclosed_fence"),
        ("## Find the same table with a teapot.", "markdown_debris"),
        ("Find the same table with a <b>teapot</b>.", "markdown_debris"),
        ("1. Find the same table with a teapot.", "leftover_numbering"),
        ("(2) Find the same table with a teapot.", "leftover_numbering"),
        ("Instruction 3 Find the same table with a teapot.", "leftover_numbering"),
        ("Find the same table with a teapot. 2. Show me a mug.", "leftover_numbering"),
        ("Find Image 2 with a teapot instead of the mug.", "meta_language"),
        ("Show the second picture, where tea is served.", "meta_language"),
        ("Like the first image, but with a teapot.", "meta_language"),
        ("Find the target image with a teapot.", "meta_language"),
        ("As in the description, swap the mug for a teapot.", "meta_language"),
        ("Replace the glass coffee mug with a flowered ceramic", "unfinished_sentence"),
        ("Replace the glass coffee mug with a teapot and", "unfinished_sentence"),
    ],
)
def test_damaged_instruction_is_rejected_with_its_reason(bad, reason):
    assert check_instructions([*GOOD, bad], DESCRIPTION, 3) == (False, reason)


def test_fine_instructions_are_not_mistaken_for_damage():
    fine = [
        'Find the sign that reads "OPEN 24 hours" above the door.',
        "Show me the same dog (a beagle) on a beach instead of a lawn!",
        "Is there a version of this street at night, with 2 street lamps lit?",
        "Find this kitchen but with images of fruit on the wall.",
        "Show me the first snow of the season on this same street.",
    ]
    assert check_instructions(fine, DESCRIPTION, 3) == (True, "")


def test_sentence_end_can_be_relaxed():
    relaxed = TextRules.from_config(OutputChecksConfig(require_sentence_end=False))
    cut = [g.rstrip(".") for g in GOOD]
    assert check_instructions(cut, DESCRIPTION, 3) == (False, "unfinished_sentence")
    assert check_instructions(cut, DESCRIPTION, 3, rules=relaxed) == (True, "")


def test_token_and_phrase_lists_come_from_config():
    cfg = parse_config({
        "encoders": [{"name": "c", "kind": "classic_color_layout"}],
        "annotate": {"checks": {"template_tokens": {"house": ["<<END>>"]}, "meta_phrases": ["left photo"]}},
    })
    rules = TextRules.from_config(cfg.annotate.checks)
    assert rules.template_tokens == ("<<END>>",)
    assert check_instructions([*GOOD, "Find the left photo with a teapot."], DESCRIPTION, 3, rules=rules) == (False, "meta_language")
    assert check_instructions([*GOOD, "Find the same table.<<END>>"], DESCRIPTION, 3, rules=rules) == (False, "template_token")
    # The families a user did not list are gone, but any <|...|> token still counts.
    assert check_instructions([*GOOD, "Find Image 2 with a teapot."], DESCRIPTION, 3, rules=rules) == (True, "")
    assert check_instructions([*GOOD, "Find a teapot.<|eot_id|>"], DESCRIPTION, 3, rules=rules) == (False, "template_token")


# -- raw instruct answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ('{"instructions": ["Find the same table.", "Show me a tea', "unclosed_json"),
        ('[\n  "Find the same table.",\n  "Show me a teapot."', "unclosed_json"),
        ('Sure: {"instructions": ["Find the same table.", "Show ', "unclosed_json"),
        ('```json\n{"instructions": ["Find the same table.", "Show me a teapot.", "Swap it."]}', "unclosed_fence"),
        ("1. Find the same table.\n2. Show me a teapot.\n3. Swap the mug.\n\n<|eot_id|>", "template_token"),
        ("1. Find the same table.\n2. Show me a teapot.\n3. Swap the mug.<|im_end|>\n<|im_start|>user", "template_token"),
    ],
)
def test_damaged_answer_is_rejected_before_parsing(answer, reason):
    assert check_answer(answer) == reason


def test_a_list_cut_in_its_last_item_is_rejected():
    answer = "1. " + GOOD[0] + "\n2. " + GOOD[1] + "\n3. " + GOOD[2] + "\n4. Replace the mug with a flowered"
    assert check_answer(answer) == ""
    assert check_instructions(parse_instructions(answer), DESCRIPTION, 3) == (False, "unfinished_sentence")


def test_structured_and_list_answers_meet_the_same_checks():
    items = [*GOOD, "Find Image 2, but with a teapot."]
    for answer in (json.dumps({"instructions": items}), "\n".join(f"{i}. {s}" for i, s in enumerate(items, 1))):
        assert check_answer(answer) == ""
        assert check_instructions(parse_instructions(answer), DESCRIPTION, 3) == (False, "meta_language")
    numbered_json = json.dumps({"instructions": [f"{i}. {s}" for i, s in enumerate(GOOD, 1)]})
    assert check_instructions(parse_instructions(numbered_json), DESCRIPTION, 3) == (False, "leftover_numbering")


# -- descriptions --------------------------------------------------------------------------------


def test_check_description_counts_words_within_tolerance():
    assert check_description(WORDS_80, 80) == (True, "")
    assert check_description(words(40), 80) == (True, "")  # lower edge: 80 * 0.5
    assert check_description(words(120), 80) == (True, "")  # upper edge: 80 * 1.5
    assert check_description(words(39), 80) == (False, "description_too_short")
    assert check_description(words(121), 80) == (False, "description_too_long")
    assert check_description("   ", 80) == (False, "empty_description")
    assert check_description(None, 80) == (False, "empty_description")
    assert check_description("I'm sorry, I cannot see the images. " + WORDS_80, 80) == (False, "refusal")
    assert check_description(WORDS_80, 80, tolerance=0.1) == (True, "")
    assert check_description(words(70), 80, tolerance=0.1) == (False, "description_too_short")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda t: t + " <|im_end|> {{{", "template_token"),
        (lambda t: t + "<|eot_id|>", "template_token"),
        (lambda t: "<image>\n" + t, "template_token"),
        (lambda t: t.rsplit(" ", 3)[0], "unfinished_sentence"),
        (lambda t: '{"description": "' + t + '"}', "json_debris"),
        (lambda t: "```\n" + t, "unclosed_fence"),
        (lambda t: "```\n" + t + "\n```", "markdown_debris"),
        (lambda t: "## Comparison\n" + t, "markdown_debris"),
        (lambda t: t.replace("Both", "**Both**", 1), "markdown_debris"),
        (lambda t: "- " + t.replace(". ", ".\n- "), "markdown_debris"),
    ],
)
def test_damaged_description_is_rejected_with_its_reason(damage, reason):
    text = DESCRIPTION + " " + DESCRIPTION
    assert check_description(text, word_count(text)) == (True, "")
    damaged = damage(text)
    assert check_description(damaged, word_count(text)) == (False, reason)


def test_descriptions_may_name_the_query_and_target_images():
    text = "The query image shows a red cup, while the target image shows a blue one. " * 4
    assert check_description(text.strip(), word_count(text)) == (True, "")


def test_sentence_end_allows_closing_quotes_and_brackets():
    assert ends_as_sentence('He said "stop."')
    assert ends_as_sentence("A cup (blue).)")
    assert ends_as_sentence("Is it blue?")
    assert not ends_as_sentence("A cup with a")
    assert not ends_as_sentence("A cup,")


def test_word_count_ignores_punctuation_tokens():
    assert word_count("A red cup — on a table , really .") == 7


def test_ordinary_description_is_not_a_refusal():
    assert not is_refusal(DESCRIPTION)
    assert not is_refusal("The sign in the target image reads 'sorry we are closed'.")


def test_default_rules_cover_every_family_of_the_config():
    families = OutputChecksConfig().template_tokens
    assert {"<|im_end|>", "<|eot_id|>", "</s>", "[INST]", "<image>"} <= set(DEFAULT_RULES.template_tokens)
    assert set(DEFAULT_RULES.template_tokens) == {t for tokens in families.values() for t in tokens}
