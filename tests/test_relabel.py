"""Relabelled copies of classification tasks (training.relabel): new answer words that only the instruction gives."""

from __future__ import annotations

import pytest

from training.data import Example, Task
from training.relabel import SEPARATOR, answer_words, relabel_task, relabel_tasks


def _task(definition: str, answers: list[str], name: str = "task1_demo") -> Task:
    items = [Example(f"input {i}", [answers[i % len(answers)]]) for i in range(10)]
    return Task(name=name, definition=definition, descriptions=["A paraphrase that names no answer."],
                positive_examples=items[:2], train=items[:8], test=items[8:])


def test_quoted_answers_are_replaced_and_outputs_follow_the_same_mapping():
    t = _task('Answer "Yes." if the review is positive, otherwise answer "no".', ["Yes.", "No."])
    r = relabel_task(t)
    assert r is not None and r.name == f"task1_demo{SEPARATOR}0"
    old_to_new = {e.outputs[0]: n.outputs[0] for e, n in zip(t.train, r.train, strict=True)}
    new_yes, new_no = old_to_new["Yes."], old_to_new["No."]  # "No." is capitalised where the definition has "no"
    assert new_yes != new_no and new_yes.endswith(".") and new_no.endswith(".")  # punctuation kept
    assert {new_yes[:-1].lower(), new_no[:-1].lower()}.isdisjoint({"yes", "no"})
    # the definition names the new words where it quoted the old ones, in the same case, and no longer the old
    assert f'"{new_yes}"' in r.definition and f'"{new_no[:-1].lower()}"' in r.definition
    assert '"Yes' not in r.definition and '"no"' not in r.definition
    assert r.descriptions == [r.definition]  # the paraphrase names no answer: the copy is described by its definition
    assert [e.input for e in r.test] == [e.input for e in t.test] and len(r.positive_examples) == 2


def test_an_answer_named_unquoted_keeps_its_meaning_and_a_sentence_maps_it():
    t = _task("Classify the tweet as sarcastic or non-sarcastic. A sarcastic tweet mocks.",
              ["sarcastic", "non-sarcastic"])
    r = relabel_task(t)
    assert r.definition.startswith("Classify the tweet as sarcastic or non-sarcastic. A sarcastic tweet mocks.")
    mapping = {e.outputs[0]: n.outputs[0] for e, n in zip(t.train, r.train, strict=True)}
    assert r.definition.endswith(f' Answer "{mapping["sarcastic"]}" for sarcastic, '
                                 f'"{mapping["non-sarcastic"]}" for non-sarcastic.') or \
        r.definition.endswith(f' Answer "{mapping["non-sarcastic"]}" for non-sarcastic, '
                              f'"{mapping["sarcastic"]}" for sarcastic.')


@pytest.mark.parametrize("definition,answers", [
    ('Answer "A" or "B".', ["A", "B"]),  # lone letters: a definition uses them for other things too
    ("Pick the right colour.", ["Red", "Blue"]),  # the definition does not name the answers
    ('Answer "Yes".', ["Yes"]),  # one answer is no classification
    ("Say one, two, three, four, five, six or seven.", ["one", "two", "three", "four", "five", "six", "seven"]),
])
def test_tasks_that_do_not_qualify_are_left_out(definition, answers):
    t = _task(definition, answers)
    assert answer_words(t) is None and relabel_task(t) is None and relabel_tasks([t], 2) == []


def test_copies_are_deterministic_distinct_and_never_reuse_the_definitions_words():
    t = _task('Write "True" when the claim holds, else "False". Never write Yes.', ["True", "False"])
    a, b = relabel_tasks([t], 2), relabel_tasks([t], 2)
    assert [x.definition for x in a] == [x.definition for x in b] and len(a) == 2
    assert a[0].definition != a[1].definition
    for copy in a:
        words = {o.outputs[0] for o in copy.train}
        assert "Yes" not in words and "No" not in words  # "Yes" is in the definition; ("Yes", "No") is never drawn


def test_real_train_tasks_yield_consistent_copies():
    from training.data import DEFAULT_DATA, load_split

    if not (DEFAULT_DATA / "manifest.json").exists():
        pytest.skip("needs ../shared/data/sni")
    tasks = load_split("train")
    copies = relabel_tasks(tasks, 1)
    assert 50 <= len(copies) <= len(tasks)
    by_name = {t.name: t for t in tasks}
    for c in copies:
        old = by_name[c.name.split(SEPARATOR)[0]]
        new_words = {e.outputs[0].rstrip(".!") for e in c.train + c.test}
        assert len(new_words) >= 2 and new_words.isdisjoint(answer_words(old))
        said = c.definition.lower()
        assert all(f'"{w.lower()}"' in said or f"'{w.lower()}'" in said or f"“{w.lower()}”" in said
                   for w in new_words)  # the instruction gives every new answer word
