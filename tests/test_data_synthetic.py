"""Synthetic story generator: determinism, structure, variety, speed, Hub text format."""

import random
import re
import time
from collections import Counter

from tsfast.data.sources import TextSplit
from tsfast.data.synthetic import PLANS, generate_stories, synthetic_text


def test_deterministic_for_a_seed_and_sliceable():
    seed = random.randrange(10**6)
    stories = generate_stories(60, seed=seed)
    assert generate_stories(60, seed=seed) == stories
    assert generate_stories(20, seed=seed, start=25) == stories[25:45]
    other = generate_stories(60, seed=seed + 1)
    assert sum(a == b for a, b in zip(stories, other, strict=True)) == 0


def test_stories_have_a_beginning_a_problem_and_an_ending():
    for story in generate_stories(500, seed=random.randrange(10**6)):
        paragraphs = story.split("\n")
        assert 3 <= len(paragraphs) <= 5, story
        assert story == story.strip() and "{" not in story and "}" not in story, story
        assert "<|endoftext|>" not in story
        for paragraph in paragraphs:
            assert paragraph[0].isupper() or paragraph[0] == '"', paragraph
            assert paragraph[-1] in '.!?"', paragraph
        assert story.count('"') % 2 == 0, story


def test_variety():
    stories = generate_stories(3000, seed=random.randrange(10**6))
    assert len(set(stories)) == len(stories)
    first_sentences = Counter(re.split(r"(?<=[.!?]) ", s)[0] for s in stories)
    assert len(first_sentences) > 1000  # names x kinds x traits x openings
    assert first_sentences.most_common(1)[0][1] < 20
    words = Counter(w.lower() for s in stories for w in re.findall(r"[A-Za-z']+", s))
    assert len(words) > 500
    # Every story plan shows up: each ends with a lesson only that plan uses.
    lessons = ["always kept it close", "teamwork is best", "sharing makes everyone happy",
               "being brave means", "broken things can be fixed", "saying hello can make",
               "small friends need help", "grown-ups say things for a reason",
               "practice makes things easier", "gifts from the heart", "rainy day can still"]
    assert len(lessons) == len(PLANS)
    for lesson in lessons:
        assert any(lesson in s for s in stories), lesson
    # Stories differ in length, too.
    lengths = [len(s) for s in stories]
    assert max(lengths) > 2 * min(lengths)


def test_thousands_of_stories_per_second():
    start = time.perf_counter()
    generate_stories(3000, seed=random.randrange(10**6))
    seconds = time.perf_counter() - start
    assert seconds < 3.0, f"3000 stories took {seconds:.2f} s"  # ~0.2 s unloaded


def test_text_is_in_the_hub_format(tmp_path):
    seed = random.randrange(10**6)
    text = synthetic_text(40, seed=seed)
    assert text.endswith("\n<|endoftext|>\n")
    assert text.count("\n<|endoftext|>\n") == 40
    path = tmp_path / "synthetic.txt"
    path.write_text(text, encoding="utf-8")
    parsed = [story for (kind, batch), _ in TextSplit(path).jobs(limit=None) for story in batch]
    assert parsed == generate_stories(40, seed=seed)
