"""A procedural generator of simple children's stories: the corpus for machines with no network.

Each story has a cast (a hero, a friend, a grown-up), a place, a favourite object and
feelings, and follows one of eleven plans (a lost toy, a toy stuck up high, learning to
share, a fear faced, a broken toy, a new friend, a hurt animal helped, a warning ignored,
a hard task learned, a gift made, a rainy day). Every plan has a beginning, a problem
and an ending, and every sentence is picked from several phrasings, so stories differ in
words as well as in plot. Paragraphs are separated by single newlines, as in
TinyStoriesV2-GPT4.

Story i of seed s is drawn from its own `random.Random(f"...:{s}:{i}")`, so any slice of
the corpus can be generated alone (prepare's workers do so) and a seed always gives the
same stories.

Text format of `synthetic_text` (the Hub's TinyStoriesV2-GPT4-*.txt format): each story
followed by a line holding only `<|endoftext|>`:

    Once upon a time, there was ...
    ...
    <|endoftext|>
    One sunny day, ...
    <|endoftext|>
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tsfast.data import story_words as words

GENERATOR_VERSION = 2  # bump when the stories for a seed change: prepared corpora are redone
STORY_SEPARATOR = "\n<|endoftext|>\n"


@dataclass(frozen=True)
class Character:
    name: str
    kind: str  # "girl", "boy" or an animal such as "puppy"
    trait: str
    he: str  # "he" or "she"

    @property
    def him(self) -> str:
        return "him" if self.he == "he" else "her"

    @property
    def his(self) -> str:
        return "his" if self.he == "he" else "her"

    def introduction(self) -> str:
        return f"{_article(self.trait)} {self.trait} {self.kind} named {self.name}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_SENTENCE_START = re.compile(r"([.!?] )([a-z])")  # not after a closing quote: '"Hi!" said'


def _capitalize(sentence: str) -> str:
    """Upper-case the first letter and every letter that starts a later sentence."""
    sentence = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), sentence)
    return sentence[:1].upper() + sentence[1:]


def _new_character(rng: random.Random, taken: set[str]) -> Character:
    if rng.random() < 0.6:
        kind = rng.choice(words.PERSON_KINDS)
        names = words.GIRL_NAMES if kind == "girl" else words.BOY_NAMES
        he = "she" if kind == "girl" else "he"
    else:
        kind = rng.choice(words.ANIMAL_KINDS)
        names = words.PET_NAMES + words.GIRL_NAMES[:6] + words.BOY_NAMES[:6]
        he = rng.choice(("he", "she"))
    name = rng.choice([n for n in names if n not in taken])
    taken.add(name)
    return Character(name=name, kind=kind, trait=rng.choice(words.TRAITS), he=he)


class _Tale:
    """One story being written: the cast, the setting, and helpers to phrase sentences."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        taken: set[str] = set()
        self.hero = _new_character(rng, taken)
        self.friend = _new_character(rng, taken)
        adult, adult_he = rng.choice(words.GROWN_UPS)
        place, sights, hiding_spot, place_fun = rng.choice(words.PLACES)
        obj, adjectives, use, breakage = rng.choice(words.OBJECTS)
        self.fields = {
            "hero": self.hero.name, "he": self.hero.he, "him": self.hero.him,
            "his": self.hero.his, "hkind": self.hero.kind,
            "friend": self.friend.name, "fhe": self.friend.he, "fhim": self.friend.him,
            "fhis": self.friend.his, "fkind": self.friend.kind,
            "adult": adult, "ahe": adult_he, "ahim": "him" if adult_he == "he" else "her",
            "place": place, "sight1": sights[0], "sight2": sights[1], "sight3": sights[2],
            "spot": hiding_spot, "place_fun": place_fun,
            "obj": obj, "adj": rng.choice(adjectives), "use": use, "breakage": breakage,
            "weather": rng.choice(words.WEATHER), "time": rng.choice(words.TIMES),
        }
        self.paragraphs: list[list[str]] = []

    def feel(self, feeling: str) -> str:
        return self.rng.choice(words.FEELINGS[feeling])

    def add(self, *templates: str, **extra: str) -> None:
        """Append one of `templates` (picked at random, filled in) to the current paragraph."""
        template = self.rng.choice(templates)
        self.paragraphs[-1].append(_capitalize(template.format(**self.fields, **extra)))

    def maybe(self, probability: float, *templates: str, **extra: str) -> None:
        if self.rng.random() < probability:
            self.add(*templates, **extra)

    def paragraph(self) -> None:
        self.paragraphs.append([])

    def text(self) -> str:
        return "\n".join(" ".join(sentences) for sentences in self.paragraphs if sentences)

    # ------------------------------------------------------------------ shared parts

    def beginning(self, introduce_friend: bool = True) -> None:
        self.paragraph()
        intro = self.hero.introduction()
        self.add(
            "Once upon a time, there was {intro}.", "There once was {intro}.",
            "Once upon a time, in a small town, there lived {intro}.",
            "Long ago, there was {intro}.", "{Intro} lived near {place}.",
            intro=intro, Intro=_capitalize(intro),
        )
        self.maybe(0.7, "{hero} loved to {place_fun}.", "{hero} liked to {use} {his} {adj} {obj}.",
                   "{his} favorite thing was {his} {adj} {obj}.",
                   "every day, {hero} played with {his} {adj} {obj}.")
        if introduce_friend:
            friend = self.friend
            called = friend.name if friend.kind in words.PERSON_KINDS else f"{friend.name} the {friend.kind}"
            self.add("{he} had a good friend, {called}.", "{called} lived next door.",
                     "{his} best friend was {friend}, {a_ftrait} {fkind}.",
                     called=called, a_ftrait=f"{_article(friend.trait)} {friend.trait}")

    def go_out(self) -> None:
        self.paragraph()
        self.add("one {weather} {time}, {hero} went to {place}.",
                 "one {time}, {hero} and {friend} went to {place} together.",
                 "one {weather} {time}, {hero} took {his} {obj} to {place}.",
                 "one {time}, {hero} ran all the way to {place}.")
        self.maybe(0.6, "{he} saw {sight1} and {sight2}.", "{hero} saw {sight1} and {sight3}.",
                   "{place} had {sight2} and {sight3}.")
        self.maybe(0.4, "{he} felt {feeling}.", "it was a {weather} {time} and {he} was {feeling}.",
                   feeling=self.feel(self.rng.choice(("happy", "excited"))))
        self.maybe(0.3, '"What a {weather} {time}!" said {hero}.', '"Let us have fun today," said {hero}.')

    def ending(self, lessons: tuple[str, ...], **extra: str) -> None:
        self.paragraph()
        self.add(*lessons, **extra)
        self.maybe(0.7, "from that day on, {hero} and {friend} were the best of friends.",
                   "{hero} went home with a big smile.",
                   "that night, {hero} slept well and dreamed of {place}.",
                   "{hero} felt {happy} all day long.",
                   "and {hero} never forgot that {weather} {time}.",
                   "they played until the sun went down.",
                   happy=self.feel("happy"))


# ---------------------------------------------------------------------- story plans

def _lost_toy(t: _Tale) -> None:
    t.go_out()
    t.add("{hero} played with {his} {obj} for a long time.", "{he} put {his} {obj} down to {place_fun}.")
    t.add("when it was time to go, {his} {obj} was gone!", "but then {hero} could not find {his} {obj}!")
    t.add("{he} felt {f}.", "{hero} was very {f}.", f=t.feel(t.rng.choice(("sad", "worried"))))
    t.paragraph()
    t.add('"Where is my {obj}?" {hero} cried.', '"Oh no, my {adj} {obj} is lost!" said {hero}.')
    t.add('{friend} came and said, "Do not worry. I will help you look."',
          '{friend} heard {him} and said, "Let us look together."')
    t.add("they looked near {sight1}. They looked by {sight2}.", "they looked high and low.")
    t.add("at last, {friend} found the {obj} {spot}!", "then {hero} saw something {spot}. It was the {obj}!")
    t.ending(('"Thank you, {friend}!" said {hero}. {he} learned that friends help each other.',
              "{hero} hugged {his} {obj}. From then on, {he} always kept it close.",
              "{hero} was so happy. {he} learned to take good care of {his} things."))


def _stuck_up_high(t: _Tale) -> None:
    if t.fields["obj"] not in words.LIGHT_OBJECTS:  # only light things fly into trees
        obj, adjectives, use, _ = t.rng.choice([o for o in words.OBJECTS if o[0] in words.LIGHT_OBJECTS])
        t.fields.update(obj=obj, adj=t.rng.choice(adjectives), use=use)
    t.go_out()
    t.add("{hero} threw {his} {obj} high in the air.", "a big wind came and took {his} {obj} away.")
    t.add("the {obj} got stuck in a tall tree!", "it landed on a high branch and stayed there.")
    t.paragraph()
    t.add("{hero} jumped and jumped, but {he} was too small.", "{hero} tried to reach it, but it was too high.")
    t.add("{he} felt {f}.", "{hero} sat down and felt {f}.", f=t.feel("sad"))
    t.add('then {friend} had an idea. "Let us ask {adult}!"',
          '{friend} said, "I know! We can use a long stick."',
          "then a bird flew down and pushed the {obj} with its beak.")
    t.add("soon the {obj} fell down, right into {hero}'s arms.", "with a little push, the {obj} came down.")
    t.ending(("{hero} learned that it is good to ask for help.",
              '"We did it together!" said {friend}. They learned that teamwork is best.',
              "{hero} smiled and said thank you. Helping each other made the day fun again."))


def _learning_to_share(t: _Tale) -> None:
    t.go_out()
    t.add("{hero} had {his} {adj} {obj} with {him}.", "{hero} was playing with {his} new {obj}.")
    t.add('{friend} came by and asked, "Can I {use} your {obj} too?"',
          '{friend} looked at the {obj} and said, "May I have a turn?"')
    t.paragraph()
    t.add('"No, it is mine!" said {hero}.', '{hero} held the {obj} tight and said, "No!"')
    t.add("{friend} walked away and felt {f}.", "{friend} looked {f} and sat down alone.", f=t.feel("sad"))
    t.add("{hero} played alone, but it was not fun anymore.", "soon {hero} felt {f} inside.", f=t.feel("sorry"))
    t.paragraph()
    t.add('{hero} went to {friend} and said, "I am sorry. Let us {use} it together."',
          '{hero} gave the {obj} to {friend}. "You can have a turn," {he} said.')
    t.add("{friend} smiled a big smile.", "{friend} was {f} again.", f=t.feel("happy"))
    t.ending(("{hero} learned that sharing makes everyone happy.",
              "playing together was much more fun than playing alone.",
              "from then on, {hero} always shared {his} toys."))


def _facing_a_fear(t: _Tale) -> None:
    fear, comfort, truth = t.rng.choice(words.SCARY_THINGS)
    t.fields.update(fear=fear, comfort=comfort, truth=truth)
    t.paragraph()
    t.add("{hero} was {f} of {fear}.", "there was one thing {hero} did not like: {fear}.", f=t.feel("scared"))
    t.add("one {time}, {he} had to face {fear}.", "one {time}, {fear} came near {hero}.")
    t.add("{he} wanted to hide.", "{his} heart went thump, thump, thump.")
    t.paragraph()
    t.add('{hero} ran to {adult}. "I am scared," {he} said.', '"{adult}, help!" called {hero}.')
    t.add('{adult} smiled and gave {him} {comfort}. "Let us look together," {ahe} said.',
          '{adult} held {his} hand. "You are braver than you think," {ahe} said.')
    t.add("they looked closely. It was {truth}!", "{hero} took a deep breath and looked. It was {truth}.")
    t.add("{hero} laughed.", "{hero} was {f}.", f=t.feel("surprised"))
    t.ending(("{hero} learned that being brave means trying even when you are scared.",
              "after that, {hero} was not scared of {fear} anymore.",
              "{hero} felt {f} for being so brave."), f=t.feel("proud"))


def _broken_toy(t: _Tale) -> None:
    t.go_out()
    t.add("{hero} ran fast with {his} {obj}.", "{hero} was not careful with {his} {obj}.")
    t.add("{he} tripped, and {breakage}!", "suddenly, {breakage}.")
    t.add("{hero} began to cry.", "{hero} felt {f}.", f=t.feel("sad"))
    t.paragraph()
    t.add("{adult} came to see what was wrong.", '{friend} said, "Let us take it to {adult}."')
    t.add('{adult} looked at the {obj}. "We can fix it," {ahe} said.',
          '"Do not be sad," said {adult}. "Some glue and care will help."')
    t.add("they worked together, slowly and carefully.", "{hero} held it still while {adult} fixed it.")
    t.add("soon the {obj} was as good as new.", "the {obj} looked a little different, but it worked again.")
    t.ending(("{hero} learned to be careful with the things {he} loves.",
              '"Thank you, {adult}!" said {hero}, and {he} played gently after that.',
              "{hero} learned that broken things can be fixed with patience."))


def _new_friend(t: _Tale) -> None:
    t.go_out()
    t.add("{hero} saw {a_fkind} sitting all alone.", "near {sight1}, there was {a_fkind} with no one to play with.",
          a_fkind=f"{_article(t.friend.kind)} {t.friend.kind}")
    t.add("the {fkind} looked {f}.", "the {fkind} seemed {f}.", f=t.feel("lonely"))
    t.paragraph()
    t.add('{hero} walked over and said, "Hello! My name is {hero}. What is yours?"',
          '{hero} was a little shy, but {he} said, "Hi! Do you want to play?"')
    t.add('"I am {friend}," said the {fkind}.', 'the {fkind} smiled. "I am {friend}. Yes, please!"')
    t.add("they played with the {obj} and ran all over {place}.", "they took turns with {hero}'s {obj}.")
    t.add("they laughed and laughed.", "it was the best {time} ever.")
    t.ending(("{hero} learned that saying hello can make a new friend.",
              "{hero} and {friend} met at {place} every {time} after that.",
              "now {friend} was never alone, and neither was {hero}."))


def _helping_an_animal(t: _Tale) -> None:
    animal, trouble, rescue, parent = t.rng.choice(words.HURT_ANIMALS)
    t.fields.update(animal=animal, trouble=trouble, rescue=rescue, parent=parent)
    t.go_out()
    t.add("{hero} heard a tiny sound.", "{hero} saw something move near {sight2}.")
    t.add("it was {animal}. It {trouble}.", "there was {animal} that {trouble}.")
    t.add("{hero} felt {f} for it.", "{hero} was {f}.", f=t.feel("worried"))
    t.paragraph()
    t.add('"I will help you," said {hero} softly.', '"Do not be afraid," {hero} whispered.')
    t.add("{he} {rescue}.", "very gently, {hero} {rescue}.")
    t.add("then the {parent} came and thanked {him}.", "soon the {parent} came, happy to see its baby.")
    t.ending(("{hero} felt {f}. Helping others felt good.",
              "{hero} learned that even small friends need help sometimes.",
              "{adult} said {hero} was very kind, and {hero} smiled."), f=t.feel("proud"))


def _warning_ignored(t: _Tale) -> None:
    treat = t.rng.choice(words.TREATS)
    t.fields["treat"] = treat
    t.paragraph()
    if t.rng.random() < 0.5:
        t.add('{adult} said, "Do not eat too many {treat}, {hero}."', '"Only one bowl of {treat}," said {adult}.')
        t.add("but the {treat} looked so good.", "but {hero} loved {treat} very much.")
        t.add("when no one was looking, {hero} ate and ate.", "{hero} ate all the {treat}.")
        t.paragraph()
        t.add("soon {his} tummy began to hurt.", "that night, {hero} had a big tummy ache.")
    else:
        t.add('{adult} said, "Do not go near the mud at {place}."', '"Stay on the path," said {adult}.')
        t.add("but {hero} wanted to see {sight3}.", "but {hero} was too {f} to listen.", f=t.feel("excited"))
        t.add("{he} ran off the path.", "{he} went closer and closer.")
        t.paragraph()
        t.add("splash! {hero} fell into the mud.", "{hero} slipped and got mud all over {his} {obj}.")
    t.add("{he} felt {f}.", "{hero} was {f} and cried.", f=t.feel(t.rng.choice(("sad", "sorry"))))
    t.add('{adult} gave {him} a hug. "Next time, please listen," {ahe} said.',
          '{adult} helped {him} and said, "Rules keep you safe."')
    t.ending(('{hero} nodded. "I will listen next time," {he} said.',
              "{hero} learned that grown-ups say things for a reason.",
              "after that, {hero} always listened to {adult}."))


def _hard_task(t: _Tale) -> None:
    goal, failure, trick = t.rng.choice(words.HARD_TASKS)
    t.fields.update(goal=goal, failure=failure, trick=trick)
    t.paragraph()
    t.add("{hero} wanted to {goal}.", "more than anything, {hero} wanted to {goal}.")
    t.add("{he} tried, but {he} {failure}.", "the first time, {hero} {failure}.")
    t.add("{he} tried again and {failure} again.", "{he} felt {f}.", f=t.feel(t.rng.choice(("angry", "sad"))))
    t.paragraph()
    t.add('"I can not do it," {hero} said.', '"It is too hard!" {hero} said.')
    t.add('{friend} said, "Try one more time. I believe in you."',
          '{adult} said, "Everyone falls before they learn. Try again!"')
    t.add("this time, {hero} {trick}.", "so {hero} {trick}.")
    t.add("and {he} did it!", "at last, {hero} could {goal}!")
    t.ending(("{hero} felt so proud. {he} learned to never give up.",
              "{hero} learned that practice makes things easier.",
              '"You did it!" cheered {friend}. Trying again had made all the difference.'))


def _making_a_gift(t: _Tale) -> None:
    gift = t.rng.choice(words.GIFTS)
    t.fields.update(gift=gift, the_gift="the " + gift.split(" ", 1)[1])
    t.paragraph()
    t.add("it was {adult}'s birthday soon.", "{hero} wanted to give {adult} a surprise.")
    t.add("{hero} picked flowers at {place} for a present.", "{hero} wanted to bring {adult} something from {place}.")
    t.add("but on the way home, the flowers got squashed.", "but the wind blew the flowers away.")
    t.add("{hero} felt {f}.", "{hero} sat down, feeling {f}.", f=t.feel("sad"))
    t.paragraph()
    t.add('{friend} said, "You can make {gift} instead!"', "then {hero} had an idea. {he} would make {gift}.")
    t.add("{he} worked hard all {time}.", "{hero} and {friend} worked on it together.")
    t.add("when {adult} saw {the_gift}, {ahe} smiled a big smile.", '{adult} said, "This is the best present ever!"')
    t.ending(("{hero} learned that gifts from the heart are the best.",
              "{hero} felt warm inside. Giving made {him} happy.",
              "{adult} kept {the_gift} forever."))


def _rainy_day(t: _Tale) -> None:
    t.paragraph()
    t.add("{hero} and {friend} wanted to have a picnic at {place}.", "{hero} planned to {place_fun} at {place}.")
    t.add("but then dark clouds came, and it began to rain.", "but when they looked outside, it was raining.")
    t.add("{hero} felt {f}.", '"Now we can not go," said {hero}, feeling {f}.', f=t.feel("sad"))
    t.paragraph()
    t.add('{adult} said, "We can have fun inside too!"', '{friend} said, "Let us play a game inside!"')
    t.add("they built a fort out of pillows.", "they made a picnic on the floor.",
          "they played with {hero}'s {obj} by the window.")
    t.add("the rain went pitter-patter, and they laughed.", "they told stories while the rain fell.")
    t.add("when the rain stopped, there was a rainbow!", "later, the sun came out again.")
    t.ending(("{hero} learned that a rainy day can still be a happy day.",
              "{hero} learned that fun can be found anywhere.",
              "it was the best rainy day ever."))


PLANS = (_lost_toy, _stuck_up_high, _learning_to_share, _facing_a_fear, _broken_toy, _new_friend,
         _helping_an_animal, _warning_ignored, _hard_task, _making_a_gift, _rainy_day)


def generate_story(seed: int, index: int) -> str:
    """Story number `index` of the corpus for `seed`."""
    tale = _Tale(random.Random(f"tsfast-synthetic-v{GENERATOR_VERSION}:{seed}:{index}"))
    plan = tale.rng.choice(PLANS)
    tale.beginning(introduce_friend=plan is not _new_friend)  # that plan is how they meet
    plan(tale)
    return tale.text()


def generate_stories(n: int, seed: int = 0, start: int = 0) -> list[str]:
    """Stories start .. start+n-1 for `seed` (deterministic)."""
    if n < 0:
        raise ValueError(f"number of stories must be >= 0, got {n}")
    return [generate_story(seed, index) for index in range(start, start + n)]


def synthetic_text(n: int, seed: int = 0) -> str:
    """`n` stories in the Hub's text format: each followed by a `<|endoftext|>` line."""
    return "".join(story + STORY_SEPARATOR for story in generate_stories(n, seed))
